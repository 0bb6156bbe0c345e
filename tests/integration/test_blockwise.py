"""Blockwise parallel distillation end to end: local runs across the phase switch and their resume, against a
teacher server process, and from offline shards with layer states."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from distill_core.model.transformer import create_model
from student_trainer.blockwise import FROZEN_IN_BLOCKWISE
from student_trainer.config import TrainConfig

# ---------------------------------------------------------------- training (local teacher)


def local_run_cfg(dataset, run_dir, *overrides) -> TrainConfig:
  from integration.test_trainer import make_cfg
  return make_cfg(dataset, run_dir, "teacher.source=local", "teacher.local.model=tiny", "teacher.local.seed=3",
                  "loss.blockwise=true", "loss.top_k=8", "optim.learning_rate=1e-2", "logging.every_steps=1",
                  "optim.warmup_steps=0", *overrides)


def test_local_blockwise_then_kd_in_one_run(tiny_dataset, tmp_path, caplog):
  import logging
  from student_trainer.train import run
  from integration.test_trainer import read_jsonl
  cfg = local_run_cfg(tiny_dataset, tmp_path / "run", "steps=8", "loss.blockwise_steps=5", "loss.beta=0.5",
                      "eval.every_steps=5")
  caplog.set_level(logging.INFO, logger="student_trainer.train")
  result = run(cfg, keep_state=True)
  phases = [r.getMessage() for r in caplog.records if "phase" in r.getMessage() and r.name == "student_trainer.train"]
  assert len(phases) == 2 and phases[0].startswith("step 1: blockwise phase for steps 1-5"), phases
  assert phases[1].startswith("step 6: blockwise phase over, ordinary KD from now on"), phases
  rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/total_loss" in r]
  assert [r["train/blockwise"] for r in rows] == [1.0] * 5 + [0.0] * 3
  for r in rows[:5]:  # blockwise: only the feature loss is optimised, CE and KD are logged
    assert r["train/total_loss"] == pytest.approx(r["train/feature_loss"], rel=1e-6)
    assert np.isfinite(r["train/ce_loss"]) and np.isfinite(r["train/kd_loss"])
  assert rows[4]["train/feature_loss"] < rows[0]["train/feature_loss"]  # the blocks learn
  for r in rows[5:]:  # KD: alpha * kd + (1 - alpha) * ce + beta * feature
    want = 0.5 * r["train/kd_loss"] + 0.5 * r["train/ce_loss"] + 0.5 * r["train/feature_loss"]
    assert r["train/total_loss"] == pytest.approx(want, rel=1e-5)
  evals = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval/ce_loss" in r]
  assert len(evals) == 2 and "eval/chained_feature_loss" not in evals[0]  # step 5 evaluates the KD objective
  assert result.compilations == {"blockwise": 1, "kd": 1}  # the switch compiles the one new program only


def test_blockwise_steps_leave_everything_but_attention_unchanged(tiny_dataset, tmp_path):
  from student_trainer.train import run
  from integration.test_trainer import read_jsonl
  cfg = local_run_cfg(tiny_dataset, tmp_path / "run", "steps=3", "eval.every_steps=0", "optim.weight_decay=0.5")
  before = create_model(cfg.model, seed=cfg.seed)
  after = run(cfg, keep_state=True).state.model()
  frozen = lambda m: dict(nnx.to_flat_state(nnx.state(m, FROZEN_IN_BLOCKWISE)))
  attention = lambda m: dict(nnx.to_flat_state(nnx.state(m, nnx.All(nnx.Param, nnx.PathContains("self_attn")))))
  for path, var in frozen(before).items():  # eager vs jitted init differ by rounding; decay would move 0.5 %/step
    np.testing.assert_allclose(np.asarray(frozen(after)[path][...]), np.asarray(var[...]), rtol=1e-6, atol=1e-7,
                               err_msg=str(path))
  moved = [p for p, v in attention(before).items() if not np.array_equal(attention(after)[p][...], v[...])]
  assert len(moved) == len(attention(before))
  last = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
  assert {"eval/feature_loss", "eval/chained_feature_loss", "eval/ce_loss", "eval/kd_loss"} <= set(last)


def test_resume_across_the_switch_is_bitwise_identical(tiny_dataset, tmp_path):
  """Stopped in the blockwise phase and resumed from its checkpoint: the same KD phase, the same student."""
  from student_trainer.train import run
  from integration.test_trainer import params_of
  schedule = ("steps=6", "loss.blockwise_steps=4", "checkpoint.every_steps=2", "eval.every_steps=0")
  straight = run(local_run_cfg(tiny_dataset, tmp_path / "a", *schedule), keep_state=True)
  cfg = local_run_cfg(tiny_dataset, tmp_path / "b", *schedule)
  first = run(cfg, stop_after=2)
  second = run(cfg, keep_state=True)
  assert (first.step, second.step) == (2, 6) and second.compilations == {"blockwise": 1, "kd": 1}
  assert len((second.run_dir / "example_ids.jsonl").read_text().splitlines()) == 6  # none trained twice
  assert second.trained_example_ids == straight.trained_example_ids
  for a, b in zip(params_of(straight), params_of(second), strict=True):
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- end to end: a real teacher server process


def served_state_tokens(metrics_url: str) -> dict[tuple[str, str], float]:
  import re
  import urllib.request
  text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
  found = re.findall(r'^teacher_state_tokens_total\{layer="(\d+)",state="(\w+)"\} (\S+)$', text, re.MULTILINE)
  return {(state, layer): float(value) for layer, state, value in found}


def test_blockwise_against_a_teacher_server_then_kd(tiny_dataset, tmp_path):
  """A 1-layer student reads teacher layer 1 only; blockwise for 6 steps, then KD in the same run."""
  from server_utils import ServerProcess
  from remote_utils import wait_serving
  from integration.test_trainer import make_cfg, read_jsonl
  from student_trainer.train import run
  server = ServerProcess(["model.source=preset", "model.preset=tiny", "model.seed=3", "batcher.buckets=[[8,32]]",
                          "limits.max_k=16", "batcher.max_wait_ms=2", f"tokenizer_path={tiny_dataset}/tokenizer.json"],
                         tmp_path / "teacher.log")
  try:
    wait_serving(server)
    cfg = make_cfg(tiny_dataset, tmp_path / "run", "teacher.source=remote", f"teacher.remote.address={server.address}",
                   "teacher.remote.window=2", "teacher.remote.timeout_s=120", "model={preset: tiny, num_hidden_layers: 1}",
                   "loss.layer_map=[1]", "loss.blockwise=true", "loss.blockwise_steps=6", "loss.beta=0.5",
                   "loss.top_k=8", "steps=9", "logging.every_steps=1", "optim.learning_rate=1e-2",
                   "optim.warmup_steps=0", "eval.batches=1")
    result = run(cfg)
    served = served_state_tokens(server.metrics_url)
  finally:
    server.stop()
  rows = [r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "train/total_loss" in r]
  assert [r["train/blockwise"] for r in rows] == [1.0] * 6 + [0.0] * 3
  assert rows[5]["train/feature_loss"] < 0.9 * rows[0]["train/feature_loss"]  # the block learns
  assert all(np.isfinite(r["train/kd_loss"]) for r in rows) and result.compilations == {"blockwise": 1, "kd": 1}
  assert set(served) == {("attn_in", "1"), ("attn_out", "1")}  # the mapped layer only
  batch_tokens = 8 * 32
  assert served[("attn_in", "1")] == 6 * batch_tokens  # attn_in for the blockwise steps only
  assert served[("attn_out", "1")] == (9 + 1) * batch_tokens  # every step (beta > 0 after the switch) and the eval
  assert "eval/ce_loss" in result.last_metrics


# ---------------------------------------------------------------- offline shards with layer states


def test_blockwise_from_offline_shards_matches_the_local_teacher(small_dataset, tmp_path):
  import shutil
  from offline_utils import edit_manifest, jsonl, local_cfg, run_dump, train_cfg as offline_train_cfg
  from distill_core.sharding import make_mesh, rules_table
  from student_trainer.sources import make_source
  from student_trainer.sources.offline import AnswersMismatch
  from student_trainer.train import run
  dump = tmp_path / "dump"
  run_dump(small_dataset, dump, "states=[attn_in,attn_out]", "temperatures=[1.0]", log_path=tmp_path / "dump.log")
  schedule = ("loss.blockwise=true", "loss.blockwise_steps=2")
  offline = run(offline_train_cfg(small_dataset, tmp_path / "offline", "teacher.source=offline",
                                  f"teacher.offline.path={dump}", *schedule, steps=4))
  local = run(local_cfg(small_dataset, tmp_path / "local", *schedule, steps=4))
  rows = [[r for r in jsonl(res.run_dir / "metrics.jsonl") if "train/total_loss" in r] for res in (offline, local)]
  assert [r["train/blockwise"] for r in rows[0]] == [1.0, 1.0, 0.0, 0.0]
  for a, b in zip(*rows, strict=True):
    for key in ("train/feature_loss", "train/kd_loss", "train/ce_loss", "train/total_loss"):
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (key, a["step"])
  cfg = offline_train_cfg(small_dataset, tmp_path / "bad", "teacher.source=offline", f"teacher.offline.path={dump}",
                          *schedule)
  mesh = make_mesh(cfg.mesh)
  for change, message in ((dict(spec__request__states=["attn_out"]),
                           r"spec.states: stored \['attn_out'\], the losses need \['attn_in', 'attn_out'\]"),
                          (dict(teacher__hidden_size=64), r"model.hidden_size is 32 and teacher.offline.path=.*"
                                                          r"teacher.hidden_size is 64")):
    shutil.rmtree(tmp_path / "edited", ignore_errors=True)
    shutil.copytree(dump, tmp_path / "edited")
    edit_manifest(tmp_path / "edited", **change)
    with pytest.raises(ValueError, match=message):
      make_source(cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={
          "offline": cfg.teacher.offline.model_copy(update={"path": str(tmp_path / "edited")})})}),
          mesh, rules_table(cfg.mesh))
