"""On-policy steps in training runs: submissions to the teacher in step order with their scored ids,
bit-exact resume, and off-policy runs unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from on_policy_utils import make_cfg, metric_rows, params_of

import student_trainer.train as train
from student_trainer import sources
from student_trainer.checkpoint import Checkpointer


class RecordingSource:
  """Wraps a source and notes every submission (step order, kwargs)."""

  def __init__(self, inner):
    self.inner, self.calls = inner, []
    self.lookahead = inner.lookahead

  def submit(self, batch, temperature, **kwargs):
    self.calls.append((np.asarray(batch.example_ids).copy(), np.asarray(batch.loss_mask).copy(), kwargs))
    self.inner.submit(batch, temperature, **kwargs)

  def __getattr__(self, name):
    return getattr(self.inner, name)


def test_generated_batches_reach_the_teacher_in_step_order_with_the_ids_to_score(tiny_dataset, tmp_path,
                                                                                  monkeypatch):
  """Submissions follow the steps; a generated batch carries scored ids (column 0 its targets, then the
  student's top-k) when the loss needs them, and its loss mask covers generated tokens only."""
  recorded = []
  original = sources.make_source

  def recording(*args, **kwargs):
    recorded.append(RecordingSource(original(*args, **kwargs)))
    return recorded[-1]

  monkeypatch.setattr(train, "make_source", recording)
  cfg = make_cfg(tiny_dataset, tmp_path / "run", "loss.on_policy_fraction=0.5", "generation.score_student_topk=2",
                 "generation.staleness=2", "steps=5", "loss.kd_mode=reverse_kl")
  result = train.run(cfg)
  assert result.step == 5
  calls = recorded[0].calls
  assert [ids.tolist() for ids, _, _ in calls] == result.trained_example_ids  # once each, in step order
  for step, (_, mask, kwargs) in enumerate(calls):
    if cfg.loss.on_policy_at(step):
      ids = kwargs["part_inputs"]["scored.ids"]
      assert list(kwargs["part_inputs"]) == ["scored.ids"] and ids.shape == (8, 32, 3) and ids.dtype == np.int32
      assert mask.sum() <= 8 * 16  # generated tokens only
    else:
      assert "part_inputs" not in kwargs


@pytest.mark.parametrize("fraction,staleness,mode", [(1.0, 1, "tail"), (0.5, 2, "tail"), (0.5, 2, "reverse_kl")])
def test_resume_is_bitwise_identical_with_on_policy_steps(tiny_dataset, tmp_path, fraction, staleness, mode):
  """Straight vs stopped at step 3 and resumed: the same parameters bit for bit and the same per-step losses;
  the batches sampled before the stop come back from the checkpoint (with kd_mode reverse_kl: with the
  sampler's log mu the importance weights read)."""
  opts = (f"loss.on_policy_fraction={fraction}", f"generation.staleness={staleness}", "generation.seed=7",
          "generation.score_student_topk=2", f"loss.kd_mode={mode}", "generation.temperature=0.9",
          "generation.top_p=0.95")
  straight = train.run(make_cfg(tiny_dataset, tmp_path / "a", *opts), keep_state=True)
  cfg_b = make_cfg(tiny_dataset, tmp_path / "b", *opts)
  assert train.run(cfg_b, stop_after=3).step == 3
  pending = Checkpointer(tmp_path / "b" / "checkpoints", keep=1)
  saved = pending.restore_generated(3)
  pending.close()
  assert sorted(saved["steps"].tolist()) == [m for m in range(3, 3 + staleness) if cfg_b.loss.on_policy_at(m)]
  resumed = train.run(cfg_b, keep_state=True)
  assert resumed.step == 6 and resumed.trained_example_ids == straight.trained_example_ids
  for a, b in zip(params_of(straight), params_of(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  keys = ("train/total_loss", "train/ce_loss", "train/kd_loss", "onpolicy/sample_length", "onpolicy/staleness",
          "train/reverse_kl", "train/importance_weight")
  rows_a = {r["step"]: r for r in metric_rows(tmp_path / "a") if "train/total_loss" in r}
  rows_b = {r["step"]: r for r in metric_rows(tmp_path / "b") if "train/total_loss" in r}
  assert sorted(rows_a) == sorted(rows_b) == list(range(1, 7))
  for step in rows_a:
    assert {k: rows_a[step].get(k) for k in keys} == {k: rows_b[step].get(k) for k in keys}, step
  on = [r for r in rows_a.values() if "onpolicy/staleness" in r]
  assert len(on) == sum(cfg_b.loss.on_policy_at(m) for m in range(6))
  assert all(0 < r["onpolicy/sample_length"] <= 16 and 0 <= r["onpolicy/stopped_fraction"] <= 1 for r in on)
  assert all(0 <= r["perf/generation_fraction"] <= 1 for r in rows_a.values())
  assert on[-1]["onpolicy/staleness"] == staleness  # later steps: exactly s steps old
  if mode == "reverse_kl":
    assert all(np.isfinite(r["train/reverse_kl"]) and r["train/importance_weight"] > 0 for r in on)
    assert saved["sampler_logprobs"].shape == saved["logprobs"].shape


@pytest.mark.parametrize("estimator", ["sampled", "union"])
def test_a_reverse_kl_run_scores_the_samples_with_the_local_teacher(tiny_dataset, tmp_path, estimator):
  """kd_mode reverse_kl against the in-process teacher: on-policy steps train on its scores at the sampled ids
  (no CE), corpus steps on the off-policy KD with CE; the teacher's reverse KL of the samples is logged."""
  cfg = make_cfg(tiny_dataset, tmp_path / "run", "loss.on_policy_fraction=0.5", "loss.kd_mode=reverse_kl",
                 f"loss.reverse_kl_estimator={estimator}", "generation.score_student_topk=2", "steps=4")
  result = train.run(cfg)
  assert result.step == 4 and result.compilations == {"kd": 2}  # one program per kind of batch
  rows = {r["step"]: r for r in metric_rows(tmp_path / "run") if "train/total_loss" in r}
  for step, row in rows.items():
    on = cfg.loss.on_policy_at(step - 1)
    assert ("train/reverse_kl" in row) == on and ("train/ce_loss" in row) == (not on), (step, sorted(row))
    assert np.isfinite(row["train/total_loss"])
    if on:
      assert row["train/total_loss"] == pytest.approx(row["train/kd_loss"])
      assert ("train/importance_weight" in row) == (estimator == "sampled")
      assert ("train/union_support" in row) == (estimator == "union")


def test_off_policy_runs_are_unchanged(tiny_dataset, tmp_path):
  """on_policy_fraction 0 trains exactly what a config without it trains, with no on-policy metric or item."""
  a = train.run(make_cfg(tiny_dataset, tmp_path / "a", "steps=3", "checkpoint.every_steps=3"), keep_state=True)
  b = train.run(make_cfg(tiny_dataset, tmp_path / "b", "steps=3", "checkpoint.every_steps=3", "generation.seed=9",
                   "generation.staleness=3"), keep_state=True)
  for x, y in zip(params_of(a), params_of(b), strict=True):
    np.testing.assert_array_equal(x, y)
  assert not any(k.startswith("onpolicy/") for r in metric_rows(tmp_path / "a") for k in r)
  assert not (tmp_path / "a" / "checkpoints" / "3" / "generated").exists()
