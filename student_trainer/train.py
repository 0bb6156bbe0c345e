"""The student training loop: data -> teacher source -> jitted step -> metrics/checkpoints."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import jax
import numpy as np

from distill_core import memory
from distill_core.data import Batch, BatchIterator, make_eval_iterator, make_iterator
from distill_core.sharding import make_mesh, rules_table, shard_batch
from student_trainer import distributed, on_policy
from student_trainer import step as step_lib
from student_trainer.blockwise import keep_states, phase_note, state_names_at
from student_trainer.checkpoint import Checkpointer, PreemptionFlag, check_resume_config
from student_trainer.collapse import save_collapsed
from student_trainer.config import RemoteTeacherConfig, TeacherConfig, TrainConfig
from student_trainer.errors import RunError
from student_trainer.losses import LossConfig
from student_trainer.lti.build import check_restored
from student_trainer.metrics import (DeviceClock, ExampleIdLog, MetricsWriter, ProgressDisplay, StepWindow,
                                     read_example_ids, token_means)
from student_trainer.preflight import preflight, user_errors  # noqa: F401 (user_errors: re-exported)
from student_trainer.sources import make_source, source_kind
from student_trainer.sources.base import Interrupted, TeacherSource
from student_trainer.state import TrainState, create_train_state, export_student

log = logging.getLogger(__name__)


class NonFiniteStep(RunError):
  """A step's loss or gradient was not finite and `optim.on_nonfinite` is 'stop'."""


@dataclasses.dataclass
class TrainResult:
  """What a run did (also returned to tests and benchmarks).

  The run keeps no per-step history in memory; with `logging.example_ids` the trained example
  ids are in `<run_dir>/example_ids.jsonl` (read them with `trained_example_ids`).
  """

  step: int
  preempted: bool
  last_metrics: dict[str, float]
  run_dir: Path
  state: TrainState | None = None
  compilations: dict[str, int] = dataclasses.field(default_factory=dict)  # train-step programs per objective

  @property
  def trained_example_ids(self) -> list[list[int]]:
    """Example ids of every trained step of this run directory, in step order (from the debug log)."""
    return read_example_ids(self.run_dir)


@dataclasses.dataclass
class _Item:
  """One step's batch in the feeder: the corpus batch drawn for it and what trains (the same batch, or the
  generated one once collected)."""

  step: int
  corpus: Batch
  state_before: dict
  on_policy: bool
  batch: Batch | None
  dispatched: on_policy.Dispatched | None = None
  generated: on_policy.Generated | None = None
  submitted: bool = False


