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
