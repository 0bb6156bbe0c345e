"""The student training loop: data -> teacher source -> jitted step -> metrics/checkpoints."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from distill_core.data import Batch, BatchIterator, load_manifest, make_eval_iterator, make_iterator
from distill_core.sharding import make_mesh, rules_table, shard_batch
from student_trainer import distributed
from student_trainer import step as step_lib
from student_trainer.blockwise import keep_states, state_names_at
from student_trainer.checkpoint import Checkpointer, PreemptionFlag
from student_trainer.collapse import save_collapsed
from student_trainer.config import TrainConfig
from student_trainer.lti.build import check_restored
from student_trainer.metrics import MetricsWriter, ProgressDisplay
from student_trainer.sources import make_source
from student_trainer.sources.base import TeacherSource
from student_trainer.state import TrainState, create_train_state, export_student

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
  """What a run did (also returned to tests and benchmarks)."""

  step: int
  preempted: bool
  last_metrics: dict[str, float]
  trained_example_ids: list[list[int]]
  run_dir: Path
  state: TrainState | None = None
  compilations: dict[str, int] = dataclasses.field(default_factory=dict)  # train-step programs per objective


class _Feeder:
  """Keeps `lookahead` batches submitted to the teacher source ahead of training.

  Each queued batch carries the data-iterator state from just before it was
  drawn, so a checkpoint can record the position of the first untrained batch
  even though later batches were already read and sent to the teacher.
  """

  def __init__(self, data: BatchIterator, source: TeacherSource, cfg: TrainConfig, first_step: int):
    self._data, self._source, self._cfg = data, source, cfg
    self._queue: collections.deque[tuple[int, Batch, dict]] = collections.deque()
    self._next_step = first_step

  def _fill(self, upto_step: int) -> None:
    while self._next_step <= upto_step:
      state_before = self._data.get_state()
      batch = next(self._data)
      temperature = self._cfg.loss.temperature.value(self._next_step)
      self._source.submit(batch, temperature, **_states_kwarg(self._cfg, self._next_step))
      self._queue.append((self._next_step, batch, state_before))
      self._next_step += 1

  def pop(self, step: int) -> Batch:
    """The batch of `step`, after topping up the submissions ahead of it."""
    self._fill(min(step + max(self._source.lookahead, 0), self._cfg.steps - 1))
    queued_step, batch, _ = self._queue.popleft()
    assert queued_step == step, (queued_step, step)
    return batch

  def position(self) -> dict:
    """Data state at the first batch not yet trained on."""
    return self._queue[0][2] if self._queue else self._data.get_state()


def run(cfg: TrainConfig, *, stop_after: int | None = None, keep_state: bool = False) -> TrainResult:
  """Trains `cfg.steps` optimizer steps (or until `stop_after` more steps, or SIGTERM).

  With several processes (`jax.distributed`), every process calls this with the
  same config; see `student_trainer/distributed.py` for what they agree on.
  """
  distributed.initialize(cfg.distributed)
  run_dir = Path(cfg.run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
  mesh, rules = make_mesh(cfg.mesh), rules_table(cfg.mesh)
  manifest = load_manifest(cfg.data.path)
  if manifest.vocab_size > cfg.model.real_vocab_size:
    raise ValueError(f"data.path: tokenizer vocabulary ({manifest.vocab_size}) is larger than the "
                     f"student's ({cfg.model.real_vocab_size})")
  with distributed.PeerWatch(cfg.distributed):  # a failure here ends every process
    distributed.align("distill-setup", cfg.distributed.initialization_timeout_s)
    return _run(cfg, run_dir, mesh, rules, stop_after=stop_after, keep_state=keep_state)


def _run(cfg: TrainConfig, run_dir: Path, mesh, rules, *, stop_after: int | None, keep_state: bool) -> TrainResult:
  with contextlib.ExitStack() as stack:  # closes whatever was opened, also when setup fails
    state = create_train_state(cfg, mesh, rules)
    distributed.align("distill-state", cfg.distributed.initialization_timeout_s)  # before Orbax's collectives
    ckpt = Checkpointer(cfg.checkpoint.directory or run_dir / "checkpoints", keep=cfg.checkpoint.keep,
                        async_save=cfg.checkpoint.async_save)
    stack.callback(ckpt.close)
    data = make_iterator(cfg.data, "train", shard_index=jax.process_index(), shard_count=jax.process_count())
    stack.callback(data.close)
    source = make_source(cfg, mesh, rules)
    stack.callback(source.close)
    start = 0
    latest = ckpt.latest_step() if cfg.checkpoint.resume else None
    if latest is not None:
      restored, data_state, meta = ckpt.restore(latest, state.abstract())
      check_restored(meta.get("lti"), state.lti, f"checkpoint {ckpt.directory} step {latest}")
      state = state.replace(restored)
      data.set_state(data_state)
      start = int(meta["step"])
      source.restore(meta.get("teacher", {}))
      log.info("resumed from step %d (%s)", start, ckpt.directory)

    programs = step_lib.Programs(state.graphdef, cfg, state.shardings)
    writer = None
    if jax.process_index() == 0:
      writer = MetricsWriter(run_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard)
      stack.callback(writer.close)
    progress = ProgressDisplay(cfg.steps, start, enabled=cfg.logging.progress and jax.process_index() == 0)
    stack.callback(progress.close)
    preempt = PreemptionFlag()
    stack.callback(preempt.restore_handlers)
    feeder = _Feeder(data, source, cfg, start)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    trained_ids: list[list[int]] = []
    last: dict[str, float] = {}
    window = _Window()
    step = start
    saved = start if latest is not None else None  # the step the newest checkpoint holds
    while step < end and not preempt.reached(step):
      batch = feeder.pop(step)
      t_wait = time.perf_counter()
      targets = source.next()
      if source.falls_back_per_process:
        targets = distributed.agree_targets(targets, step)
      targets = _trimmed(cfg, targets, step)
      waited = time.perf_counter() - t_wait
      hyper = step_lib.hyperparameters(cfg, step)
      phase = programs.phase(step, targets)
      state.params, metrics = programs.train(phase)(state.params, shard_batch(batch, mesh), targets, hyper)
      if cfg.loss.ever_blockwise:
        metrics = dict(metrics, blockwise=float(phase == "blockwise"))
      trained_ids.append(np.asarray(batch.example_ids).tolist())
      step += 1
      window.add(metrics, tokens=batch.tokens.size, waited=waited,
                 fallback=targets is None and cfg.teacher.source != "none")
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
    if step == cfg.steps:
      last.update(_evaluate(cfg, state, programs, source, mesh, writer, step))
    if saved != step:
      _save(ckpt, step, state, feeder, source, cfg)
    if step == cfg.steps and cfg.lti.enabled and cfg.lti.collapse_at_end:
      save_collapsed(state, run_dir / "collapsed")  # Orbax: collective
    if step == cfg.steps and cfg.export_hf:
      export_student(state, run_dir / "hf", tokenizer_file=Path(cfg.data.path) / "tokenizer.json")
  return TrainResult(step=step, preempted=bool(preempt), last_metrics=last, trained_example_ids=trained_ids,
                     run_dir=run_dir, state=state if keep_state else None, compilations=programs.compilations())


def _states_kwarg(cfg: TrainConfig, step: int) -> dict:
  """`{"states": names}` for a source when the run's objectives read different teacher states, else {}."""
  return {"states": state_names_at(cfg.loss, step)} if cfg.loss.ever_blockwise else {}


