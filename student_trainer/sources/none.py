"""No teacher: plain next-token training (also how the demo pretrains its teacher)."""

from __future__ import annotations

import collections

from distill_core.data import Batch
from student_trainer.sources.base import TeacherSource


class NoTeacher(TeacherSource):
  """Answers every batch with None, so the step computes cross-entropy only."""

  name = "none"

  @classmethod
  def create(cls, *, student, mesh, rules, interrupt) -> "NoTeacher":
    """The registry's constructor (`registry.py`): nothing to read."""
    del student, mesh, rules, interrupt
    return cls()

  def __init__(self):
    self._pending: collections.deque[None] = collections.deque()

  def submit(self, batch: Batch, temperature: float, states=None) -> None:
    del batch, temperature, states
    self._pending.append(None)

  def compute(self, batch: Batch, temperature: float, states=None) -> None:
    del batch, temperature, states

  def next(self) -> None:
    if not self._pending:
      raise RuntimeError("next() called with no submitted batch")
    return self._pending.popleft()
