"""Pieces shared by the benchmarks: interleaved timing rounds and their ratios, teacher targets served from memory."""

from __future__ import annotations

import statistics
from typing import Callable, Mapping, Sequence

import jax

from benchmarks.results import Ratio
from distill_core.data import make_iterator
from distill_core.harness import read_metrics
from distill_core.sharding import make_mesh, rules_table
from student_trainer import train
from student_trainer.sources import make_source
from student_trainer.sources.base import TeacherSource


def interleaved(measurements: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
  """Runs every measurement once per round, in order, for `rounds` rounds (A, B, A, B, ...).

  Two figures timed minutes apart on a shared machine see different neighbours;
  interleaving puts each round's A next to its B, so their ratio compares like
  with like. Returns {name: [value of round 0, round 1, ...]}.
  """
  if rounds < 1:
    raise ValueError(f"rounds must be at least 1, got {rounds}")
  out: dict[str, list[float]] = {name: [] for name in measurements}
  for _ in range(rounds):
    for name, measure in measurements.items():
      out[name].append(float(measure()))
  return out


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float], *, limit: float | None = None,
                 why: str = "") -> Ratio:
  """The median over rounds of numerator[i] / denominator[i], with the lowest and highest round.

  `limit` is the ratio's physical upper bound (`why` says what bounds it). A
  median above it is never recorded as if it were a measured gain: it carries a
  note saying so, whether the rounds' spread reaches below the limit (noise
  between rounds) or every round lies above it (a difference smaller than the
  noise within rounds, or two sides whose setups differ in more than the
  measured work). A benchmark's other figures are kept either way.
  """
  if len(numerator) != len(denominator) or not numerator:
    raise ValueError(f"paired rounds needed, got {len(numerator)} and {len(denominator)} values")
  ratios = [a / b for a, b in zip(numerator, denominator)]
  median, low, high = statistics.median(ratios), min(ratios), max(ratios)
  note = None
  if limit is not None and median > limit:
    spread = f"{low:.3g} to {high:.3g} over {len(ratios)} rounds"
    if low <= limit:
      note = (f"median {median:.3g} is above the physical limit {limit} ({why}), within the rounds' spread "
              f"({spread}): measurement noise of a shared machine; the true ratio is at most {limit}")
    else:
      note = (f"median {median:.3g} and every round ({spread}) are above the physical limit {limit} ({why}): "
              f"not a gain; the two sides differ by less than this machine's noise within a round, or their "
              f"setups differ in more than the measured work")
  return Ratio(value=median, low=low, high=high, rounds=len(ratios), limit=limit, note=note)


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
  rows = read_metrics(run_dir, "perf/tokens_per_s")[1:]
  walls = [r["perf/step_time_s"] * log_every for r in rows]
  return rows, walls, sum(walls)


def weighted(rows: list[dict], walls: list[float], wall: float, key: str) -> float:
  """The wall-time-weighted mean of `key` over measured intervals."""
  return sum(r[key] * w for r, w in zip(rows, walls)) / wall


def precompute_targets(cfg, steps: int) -> list:
  """The targets of the first `steps` training batches of `cfg`, from the source it names."""
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
  original = train.make_source
  train.make_source = lambda *a, **kw: InMemorySource(targets)  # the trainer's only source hook
  try:
    train.run(cfg, stop_after=stop_after)
  finally:
    train.make_source = original