class _Feeder:
  """Keeps `lookahead` batches submitted to the teacher source ahead of training.

  Each queued batch carries the data-iterator state from just before it was
  drawn, so a checkpoint can record the position of the first untrained batch
  even though later batches were already read and sent to the teacher. A batch
  leaves the queue only once it is trained (`trained`), so a step abandoned
  while waiting for its teacher is the first batch of the next run.

  Every step draws its corpus batch in order. An on-policy step's batch is then
  generated from it (`generate` dispatches, `collect` packs it); batches are
  submitted in step order, so an off-policy batch behind an on-policy one not
  yet generated waits for it.
  """

  def __init__(self, data: BatchIterator, source: TeacherSource, loss_cfg: LossConfig, *, first_step: int,
               steps: int, generator: on_policy.Generator | None = None):
    self._data, self._source, self._loss_cfg, self._steps = data, source, loss_cfg, steps
    self._generator = generator
    self._queue: collections.deque[_Item] = collections.deque()
    self._next_draw = self._next_submit = first_step

  def _item(self, step: int) -> _Item:
    """The queued item of `step`, drawing corpus batches up to it."""
    while self._next_draw <= step:
      state_before = self._data.get_state()
      corpus = next(self._data)
      on = self._generator is not None and self._loss_cfg.on_policy_at(self._next_draw)
      self._queue.append(_Item(self._next_draw, corpus, state_before, on, None if on else corpus))
      self._next_draw += 1
    return self._queue[step - self._queue[0].step]

  def submit_ready(self, upto_step: int) -> None:
    """Submits, in step order, every batch up to `upto_step` that is ready (stops at one being generated)."""
    while self._next_submit <= min(upto_step, self._steps - 1):
      item = self._item(self._next_submit)
      if item.batch is None:
        return
      kwargs = _states_kwarg(self._loss_cfg, item.step)
      if item.generated is not None and self._loss_cfg.scores_given_ids:
        kwargs["part_inputs"] = self._generator.teacher_inputs(item.generated)
      self._source.submit(item.batch, self._loss_cfg.temperature.value(item.step), **kwargs)
      item.submitted = True
      self._next_submit += 1

  def generate(self, step: int, params, version: int) -> None:
    """Dispatches the sampler for on-policy `step` on `params` (after `version` optimizer steps)."""
    item = self._item(step)
    assert item.on_policy and item.batch is None and item.dispatched is None, step
    item.dispatched = self._generator.dispatch(step, params, version, item.corpus)

  def collect(self, step: int) -> on_policy.Generated:
    """Waits for `step`'s generated tokens and makes them its batch."""
    item = self._item(step)
    generated = self._generator.collect(item.dispatched)
    self._set_generated(item, generated)
    return generated

  def needs_generation(self, step: int) -> bool:
    """Whether `step` is on-policy and has neither a batch nor a sampler call in flight."""
    if self._generator is None or step >= self._steps or not self._loss_cfg.on_policy_at(step):
      return False
    item = self._item(step)
    return item.batch is None and item.dispatched is None

  def restore_generated(self, pending: list[on_policy.Generated], where: str) -> None:
    """Batches generated before a checkpoint become their steps' batches again (not sampled anew)."""
    for generated in pending:
      if generated.step < self._next_submit or generated.step >= self._steps:
        continue  # not a step this run trains (steps changed): nothing to restore
      item = self._item(generated.step)
      if not item.on_policy or not np.array_equal(np.asarray(generated.batch.example_ids),
                                                  np.asarray(item.corpus.example_ids)):
        raise RunError(f"{where}: the generated batch saved for step {generated.step} does not match that step "
                       "(its example ids or loss.on_policy_fraction differ); resume from another checkpoint or "
                       "set checkpoint.resume=false")
      self._set_generated(item, generated)

  @staticmethod
  def _set_generated(item: _Item, generated: on_policy.Generated) -> None:
    item.generated, item.batch, item.dispatched = generated, generated.batch, None

  def peek(self, step: int) -> _Item:
    """The item of `step`, after topping up the submissions ahead of it (stays queued)."""
    self.submit_ready(step + max(self._source.lookahead, 0))
    item = self._queue[0]
    assert item.step == step and item.submitted, (item.step, step, item.submitted)
    return item

  def trained(self, step: int) -> None:
    item = self._queue.popleft()
    assert item.step == step, (item.step, step)

  def position(self) -> dict:
    """Data state at the first batch not yet trained on."""
    return self._queue[0].state_before if self._queue else self._data.get_state()

  def pending_generated(self) -> list[on_policy.Generated]:
    """The generated batches not yet trained (those a checkpoint must keep), in step order."""
    return [item.generated for item in self._queue if item.generated is not None]


class _FallbackStep:
  """The train step of a batch without teacher targets, compiled before it is needed.

  A batch with no answer (a fallback) is another pytree, hence another program:
  compiling it when the teacher goes down would stall training at the worst
  moment, so when the source may fall back (`ahead`: its kind may, see
  `sources/registry.py`, and its options allow it: a remote source whose policy
  waits never does) it is compiled ahead, at the first batch.
  """

  def __init__(self, programs: step_lib.Programs, *, ahead: bool):
    self._programs = programs
    self._compiled = None
    self._ahead = ahead

  def prepare(self, params, batch, hyper) -> None:
    if self._ahead and self._compiled is None:
      self._compiled = self._programs.train("kd").lower(params, batch, None, hyper).compile()

  def __call__(self, params, batch, hyper):
    fn = self._compiled or self._programs.train("kd")
    return fn(params, batch, None, hyper)


def run(cfg: TrainConfig, *, stop_after: int | None = None, keep_state: bool = False) -> TrainResult:
  """Trains `cfg.steps` optimizer steps (or until `stop_after` more steps, or SIGTERM/SIGINT).

  With several processes (`jax.distributed`), every process calls this with the
  same config; see `student_trainer/distributed.py` for what they agree on.

  Raises:
    RunError: a problem found before training (naming the file or option), a changed config on
      resume (`checkpoint.ConfigChanged`), or a non-finite step with `optim.on_nonfinite=stop`.
  """
  distributed.initialize(cfg.distributed)
  preflight(cfg)
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  mesh, rules = make_mesh(cfg.mesh), rules_table(cfg.mesh)
  with distributed.PeerWatch(cfg.distributed):  # a failure here ends every process
    distributed.align("distill-setup", cfg.distributed.initialization_timeout_s)
    return _run(cfg, run_dir, mesh, rules, stop_after=stop_after, keep_state=keep_state)


