"""kd_mode sampled end to end: a real teacher-server process, the remote and local sources, training."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from integration.test_remote_source import (TEACHER_SEED, jsonl, remote_train_cfg, server_overrides, train_cfg,
                                            wait_serving)
from remote_utils import TeacherProcess, fake_batch
from server_utils import free_port

from distill_core import shards
from distill_core.sharding import make_mesh, rules_table
from student_trainer.sources import make_source

STEPS = 4
SAMPLED = ["loss.kd_mode=sampled", "loss.top_k=4", "loss.num_samples=12", "loss.sample_temperature=1.5",
           "loss.sample_seed=77", "loss.temperature=1.5", f"steps={STEPS}", f"checkpoint.every_steps={STEPS}"]
LOCAL = ["teacher.source=local", "teacher.local.model=tiny", f"teacher.local.seed={TEACHER_SEED}"]


@pytest.fixture(scope="module")
def teacher(tiny_dataset, tmp_path_factory):
  """A teacher server offering up to 16 samples per position."""
  server = TeacherProcess(free_port(), server_overrides(tiny_dataset) + ["limits.max_samples=16"],
                          tmp_path_factory.mktemp("sampled_teacher") / "log")
  yield server
  server.stop()


def test_remote_and_local_sources_draw_the_same_samples(teacher, tiny_dataset, tmp_path):
  """Same seed and example ids: the same sample ids and counts from the server and the in-process teacher;
  another seed draws others."""
  wait_serving(teacher)
  batch = fake_batch(5, rows=8, length=32, vocab=384)
  targets = {}
  for name, extra in (("local", LOCAL), ("remote", ())):
    cfg = (train_cfg(tiny_dataset, tmp_path / name, *LOCAL, *SAMPLED) if name == "local" else
           remote_train_cfg(tiny_dataset, tmp_path / name, [teacher.address], *SAMPLED))
    with make_source(cfg, make_mesh(cfg.mesh), rules_table(cfg.mesh)) as source:
      targets[name] = jax.tree.map(np.asarray, source.compute(batch, 1.5))
  local, remote = targets["local"], targets["remote"]
  assert remote.sample_skip == local.sample_skip == 4 and remote.sample_ids.shape == (8, 32, 12)
  np.testing.assert_array_equal(remote.sample_ids, local.sample_ids)
  np.testing.assert_array_equal(remote.sample_counts, local.sample_counts)
  np.testing.assert_allclose(remote.sample_logits.astype(np.float32), local.sample_logits.astype(np.float32),
                             atol=2e-2)
  np.testing.assert_allclose(remote.sample_logsumexp, local.sample_logsumexp, rtol=1e-4, atol=1e-4)
  assert np.all(remote.sample_counts.sum(-1) == 12)
  # The drawn ids lie outside the exact top-4 (sample_tail) and inside the real vocabulary.
  assert not np.any((remote.sample_ids[..., :, None] == remote.topk_ids[..., None, :4])
                    & (remote.sample_counts[..., :, None] > 0))
  cfg = remote_train_cfg(tiny_dataset, tmp_path / "other", [teacher.address], *SAMPLED, "loss.sample_seed=78")
  with make_source(cfg, make_mesh(cfg.mesh), rules_table(cfg.mesh)) as source:
    other = jax.tree.map(np.asarray, source.compute(batch, 1.5))
  assert not np.array_equal(other.sample_ids, remote.sample_ids)


def test_offline_dump_holds_the_same_samples(teacher, tiny_dataset, tmp_path):
  """A dump through the server stores the samples; the offline source serves exactly the local teacher's,
  and refuses a student whose sampling differs, naming each field."""
  from distill_core.config import load_config
  from distill_core.data import make_iterator
  from student_trainer.sources.offline import AnswersMismatch
  from teacher_server.dump import dump
  from teacher_server.dump_config import DumpConfig
  wait_serving(teacher)
  answers = tmp_path / "answers"
  summary = dump(load_config(DumpConfig, None, [
      f"data={tiny_dataset}", f"output={answers}", "splits=[eval]", "k=4", "temperatures=[1.5]", "num_samples=12",
      "sample_temperature=1.5", "sample_seed=77", "sample_tail=true", "layers=[0,1]", "states=[attn_out]",
      "records_per_shard=64", "progress=false",
      f"remote.address={teacher.address}"]))
  assert summary.manifest is not None and summary.manifest.spec.samples.num_samples == 12
  local_cfg = train_cfg(tiny_dataset, tmp_path / "local", *LOCAL, *SAMPLED)
  offline_cfg = train_cfg(tiny_dataset, tmp_path / "off", "teacher.source=offline",
                          f"teacher.offline.path={answers}", *SAMPLED)
  batch = next(iter(make_iterator(local_cfg.data, "eval")))
  got = {}
  for name, cfg in (("local", local_cfg), ("offline", offline_cfg)):
    with make_source(cfg, make_mesh(cfg.mesh), rules_table(cfg.mesh)) as source:
      got[name] = jax.tree.map(np.asarray, source.compute(batch, 1.5))
  for field in ("sample_ids", "sample_counts", "topk_ids"):
    np.testing.assert_array_equal(got["offline"].__getattribute__(field), got["local"].__getattribute__(field),
                                  err_msg=field)
  np.testing.assert_array_equal(got["offline"].sample_logits, got["local"].sample_logits)
  np.testing.assert_allclose(got["offline"].sample_logsumexp, got["local"].sample_logsumexp, rtol=1e-6)
  assert got["offline"].sample_skip == 4
  other = train_cfg(tiny_dataset, tmp_path / "bad", "teacher.source=offline", f"teacher.offline.path={answers}",
                    *SAMPLED, "loss.num_samples=8", "loss.sample_seed=1")
  with pytest.raises(AnswersMismatch) as e:
    make_source(other, make_mesh(other.mesh), rules_table(other.mesh))
  assert "spec.num_samples: stored 12, loss.num_samples is 8" in str(e.value)
  assert "spec.sample_seed: stored 77, loss.sample_seed is 1" in str(e.value)


@pytest.mark.slow
def test_cached_source_stores_and_serves_the_samples(teacher, tiny_dataset, tmp_path):
  """A cached run asks the server and keeps its samples; a second run with no teacher at all trains on the
  very same samples from disk (identical losses)."""
  from student_trainer.train import run
  wait_serving(teacher)
  cache = tmp_path / "cache"

  def cached(run_dir, address, timeout_s):
    return remote_train_cfg(tiny_dataset, run_dir, [address], *SAMPLED, "teacher.source=cached",
                            f"teacher.cached.path={cache}", "teacher.cached.records_per_shard=8", "steps=2",
                            f"teacher.remote.timeout_s={timeout_s}", "teacher.remote.on_timeout=cached_shards",
                            "teacher.cached.secondary=ce_only", "teacher.remote.connect_timeout_s=2")

  first = run(cached(tmp_path / "fill", teacher.address, 60))
  assert first.last_metrics["teacher/rows_requested_total"] == 16
  assert shards.read_manifest(cache).spec.samples.num_samples == 12
  second = run(cached(tmp_path / "disk", f"127.0.0.1:{free_port()}", 1))
  assert second.last_metrics["teacher/batches_from_cache_total"] == 2
  assert second.last_metrics["teacher/rows_requested_total"] == 0
  rows = [[r for r in jsonl(res.run_dir / "metrics.jsonl") if "train/kd_loss" in r] for res in (first, second)]
  assert len(rows[1]) == 2
  for a, b in zip(*rows, strict=True):
    assert a["train/kd_loss"] == b["train/kd_loss"] and a["train/sampled_tail_mass"] == b["train/sampled_tail_mass"]


def test_training_against_a_teacher_server_with_sampled_kd(teacher, tiny_dataset, tmp_path):
  """kd_mode sampled against the real server trains, and its losses equal the in-process teacher's."""
  from student_trainer.train import run
  wait_serving(teacher)
  remote = run(remote_train_cfg(tiny_dataset, tmp_path / "remote", [teacher.address], *SAMPLED))
  local = run(train_cfg(tiny_dataset, tmp_path / "local", *LOCAL, *SAMPLED))
  assert remote.step == local.step == STEPS and remote.trained_example_ids == local.trained_example_ids
  rows = {name: [r for r in jsonl(res.run_dir / "metrics.jsonl") if "train/kd_loss" in r]
          for name, res in (("remote", remote), ("local", local))}
  assert len(rows["remote"]) == STEPS
  for a, b in zip(rows["remote"], rows["local"], strict=True):
    for key in ("train/kd_loss", "train/total_loss", "train/teacher_tail_mass", "train/sampled_tail_mass"):
      assert np.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-3), (key, a["step"])
  first, last = rows["remote"][0], rows["remote"][-1]
  assert 0 < first["train/sampled_tail_mass"] and 4 < first["train/kd_support"] <= 4 + 12
  assert last["train/total_loss"] < first["train/total_loss"]
  assert remote.last_metrics["teacher/fallbacks_total"] == 0
