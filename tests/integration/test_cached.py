"""The `cached` teacher source against real teacher-server processes, `cached_shards`, and crash safety.

Requests are counted on the servers' own Prometheus metrics: a run over data
that is already cached must not ask the teacher anything.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from offline_utils import jsonl, teacher_overrides, train_cfg
from server_utils import REPO, ServerProcess, one_device_env

from benchmarks.probes import scrape_metrics
from distill_core import shards
from distill_core.netutil import free_port
from distill_core.shards import ShardError
from distill_core.shards_io import AnswerStore

HALF = 4  # batches of 8 examples; the data is read in order (no shuffle)


def served_requests(server: ServerProcess) -> float:
  """Forward + Stream requests the server has answered, from its /metrics endpoint."""
  return sum(v for k, v in scrape_metrics(server.metrics_url).items()
             if k == "teacher_requests_total" or k.startswith("teacher_requests_total{"))


def cached_cfg(dataset, run_dir, cache, address, *overrides, steps, timeout_s=20):
  """Runs that expect no fallback get a timeout far above any answer time, even on a loaded machine."""
  return train_cfg(dataset, run_dir, "teacher.source=cached", f"teacher.cached.path={cache}",
                   "teacher.cached.records_per_shard=16", f"teacher.remote.address={address}",
                   "teacher.remote.window=1", f"teacher.remote.timeout_s={timeout_s}", "teacher.remote.backoff_max_s=0.5",
                   "teacher.remote.connect_timeout_s=2", "teacher.remote.on_timeout=cached_shards",
                   "teacher.cached.secondary=ce_only", "data.shuffle=false", *overrides, steps=steps)


@pytest.fixture(scope="module")
def servers(small_dataset, tmp_path_factory):
  root = tmp_path_factory.mktemp("cached_servers")
  procs = [ServerProcess(teacher_overrides(small_dataset), root / f"server{i}.log") for i in range(2)]
  try:
    for proc in procs:
      proc.wait_serving(300)
    yield procs
  finally:
    for proc in procs:
      proc.stop()


def test_three_runs_fill_use_and_never_ask_again(servers, small_dataset, tmp_path, monkeypatch):
  from student_trainer import step as step_lib
  from student_trainer.train import run
  steady, doomed = servers
  cache = tmp_path / "cache"
  # Run 1: half of the data (and the eval batch) through the teacher, into the cache.
  before = served_requests(steady)
  first = run(cached_cfg(small_dataset, tmp_path / "run1", cache, steady.address, steps=HALF))
  assert served_requests(steady) - before == HALF + 1  # one request per batch of 8 rows, plus eval
  manifest = shards.read_manifest(cache)
  assert manifest.records == (HALF + 1) * 8 and first.last_metrics["teacher/rows_requested_total"] == HALF * 8
  # Run 2: all of the data; the first half comes from disk, the teacher dies at step 2 and never returns.
  seen = {}
  original = step_lib.hyperparameters

  def kill_teacher_at_step_2(cfg, step):
    if step == 2 and not seen:
      seen["requests"] = served_requests(doomed)
      doomed.proc.kill()
      doomed.proc.wait(30)
    return original(cfg, step)

  monkeypatch.setattr(step_lib, "hyperparameters", kill_teacher_at_step_2)
  second = run(cached_cfg(small_dataset, tmp_path / "run2", cache, doomed.address, steps=2 * HALF, timeout_s=1))
  monkeypatch.setattr(step_lib, "hyperparameters", original)
  assert seen["requests"] == 0  # cached ids are never requested
  rows = [r for r in jsonl(tmp_path / "run2" / "metrics.jsonl") if "train/ce_loss" in r]
  assert [("train/kd_loss" in r) for r in rows] == [True] * HALF + [False] * HALF
  last = second.last_metrics
  assert last["teacher/batches_from_cache_total"] == HALF
  assert last["teacher/ce_only_batches_total"] == HALF and last["teacher/fallbacks_total"] == HALF
  assert sum(r["teacher/fallback_batches"] for r in rows) == HALF
  # The first half trained exactly as in run 1 (same answers, from disk).
  rows1 = [r for r in jsonl(tmp_path / "run1" / "metrics.jsonl") if "train/ce_loss" in r]
  for a, b in zip(rows1, rows[:HALF]):
    assert a["train/total_loss"] == b["train/total_loss"]
  # Run 3: the cached half again: no request at all.
  before = served_requests(steady)
  third = run(cached_cfg(small_dataset, tmp_path / "run3", cache, steady.address, steps=HALF))
  assert served_requests(steady) == before
  assert third.last_metrics["teacher/rows_requested_total"] == 0
  assert third.last_metrics["teacher/batches_from_cache_total"] == HALF


def test_remote_source_falls_back_to_cached_shards(servers, small_dataset, tmp_path):
  """`remote` with on_timeout=cached_shards and no teacher at all: cached batches train with KD, the rest CE."""
  from student_trainer.train import run
  cache = tmp_path / "cache"
  run(cached_cfg(small_dataset, tmp_path / "fill", cache, servers[0].address, steps=2))
  cfg = train_cfg(small_dataset, tmp_path / "run", "teacher.source=remote", f"teacher.cached.path={cache}",
                  f"teacher.remote.address=127.0.0.1:{free_port()}", "teacher.remote.timeout_s=0.5",
                  "teacher.remote.on_timeout=cached_shards", "teacher.cached.secondary=ce_only",
                  "data.shuffle=false", steps=3)
  result = run(cfg)
  rows = [r for r in jsonl(tmp_path / "run" / "metrics.jsonl") if "train/ce_loss" in r]
  assert [("train/kd_loss" in r) for r in rows] == [True, True, False]
  assert result.last_metrics["teacher/fallbacks_total"] == 3
  # The same cache in front of another teacher (other weights) is refused when the source opens.
  from remote_utils import ThreadedServer
  from support.fake_engine import FakeEngine, fake_info
  other = ThreadedServer("batcher.buckets=[[8,32]]", engine=FakeEngine(fake_info(
      vocab_size=384, hidden_size=32, buckets=((8, 32),), max_k=16)))
  try:
    with pytest.raises(ShardError, match="the cache holds answers with another teacher"):
      run(cached_cfg(small_dataset, tmp_path / "other", cache, other.address, steps=1))
  finally:
    other.kill()


def test_student_killed_mid_shard_leaves_a_valid_cache(tmp_path):
  """A writer SIGKILLed in the middle of a shard: the finished shard is read, the partial one never."""
  script = textwrap.dedent(f"""
      import os, signal, sys
      sys.path.insert(0, {str(REPO / 'tests')!r})
      from unit.test_shards import FP, answer, header, spec
      import numpy as np
      from distill_core import shards
      from distill_core.shards_io import ShardWriter
      rng = np.random.default_rng(0)
      writer = ShardWriter({str(tmp_path)!r}, header("cache-p00000-1"), name_of=lambda i: f"c-{{i}}.array_record",
                           records_per_shard=3)
      for i in range(5):
        record = shards.encode_record(i, answer(rng), spec(), weights_fingerprint=FP)
        writer.add(i, record, positions=6, tokens=6, temperatures=(1.0, 2.0))
      os.kill(os.getpid(), signal.SIGKILL)
  """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=one_device_env(), capture_output=True,
                        timeout=120)
  assert proc.returncode == -9, proc.stderr.decode()[-2000:]
  assert (tmp_path / ".partial" / "c-1.array_record").exists()  # the half-written shard, under .partial only
  (tmp_path / "c-7.array_record").write_bytes(b"garbage, never listed")
  store = AnswerStore(tmp_path)
  assert len(store) == 3 and store.missing(range(5)) == [3, 4]
  assert [s.file for s in store.manifest.shards] == ["c-0.array_record"]
  np.testing.assert_array_equal(store.batch([0, 1, 2]).topk_ids.shape, (3, 6, 8))
