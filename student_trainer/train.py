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
from student_trainer import distributed
from student_trainer import step as step_lib
from student_trainer.blockwise import keep_states, phase_note, state_names_at
from student_trainer.checkpoint import Checkpointer, PreemptionFlag, check_resume_config
from student_trainer.collapse import save_collapsed
from student_trainer.config import RemoteTeacherConfig, TeacherConfig, TrainConfig
from student_trainer.losses import LossConfig
from student_trainer.lti.build import check_restored
from student_trainer.metrics import (DeviceClock, ExampleIdLog, MetricsWriter, ProgressDisplay, StepWindow,
                                     read_example_ids, token_means)
from student_trainer.preflight import RunError, preflight, user_errors  # noqa: F401 (user_errors: re-exported)
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


class _Feeder:
  """Keeps `lookahead` batches submitted to the teacher source ahead of training.

  Each queued batch carries the data-iterator state from just before it was
  drawn, so a checkpoint can record the position of the first untrained batch
  even though later batches were already read and sent to the teacher. A batch
  leaves the queue only once it is trained (`trained`), so a step abandoned
  while waiting for its teacher is the first batch of the next run.
  """

  def __init__(self, data: BatchIterator, source: TeacherSource, loss_cfg: LossConfig, *, first_step: int,
               steps: int):
    self._data, self._source, self._loss_cfg, self._steps = data, source, loss_cfg, steps
    self._queue: collections.deque[tuple[int, Batch, dict]] = collections.deque()
    self._next_step = first_step

  def _fill(self, upto_step: int) -> None:
    while self._next_step <= upto_step:
      state_before = self._data.get_state()
      batch = next(self._data)
      temperature = self._loss_cfg.temperature.value(self._next_step)
      self._source.submit(batch, temperature, **_states_kwarg(self._loss_cfg, self._next_step))
      self._queue.append((self._next_step, batch, state_before))
      self._next_step += 1

  def peek(self, step: int) -> Batch:
    """The batch of `step`, after topping up the submissions ahead of it (stays queued)."""
    self._fill(min(step + max(self._source.lookahead, 0), self._steps - 1))
    queued_step, batch, _ = self._queue[0]
    assert queued_step == step, (queued_step, step)
    return batch

  def trained(self, step: int) -> None:
    queued_step, _, _ = self._queue.popleft()
    assert queued_step == step, (queued_step, step)

  def position(self) -> dict:
    """Data state at the first batch not yet trained on."""
    return self._queue[0][2] if self._queue else self._data.get_state()


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
    if latest is not None:
      restored, data_state, meta = ckpt.restore(latest, state.abstract())
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
    feeder = _Feeder(data, source, cfg.loss, first_step=start, steps=cfg.steps)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    last: dict[str, float] = {}
    clock = DeviceClock()
    stack.callback(clock.close)
    window = StepWindow(clock)
    step = start
    saved = start if latest is not None else None  # the step the newest checkpoint holds
    try:
      while step < end and not preempt.reached(step):
        batch = feeder.peek(step)
        if cfg.loss.ever_blockwise and (note := phase_note(cfg.loss, step, first=step == start)):
          log.info("%s", note)
        hyper = step_lib.hyperparameters(cfg, step)
        device_batch = shard_batch(batch, mesh)
        fallback_step.prepare(state.params, device_batch, hyper)
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
          state.params, metrics = fallback_step(state.params, device_batch, hyper)
        else:
          state.params, metrics = programs.train(phase)(state.params, device_batch, targets, hyper)
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
        if step % cfg.logging.every_steps == 0 or step == end:
          local = {**window.flush(), **{f"teacher/{k}": v for k, v in source.metrics().items()}}
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
  ckpt.save(step, state.saved(), feeder.position(), json.loads(json.dumps(meta)))
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
