"""Metrics sinks: JSONL, TensorBoard event files, and a rich progress bar."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Mapping

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)

# Shown in the progress bar, in this order, when present.
_BAR_KEYS = ("train/total_loss", "train/ce_loss", "train/kd_loss", "perf/tokens_per_s",
             "perf/teacher_wait_fraction", "teacher/window_occupancy", "teacher/latency_ms_p95",
             "teacher/fallbacks_total")


class MetricsWriter:
  """Writes scalar metrics to JSONL and TensorBoard (each optional)."""

  def __init__(self, run_dir: str | Path, *, jsonl: bool = True, tensorboard: bool = True):
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(run_dir / "metrics.jsonl", "a") if jsonl else None
    self._tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter
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
  """A rich progress bar (step, losses, tokens/s, ETA); plain log lines when not on a terminal."""

  def __init__(self, total: int, start: int = 0, *, enabled: bool = True, description: str = "train"):
    self._console = Console(stderr=True)
    self._live = enabled and self._console.is_terminal
    self._progress = None
    if self._live:
      self._progress = Progress(
          TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
          TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
          console=self._console, transient=False)
      self._task = self._progress.add_task(description, total=total, completed=start, info="")
      self._progress.start()
    self._total = total

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
    if self._progress is not None:
      kwargs = {"info": info} if info is not None else {}
      self._progress.update(self._task, completed=step, **kwargs)
    elif info:
      log.info("step %d/%d %s", step, self._total, info)

  def close(self) -> None:
    if self._progress is not None:
      self._progress.stop()
      self._progress = None
