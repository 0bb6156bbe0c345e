"""Pieces shared by the benchmarks: teacher targets served from memory."""

from __future__ import annotations

from student_trainer.sources.base import TeacherSource


class InMemorySource(TeacherSource):
  """A teacher source answering from a list of precomputed targets, in order (no eval targets)."""

  def __init__(self, targets):
    self._targets = list(targets)

  def submit(self, batch, temperature, states=None):
    del batch, temperature, states

  def next(self):
    return self._targets.pop(0)

  def compute(self, batch, temperature, states=None):
    del batch, temperature, states

  def close(self):
    self._targets = []


def measured_intervals(run_dir, log_every: int) -> tuple[list[dict], list[float], float]:
  """The logged intervals of a run after the first (which holds compilation): (rows, wall of each, total wall)."""
  from student_trainer.metrics import read_metrics
  rows = [r for r in read_metrics(run_dir) if "perf/tokens_per_s" in r][1:]
  walls = [r["perf/step_time_s"] * log_every for r in rows]
  return rows, walls, sum(walls)


def weighted(rows: list[dict], walls: list[float], wall: float, key: str) -> float:
  """The wall-time-weighted mean of `key` over measured intervals."""
  return sum(r[key] * w for r, w in zip(rows, walls)) / wall


def precompute_targets(cfg, steps: int) -> list:
  """The targets of the first `steps` training batches of `cfg`, from the source it names."""
  import jax

  from distill_core.data import make_iterator
  from distill_core.sharding import make_mesh, rules_table
  from student_trainer.sources import make_source

  teacher = make_source(cfg, make_mesh(cfg.mesh), rules_table(cfg.mesh))
  data = make_iterator(cfg.data, "train")
  targets = []
  try:
    for step in range(steps):
      teacher.submit(next(data), cfg.loss.temperature.value(step))
      targets.append(jax.block_until_ready(teacher.next()))
  finally:
    data.close()
    teacher.close()
  return targets


def run_from_memory(cfg, targets: list, stop_after: int | None = None) -> None:
  """Trains `cfg` with `targets` handed to the train loop from memory: the upper bound of any source."""
  from student_trainer import train
  original = train.make_source
  train.make_source = lambda *a, **kw: InMemorySource(targets)  # the trainer's only source hook
  try:
    train.run(cfg, stop_after=stop_after)
  finally:
    train.make_source = original