def _run(cfg: TrainConfig, run_dir: Path, mesh, rules, *, stop_after: int | None, keep_state: bool) -> TrainResult:
  preempt = PreemptionFlag()  # before the source connects: a signal while it waits is not lost
  with contextlib.ExitStack() as stack:  # closes whatever was opened, also when setup fails
    stack.callback(preempt.restore_handlers)
    ckpt = Checkpointer(cfg.checkpoint.directory or run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    stack.callback(ckpt.close)
    latest = ckpt.latest_step() if cfg.checkpoint.resume else None
    if latest is not None:  # before anything connects or compiles
      meta = ckpt.restore_meta(latest)
      check_resume_config(meta.get("config"), cfg.model_dump(mode="json"), saved_step=int(meta["step"]),
                          allow=cfg.checkpoint.allow_changes, where=f"checkpoint {ckpt.directory / str(latest)}")
    if jax.process_index() == 0:
      (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    state = create_train_state(cfg, mesh, rules)
    distributed.align("distill-state", cfg.distributed.initialization_timeout_s)  # before Orbax's collectives
    data = make_iterator(cfg.data, "train", shard_index=jax.process_index(), shard_count=jax.process_count())
    stack.callback(data.close)
    source = make_source(cfg, mesh, rules, interrupt=preempt.event)
    stack.callback(source.close)
    start = 0
    pending: dict = {}
    if latest is not None:
      restored, data_state, meta = ckpt.restore(latest, state.abstract())
      pending = ckpt.restore_generated(latest) or {}
      check_restored(meta.get("lti"), state.lti, f"checkpoint {ckpt.directory} step {latest}")
      state = state.replace(restored)
      data.set_state(data_state)
      start = int(meta["step"])
      source.restore(meta.get("teacher", {}))
      log.info("resumed from step %d (%s)", start, ckpt.directory)
    note = shared_cores_note(cfg.teacher)
    if note:
      log.info("%s", note)

    programs = step_lib.Programs(state.graphdef, cfg, state.shardings, mesh)
    kind = source_kind(cfg.teacher.source)
    fallback_step = _FallbackStep(programs, ahead=kind.may_fall_back and source.may_fall_back)
    writer = ids_log = None
    if jax.process_index() == 0:
      writer = MetricsWriter(run_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard)
      stack.callback(writer.close)
      if cfg.logging.example_ids:
        ids_log = ExampleIdLog(run_dir)
        stack.callback(ids_log.close)
    progress = ProgressDisplay(cfg.steps, start, enabled=cfg.logging.progress and jax.process_index() == 0)
    stack.callback(progress.close)
    generator = None
    if cfg.loss.on_policy_fraction > 0:
      generator = on_policy.Generator(cfg.generation, cfg.data, cfg.model, state.graphdef, mesh, rules)
    feeder = _Feeder(data, source, cfg.loss, first_step=start, steps=cfg.steps, generator=generator)
    staleness = cfg.generation.staleness
    on_policy_window = on_policy.OnPolicyWindow()
    if generator is not None:
      saved_batches = on_policy.unpack(pending, seq_len=generator.seq_len, pad_id=generator.pad_id)
      feeder.restore_generated(saved_batches, f"checkpoint {ckpt.directory} step {latest}")
      for first in range(start, start + staleness):  # a fresh run's first steps: drawn with the initial params
        if feeder.needs_generation(first):
          feeder.generate(first, state.params, version=start)
          on_policy_window.generated(feeder.collect(first))
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    last: dict[str, float] = {}
    clock = DeviceClock()
    stack.callback(clock.close)
    window = StepWindow(clock)
    step = start
    saved = start if latest is not None else None  # the step the newest checkpoint holds
    try:
      while step < end and not preempt.reached(step):
        ahead = step + staleness  # drawn with the parameters after `step` steps, before step trains on them
        generating = feeder.needs_generation(ahead)
        if generating:  # dispatched before the train step that donates these parameters' buffers
          feeder.generate(ahead, state.params, version=step)
        item = feeder.peek(step)
        batch = item.batch
        if not cfg.loss.scores_given_ids:  # only the on-policy losses read the sampler's log mu
          batch = dataclasses.replace(batch, sampler_logprobs=None)
        if cfg.loss.ever_blockwise and (note := phase_note(cfg.loss, step, first=step == start)):
          log.info("%s", note)
        hyper = step_lib.hyperparameters(cfg, step)
        device_batch = shard_batch(batch, mesh)
        # A batch without an answer trains on CE: the corpus batch's structure (no sampler log mu), one program.
        fallback_batch = dataclasses.replace(device_batch, sampler_logprobs=None)
        fallback_step.prepare(state.params, fallback_batch, hyper)
        waiting = time.perf_counter()
        # Interrupted on SIGTERM/SIGINT: this step is abandoned, not trained.
        targets = source.next()
        if kind.falls_back_per_process:
          targets = distributed.agree_targets(targets, step)
        targets = _trimmed(cfg.loss, targets, step)
        wait = (waiting, time.perf_counter())
        phase = programs.phase(step, targets)
        if step == start:  # before the first step allocates anything: stop here if it cannot fit
          _check_memory(cfg, mesh, programs.train(phase), (state.params, device_batch, targets, hyper), phase)
        if targets is None:
          state.params, metrics = fallback_step(state.params, fallback_batch, hyper)
        else:
          state.params, metrics = programs.train(phase)(state.params, device_batch, targets, hyper)
        if generating:  # the sampler ran before this step on the device: its tokens go to the teacher now
          on_policy_window.generated(feeder.collect(ahead))
          feeder.submit_ready(step + max(source.lookahead, 0))
        if item.generated is not None:
          kl = None if targets is None else on_policy.reverse_kl_sums(
              targets, device_batch.targets, item.generated.student_logprobs, device_batch.loss_mask)
          on_policy_window.trained(item.generated, generator.stopped(item.generated), kl)
        if cfg.loss.ever_blockwise:
          metrics = dict(metrics, blockwise=float(phase == "blockwise"))
        if cfg.optim.on_nonfinite == "stop" and not bool(metrics["finite"]):  # a sync per step, only here
          saved = _save(ckpt, step, state, feeder, source, cfg)
          raise NonFiniteStep(f"step {step + 1}: the loss or gradient is not finite (example ids "
                              f"{np.asarray(batch.example_ids)[:4].tolist()}...); the model is unchanged and "
                              f"checkpointed at step {step} (optim.on_nonfinite=stop; 'skip' drops such steps)")
        feeder.trained(step)
        if ids_log:
          ids_log.write(step, np.asarray(batch.example_ids).reshape(-1))
        step += 1
        window.add(step - 1, metrics, tokens=batch.tokens.size, wait=wait,
                   fallback=targets is None and kind.teacher)
        on_policy_window.step()
        if step % cfg.logging.every_steps == 0 or step == end:
          local = {**window.flush(), **{f"teacher/{k}": v for k, v in source.metrics().items()}}
          if generator is not None:
            local.update(on_policy_window.flush())
          last = distributed.gather_metrics(step, local, cfg.distributed.metrics_timeout_s) or local
          if writer:
            writer.write(step, last)
          progress.update(step, last)
        else:
          progress.update(step)
        if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < end:
          _evaluate(cfg, state, programs, source, mesh, writer, step)
        if step % cfg.checkpoint.every_steps == 0 or preempt:
          saved = _save(ckpt, step, state, feeder, source, cfg)
      if step == cfg.steps and not preempt:
        last.update(_evaluate(cfg, state, programs, source, mesh, writer, step))
    except Interrupted as e:
      log.warning("%s: checkpointing the %d trained steps and stopping", e, step)
    if saved != step:
      _save(ckpt, step, state, feeder, source, cfg)
    if step == cfg.steps and not preempt and cfg.lti.enabled and cfg.lti.collapse_at_end:
      save_collapsed(state, run_dir / "collapsed")  # Orbax: collective
    if step == cfg.steps and not preempt and cfg.export_hf:
      export_student(state, run_dir / "hf", tokenizer_file=Path(cfg.data.path) / "tokenizer.json")
  return TrainResult(step=step, preempted=bool(preempt), last_metrics=last, run_dir=run_dir,
                     state=state if keep_state else None, compilations=programs.compilations())


def shared_cores_note(teacher_cfg: TeacherConfig) -> str | None:
  """One line saying that teacher and student share this machine's cores, when they do: a source that
  computes on the student's devices, or one whose teacher servers (teacher.remote) are all on this machine."""
  kind = source_kind(teacher_cfg.source)
  if kind.shares_student_devices:
    return ("the teacher runs in this process: teacher and student share its devices, so perf/tokens_per_s "
            "and perf/teacher_wait_fraction measure both together")
  remote = next((sub for sub in kind.sub_configs(teacher_cfg) if isinstance(sub, RemoteTeacherConfig)), None)
  if remote is None:
    return None
  hosts = [address.rpartition(":")[0].strip("[]") for address in remote.addresses]
  if hosts and all(h == "localhost" or h == "::1" or h.startswith("127.") for h in hosts):
    return (f"the teacher at {remote.address} is on this machine: teacher and student share its "
            f"{os.cpu_count()} CPU cores (and devices), so perf/tokens_per_s and perf/teacher_wait_fraction "
            "measure both together")
  return None


def _check_memory(cfg: TrainConfig, mesh, train_fn, args, phase: str) -> None:
  """Compiles the first step ahead and raises MemoryBudgetError (one line) if it exceeds a device's memory.

  Only where a budget is known (`mesh.device_memory_bytes`, or the device's bytes_limit); the
  compiled program stays in JAX's cache, so the step itself does not compile it again.
  """
  device = mesh.devices.flat[0]
  if memory.device_budget(device, cfg.mesh.device_memory_bytes)[0] is None:
    return
  b, t = args[1].tokens.shape
  name = f"{phase} step (batch {b}x{t} over {mesh.devices.size} devices, grad_accum {cfg.optim.grad_accum})"
  [program] = memory.compiled_programs_fit([(name, train_fn.lower(*args).compile())], device,
                                           cfg.mesh.device_memory_bytes, where="train", knobs=memory.TRAINER_KNOBS)
  log.info("%s: %s", name, program.summary())


def _states_kwarg(loss_cfg: LossConfig, step: int) -> dict:
  """`{"states": names}` for a source when the run's objectives read different teacher states, else {}."""
  return {"states": state_names_at(loss_cfg, step)} if loss_cfg.ever_blockwise else {}


def _trimmed(loss_cfg: LossConfig, targets, step: int):
  """Targets holding only the states the objective of `step` reads (sources may send more)."""
  return keep_states(targets, state_names_at(loss_cfg, step)) if loss_cfg.ever_blockwise else targets


def _save(ckpt: Checkpointer, step: int, state: TrainState, feeder: _Feeder, source: TeacherSource,
          cfg: TrainConfig) -> int:
  meta = {"step": step, "teacher": source.state(), "model": cfg.model.model_dump(),
          "config": cfg.model_dump(mode="json")}
  if state.lti is not None:
    meta["lti"] = state.lti  # where the (unsaved) teacher kernels come from, and their fingerprint
  # Generated batches not yet trained were drawn with parameters older than the checkpoint's: kept as tokens.
  generated = on_policy.pack(feeder.pending_generated()) if cfg.loss.on_policy_fraction > 0 else None
  ckpt.save(step, state.saved(), feeder.position(), json.loads(json.dumps(meta)), generated)
  return step


def _evaluate(cfg: TrainConfig, state: TrainState, programs: step_lib.Programs, source: TeacherSource, mesh,
              writer, step: int) -> dict[str, float]:
  it = make_eval_iterator(cfg.data, shard_index=jax.process_index(), shard_count=jax.process_count())
  temperature = cfg.loss.temperature.value(step)
  kind = source_kind(cfg.teacher.source)
  rows = []
  try:
    for _, batch in zip(range(cfg.eval.batches), it):
      targets = source.compute(batch, temperature, **_states_kwarg(cfg.loss, step))
      if kind.falls_back_per_process:
        targets = distributed.agree_targets(targets, step)
      targets = _trimmed(cfg.loss, targets, step)
      eval_fn = programs.eval(programs.phase(step, targets))
      out = eval_fn(state.params, shard_batch(batch, mesh), targets, step_lib.hyperparameters(cfg, step))
      rows.append(jax.device_get(out))
  finally:
    it.close()
  metrics = token_means(rows, "eval/")
  if writer:
    writer.write(step, metrics)
  log.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
  return metrics
