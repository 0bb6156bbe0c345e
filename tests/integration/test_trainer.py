"""Student trainer: runs with each source, resume is exact, accumulation is exact, SIGTERM checkpoints."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from distill_core.config import load_config
from student_trainer.config import TrainConfig
from student_trainer.train import run


def make_cfg(dataset, run_dir, *overrides) -> TrainConfig:
  base = [f"run_dir={run_dir}", f"data.path={dataset}", "data.batch_size=8", "steps=6",
          "logging.every_steps=2", "logging.progress=false", "logging.tensorboard=false",
          "eval.every_steps=0", "eval.batches=2", "checkpoint.every_steps=3", "checkpoint.async_save=false",
          "export_hf=false", "mesh.data=1", "optim.warmup_steps=2", "logging.example_ids=true"]
  return load_config(TrainConfig, None, base + list(overrides))


def params_of(result) -> list[np.ndarray]:
  model = result.state.model()
  from flax import nnx
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def read_jsonl_lines(run_dir):
  """Every line of the run's example-id log (a step trained twice would appear twice)."""
  return read_jsonl(run_dir / "example_ids.jsonl")


def test_none_source_trains_and_logs(tiny_dataset, tmp_path):
  cfg = make_cfg(tiny_dataset, tmp_path / "run", "steps=12", "optim.learning_rate=1e-2", "logging.every_steps=4",
                 "logging.tensorboard=true")
  result = run(cfg)
  assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
  assert result.step == 12 and not result.preempted
  rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/ce_loss" in r]
  assert [r["step"] for r in rows] == [4, 8, 12]
  assert rows[-1]["train/ce_loss"] < rows[0]["train/ce_loss"]  # learning happens
  assert "train/kd_loss" not in rows[0]
  assert "eval/ce_loss" in result.last_metrics
  assert rows[0]["perf/tokens_per_s"] > 0


def test_final_student_exports_to_hugging_face_and_initialises_a_run(tiny_dataset, tmp_path):
  from flax import nnx
  from distill_core.model.hf import load_hf_checkpoint
  result = run(make_cfg(tiny_dataset, tmp_path / "run", "steps=2", "export_hf=true"), keep_state=True)
  exported = load_hf_checkpoint(tmp_path / "run" / "hf")
  assert (tmp_path / "run" / "hf" / "tokenizer.json").read_bytes() == (tiny_dataset / "tokenizer.json").read_bytes()
  for a, b in zip(params_of(result), [np.asarray(x) for x in jax.tree.leaves(nnx.state(exported, nnx.Param))],
                  strict=True):
    np.testing.assert_array_equal(a, b)
  follow = run(make_cfg(tiny_dataset, tmp_path / "next", "steps=1", f"init_hf_checkpoint={tmp_path / 'run' / 'hf'}",
                        "checkpoint.resume=false"))
  assert follow.step == 1


def test_local_teacher_distills(tiny_dataset, tmp_path):
  cfg = make_cfg(tiny_dataset, tmp_path / "run", "teacher.source=local", "teacher.local.model=tiny",
                 "teacher.local.seed=3", "loss.alpha=1.0", "loss.top_k=16", "steps=8", "optim.learning_rate=1e-2")
  result = run(cfg)
  rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/kd_loss" in r]
  assert rows and all(np.isfinite(r["train/kd_loss"]) for r in rows)
  assert rows[-1]["train/kd_loss"] < rows[0]["train/kd_loss"]
  assert 0 < rows[0]["train/teacher_tail_mass"] < 1
  assert "eval/kd_loss" in result.last_metrics


def test_resume_is_bitwise_identical(tiny_dataset, tmp_path):
  straight = run(make_cfg(tiny_dataset, tmp_path / "a", "teacher.source=local", "teacher.local.model=tiny",
                          "loss.top_k=8"), keep_state=True)
  cfg_b = make_cfg(tiny_dataset, tmp_path / "b", "teacher.source=local", "teacher.local.model=tiny", "loss.top_k=8")
  first = run(cfg_b, stop_after=3)
  assert first.step == 3
  second = run(cfg_b, keep_state=True)
  assert second.step == 6
  # The same examples in the same order, none repeated or skipped.
  assert len(read_jsonl_lines(second.run_dir)) == 6 and second.trained_example_ids == straight.trained_example_ids
  for a, b in zip(params_of(straight), params_of(second), strict=True):
    np.testing.assert_array_equal(a, b)


def test_grad_accumulation_matches_full_batch(tiny_dataset, tmp_path):
  common = ("teacher.source=local", "teacher.local.model=tiny", "loss.top_k=8", "steps=2", "optim.clip_norm=null")
  full = run(make_cfg(tiny_dataset, tmp_path / "full", *common), keep_state=True)
  accum = run(make_cfg(tiny_dataset, tmp_path / "acc", *common, "optim.grad_accum=4"), keep_state=True)
  for a, b in zip(params_of(full), params_of(accum), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
  assert full.last_metrics["train/total_loss"] == pytest.approx(accum.last_metrics["train/total_loss"], rel=1e-5)


def test_mesh_2x4_matches_single_device(tiny_dataset, tmp_path):
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  common = ("teacher.source=local", "teacher.local.model=tiny", "loss.top_k=8", "steps=2", "model.preset=tiny",
            "model.hidden_size=64",
            "model.intermediate_size=128", "teacher.local.model.hidden_size=64",
            "teacher.local.model.intermediate_size=128")
  one = run(make_cfg(tiny_dataset, tmp_path / "one", *common, "mesh.data=1", "mesh.fsdp=1"), keep_state=True)
  # make_mesh uses the first data*fsdp devices only when they are all devices: pass all 8.
  eight = run(make_cfg(tiny_dataset, tmp_path / "eight", *common, "mesh.data=2", "mesh.fsdp=4"), keep_state=True)
  leaves = jax.tree.leaves(eight.state.params)
  assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated for x in leaves)
  assert one.last_metrics["train/total_loss"] == pytest.approx(eight.last_metrics["train/total_loss"], rel=1e-5)
  for a, b in zip(params_of(one), params_of(eight), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sigterm_checkpoints_and_resume_continues(tiny_dataset, tmp_path, monkeypatch):
  import os
  import signal
  from student_trainer import step as step_lib
  cfg = make_cfg(tiny_dataset, tmp_path / "run", "checkpoint.every_steps=100")
  straight = run(make_cfg(tiny_dataset, tmp_path / "straight"))
  original = step_lib.hyperparameters

  def sigterm_during_step_two(cfg, step):
    if step == 2:  # a real SIGTERM arrives while step index 2 is being prepared
      os.kill(os.getpid(), signal.SIGTERM)
    return original(cfg, step)

  monkeypatch.setattr(step_lib, "hyperparameters", sigterm_during_step_two)
  first = run(cfg)
  assert first.preempted and first.step == 3  # the step in flight finishes, then a checkpoint
  monkeypatch.setattr(step_lib, "hyperparameters", original)
  second = run(cfg)
  assert second.step == 6 and not second.preempted
  assert len(read_jsonl_lines(second.run_dir)) == 6 and second.trained_example_ids == straight.trained_example_ids
