"""The teacher-source registry: declared capabilities drive the train loop's fallback handling."""

from __future__ import annotations

import collections

import pytest

from distill_core.config import load_config
from student_trainer import train
from student_trainer.config import TrainConfig
from student_trainer.sources import SourceKind
from student_trainer.sources import registry
from student_trainer.sources.base import TeacherSource




class CEOnlySource(TeacherSource):
  """Answers every batch with None (for the tests below, registered under several names)."""

  def __init__(self):
    self._pending = collections.deque()

  @classmethod
  def create(cls, *, student, mesh, rules, interrupt):
    del student, mesh, rules, interrupt
    return cls()

  def submit(self, batch, temperature, states=None):
    self._pending.append(None)

  def next(self):
    return self._pending.popleft()

  def compute(self, batch, temperature, states=None):
    return None


@pytest.mark.parametrize("capabilities", [dict(teacher=True, may_fall_back=True, falls_back_per_process=True),
                                          dict(teacher=False)])
def test_declared_capabilities_decide_the_fallback_handling(tiny_dataset, tmp_path, monkeypatch, capabilities):
  name = "ce_only_test_source"
  kind = SourceKind(name, f"{__name__}:CEOnlySource", **capabilities)
  monkeypatch.setitem(registry._KINDS, name, kind)  # noqa: SLF001 - registered for this test only
  monkeypatch.setattr(CEOnlySource, "name", name)
  compiled_ahead, agreed = [], []

  class Spy(train._FallbackStep):  # noqa: SLF001 - records whether the CE-only step is compiled ahead
    def __init__(self, programs, *, ahead: bool):
      super().__init__(programs, ahead=ahead)
      compiled_ahead.append(ahead)

  monkeypatch.setattr(train, "_FallbackStep", Spy)
  real_agree = train.distributed.agree_targets
  monkeypatch.setattr(train.distributed, "agree_targets", lambda t, step: agreed.append(step) or real_agree(t, step))
  cfg = load_config(TrainConfig, None, [
      f"run_dir={tmp_path}", f"data.path={tiny_dataset}", "data.batch_size=8", "steps=2", "logging.every_steps=2",
      "logging.progress=false", "logging.tensorboard=false", "eval.batches=1", "checkpoint.async_save=false",
      "export_hf=false", "mesh.data=1", f"teacher.source={name}"])
  result = train.run(cfg)
  assert result.step == 2
  assert compiled_ahead == [kind.may_fall_back]
  assert result.last_metrics["teacher/fallback_batches"] == (2.0 if kind.teacher else 0.0)
  assert agreed == ([0, 1, 2] if kind.falls_back_per_process else [])  # two steps and the final evaluation
