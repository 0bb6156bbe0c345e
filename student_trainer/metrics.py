"""Metrics: the step window (token-weighted means, throughput, teacher waits), sinks (JSONL,
TensorBoard, a rich progress bar or timestamped log lines), and the example-id debug log."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
from tensorboardX import SummaryWriter

from distill_core.progress import ProgressBar

log = logging.getLogger(__name__)

# Shown in the progress bar, in this order, when present.
_BAR_KEYS = ("train/total_loss", "train/ce_loss", "train/kd_loss", "perf/tokens_per_s",
             "perf/teacher_wait_fraction", "teacher/window_occupancy", "teacher/latency_ms_p95",
             "teacher/fallbacks_total")


class MetricsWriter:
  """Writes scalar metrics to JSONL and TensorBoard (each optional); `distill_core.harness.read_metrics` reads
  the JSONL back."""

  def __init__(self, run_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True):
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(run_dir / "metrics.jsonl", "a") if jsonl else None
    self._tb = None
    if tensorboard:
      self._tb = SummaryWriter(str(run_dir / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    clean = {k: float(v) for k, v in metrics.items()}
    if self._jsonl:
      record = {"step": step, "time": time.time(),
                **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if self._tb:
      for key, value in clean.items():
        self._tb.add_scalar(key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None
    if self._tb:
      self._tb.close()
      self._tb = None


class ProgressDisplay:
  """The training progress (step, losses, tokens/s, ETA): a bar on a terminal when `enabled`, otherwise a log
  line at every logged step (`distill_core.progress`)."""

  def __init__(self, total: int, start: int = 0, *, enabled: bool = True, description: str = "step"):
    self._bar = ProgressBar(bar=enabled, log_every_s=float("inf"), logger=log)
    self._task = self._bar.add_task(description, total=total, completed=start)

  @staticmethod
  def summary(metrics: Mapping[str, float]) -> str:
    parts = []
    for key in _BAR_KEYS:
      if key in metrics:
        name = key.split("/", 1)[1]
        value = metrics[key]
        parts.append(f"{name}={value:.0f}" if key == "perf/tokens_per_s" else f"{name}={value:.4g}")
    return " ".join(parts)

  def update(self, step: int, metrics: Mapping[str, float] | None = None) -> None:
    info = self.summary(metrics) if metrics else None
    self._bar.update(self._task, completed=step, info=info, log=bool(info))

  def close(self) -> None:
    self._bar.close()


def token_means(rows: Iterable[Mapping[str, float]], prefix: str) -> dict[str, float]:
  """Means over host metric rows: each `<name>_sum` divided by the `tokens` of the rows that have it.

  A CE-only step (a teacher fallback) has no `kd_loss_sum` or `teacher_tail_mass_sum`, so those
  means count only the tokens that had teacher targets; other values (grad_norm, the schedules)
  are averaged over the rows that have them.
  """
  sums: collections.Counter = collections.Counter()
  tokens: collections.Counter = collections.Counter()
  counts: collections.Counter = collections.Counter()
  for row in rows:
    row_tokens = float(row.get("tokens", 0.0))
    for key, value in row.items():
      if key == "tokens":
        continue
      sums[key] += float(value)
      counts[key] += 1
      if key.endswith("_sum"):
        tokens[key] += row_tokens
  return {(prefix + key.removesuffix("_sum")) if key.endswith("_sum") else prefix + key:
          (value / max(tokens[key], 1.0) if key.endswith("_sum") else value / counts[key])
          for key, value in sums.items()}


class DeviceClock:
  """When each dispatched step's result is ready, noted by a watcher thread.

  JAX dispatches asynchronously: the loop can block on the teacher while the
  device still runs the previous step. Knowing when that step finished tells how
  long the DEVICE idled for the teacher, not only how long the host waited.
  """

  def __init__(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="step-ready")

  @staticmethod
  def _ready(leaf) -> float:
    jax.block_until_ready(leaf)
    return time.perf_counter()

  def track(self, leaf) -> concurrent.futures.Future:
    """A future of the perf_counter time at which `leaf` (a step output) was ready."""
    return self._pool.submit(self._ready, leaf)

  def close(self) -> None:
    self._pool.shutdown(wait=True)


class StepWindow:
  """Accumulates step metrics between log points (token-weighted losses, throughput, waits).

  Throughput is wall time between log points after a device sync, so asynchronous dispatch
  cannot make steps look faster than they are. Two teacher-wait figures:

  * `perf/teacher_wait_fraction`: the share of wall time the student's device idled waiting for
    the teacher, i.e. each wait counted only from when the previous step's result was ready;
  * `perf/teacher_host_wait_fraction`: the share the host loop was blocked in `next()`, also
    while the device was still busy with the previous step (an upper bound of the former).

  Steps whose loss or gradient was not finite (skipped on the device) are left out of the
  means and counted in `train/nonfinite_steps`.
  """

  def __init__(self, clock: DeviceClock):
    self._clock = clock
    self._previous_ready: concurrent.futures.Future | None = None  # the last step of the last window
    self.nonfinite_total = 0
    self.reset()

  def reset(self) -> None:
    self._pending: list[tuple[int, Any]] = []
    self._waits: list[tuple[float, float, concurrent.futures.Future]] = []
    self._tokens = 0
    self._fallbacks = 0
    self._start = time.perf_counter()

  def add(self, step: int, metrics, *, tokens: int, wait: tuple[float, float], fallback: bool) -> None:
    """`wait`: perf_counter times at which the loop started and stopped waiting for the teacher."""
    self._pending.append((step, metrics))
    self._waits.append((*wait, self._clock.track(metrics["tokens"])))
    self._tokens += tokens
    self._fallbacks += int(fallback)

  def _idle(self) -> tuple[float, float]:
    """(device idle for the teacher, host blocked on the teacher) over the window, in seconds."""
    idle = host = 0.0
    previous = self._previous_ready
    for start, end, ready in self._waits:
      free_from = start if previous is None else max(start, previous.result())
      idle += max(0.0, end - free_from)
      host += end - start
      previous = ready
    self._previous_ready = previous
    return idle, host

  def flush(self) -> dict[str, float]:
    host_rows = jax.device_get([m for _, m in self._pending])  # one device sync per log interval
    wall = max(time.perf_counter() - self._start, 1e-9)
    good, bad_steps = [], []
    for (step, _), row in zip(self._pending, host_rows):
      finite = bool(row.pop("finite", True))
      (good.append(row) if finite else bad_steps.append(step))
    out = token_means(good, "train/")
    if bad_steps:
      self.nonfinite_total += len(bad_steps)
      log.warning("non-finite loss or gradient at step(s) %s: skipped, the model is unchanged by them "
                  "(%d so far; optim.on_nonfinite=stop ends the run instead)",
                  ", ".join(str(s + 1) for s in bad_steps), self.nonfinite_total)
    idle, blocked = self._idle()
    out["train/nonfinite_steps"] = float(len(bad_steps))
    out["perf/tokens_per_s"] = self._tokens / wall
    out["perf/teacher_wait_fraction"] = min(idle / wall, 1.0)
    out["perf/teacher_host_wait_fraction"] = min(blocked / wall, 1.0)
    out["perf/step_time_s"] = wall / max(len(host_rows), 1)
    out["teacher/fallback_batches"] = float(self._fallbacks)
    self.reset()
    return out


_EXAMPLE_IDS = "example_ids.jsonl"


class ExampleIdLog:
  """`<run_dir>/example_ids.jsonl`: one `{"step": s, "ids": [...]}` line per trained step (on disk).

  After a crash, the steps trained since the last checkpoint are trained again on resume and
  appear twice; the later line is the one the model saw last (`read_example_ids` keeps it).
  """

  def __init__(self, run_dir: str | Path):
    self._file = open(Path(run_dir) / _EXAMPLE_IDS, "a")  # noqa: SIM115 - closed in close()

  def write(self, step: int, example_ids) -> None:
    self._file.write(json.dumps({"step": step, "ids": [int(x) for x in example_ids]}) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_example_ids(run_dir: str | Path) -> list[list[int]]:
  """Example ids of each trained step of `run_dir`, in step order (the last line per step wins)."""
  path = Path(run_dir) / _EXAMPLE_IDS
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no example-id log (run with logging.example_ids=true)")
  by_step = {}
  for line in path.read_text().splitlines():
    record = json.loads(line)
    by_step[record["step"]] = record["ids"]
  return [by_step[s] for s in sorted(by_step)]