def _trimmed(cfg: TrainConfig, targets, step: int):
  """Targets holding only the states the objective of `step` reads (sources may send more)."""
  return keep_states(targets, state_names_at(cfg.loss, step)) if cfg.loss.ever_blockwise else targets


def _save(ckpt: Checkpointer, step: int, state: TrainState, feeder: _Feeder, source: TeacherSource,
          cfg: TrainConfig) -> int:
  meta = {"step": step, "teacher": source.state(), "model": cfg.model.model_dump()}
  if state.lti is not None:
    meta["lti"] = state.lti  # where the (unsaved) teacher kernels come from, and their fingerprint
  ckpt.save(step, state.saved(), feeder.position(), json.loads(json.dumps(meta)))
  return step


def _evaluate(cfg: TrainConfig, state: TrainState, programs: step_lib.Programs, source: TeacherSource, mesh,
              writer, step: int) -> dict[str, float]:
  it = make_eval_iterator(cfg.data, shard_index=jax.process_index(), shard_count=jax.process_count())
  temperature = cfg.loss.temperature.value(step)
  sums: collections.Counter = collections.Counter()
  try:
    for _, batch in zip(range(cfg.eval.batches), it):
      targets = source.compute(batch, temperature, **_states_kwarg(cfg, step))
      if source.falls_back_per_process:
        targets = distributed.agree_targets(targets, step)
      targets = _trimmed(cfg, targets, step)
      eval_fn = programs.eval(programs.phase(step, targets))
      out = eval_fn(state.params, shard_batch(batch, mesh), targets, step_lib.hyperparameters(cfg, step))
      sums.update({k: float(v) for k, v in jax.device_get(out).items()})
  finally:
    it.close()
  tokens = max(sums.pop("tokens", 0.0), 1.0)
  metrics = {f"eval/{name.removesuffix('_sum')}": value / tokens for name, value in sums.items()}
  if writer:
    writer.write(step, metrics)
  log.info("eval at step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
  return metrics


class _Window:
  """Accumulates step metrics between log points (token-weighted losses, throughput, waits).

  Throughput is wall time between log points after a device sync, so JAX's
  asynchronous dispatch cannot make steps look faster than they are.
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self._pending: list[Any] = []
    self._tokens = 0
    self._waited = 0.0
    self._fallbacks = 0
    self._start = time.perf_counter()

  def add(self, metrics, *, tokens: int, waited: float, fallback: bool) -> None:
    self._pending.append(metrics)
    self._tokens += tokens
    self._waited += waited
    self._fallbacks += int(fallback)

  def flush(self) -> dict[str, float]:
    host = jax.device_get(self._pending)  # one device sync per log interval
    wall = max(time.perf_counter() - self._start, 1e-9)
    sums: collections.Counter = collections.Counter()
    for m in host:
      sums.update({k: float(v) for k, v in m.items()})
    tokens = max(sums.pop("tokens", 0.0), 1.0)
    out = {f"train/{name.removesuffix('_sum')}": value / tokens for name, value in sums.items()
           if name.endswith("_sum")}
    out.update({f"train/{name}": value / len(host) for name, value in sums.items()
                if not name.endswith("_sum")})
    out["perf/tokens_per_s"] = self._tokens / wall
    out["perf/teacher_wait_fraction"] = self._waited / wall
    out["perf/step_time_s"] = wall / max(len(host), 1)
    out["teacher/fallback_batches"] = float(self._fallbacks)
    self.reset()
    return out
