"""Dump once, train many times: the dump command, the `offline` source, resume, and every bad input.

The dumps run as real child processes (`python -m teacher_server.dump`): two
writers with the teacher in process, and one through a real teacher-server
process. Training from them is compared with the in-process `local` teacher:
the same targets bit for bit, the same first-step loss and gradients.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from offline_utils import (K_STORED, edit_manifest, jsonl, local_cfg, run_dump, start_dump, teacher_overrides,
                           train_cfg)
from server_utils import ServerProcess, wait_for

from distill_core import shards
from distill_core.data import make_iterator
from distill_core.shards import ShardError
from distill_core.shards_io import AnswerStore, MissingAnswers
from distill_core.sharding import make_mesh, rules_table
from student_trainer.sources import make_source
from student_trainer.sources.offline import AnswersMismatch

TRAIN, EVAL = "train", "eval"


@pytest.fixture(scope="module")
def dumps(small_dataset, tmp_path_factory):
  """Two writer processes with the teacher in process, two asking a server process, all running at once."""
  root = tmp_path_factory.mktemp("dumps")
  server = ServerProcess(teacher_overrides(small_dataset), root / "server.log")
  try:
    writers = {(name, i): start_dump(small_dataset, root / name, "--process-index", str(i), "--process-count", "2",
                                     *remote, log_path=root / f"{name}{i}.log")
               for name, remote in (("two", ()), ("remote", ("--remote", server.address))) for i in range(2)}
    for (name, i), proc in writers.items():
      assert proc.wait(300) == 0, (root / f"{name}{i}.log").read_text()[-3000:]
  finally:
    server.stop()
  return {"two": root / "two", "remote": root / "remote", "remote_log": (root / "remote1.log").read_text(),
          "writer_log": (root / "two0.log").read_text()}


def test_dumps_are_complete_and_identical(dumps, small_dataset):
  data = json.loads((small_dataset / "manifest.json").read_text())
  total = sum(s["examples"] for s in data["splits"].values())
  two, remote = shards.read_manifest(dumps["two"]), shards.read_manifest(dumps["remote"])
  assert two.complete and remote.complete and two.records == remote.records == total
  assert two.writers == remote.writers == ["p00000-of-00002", "p00001-of-00002"]
  assert two.teacher == remote.teacher and two.spec == remote.spec and two.dataset.splits == remote.dataset.splits
  assert two.dataset.dataset_fingerprint == data["dataset_fingerprint"]
  assert two.spec.k == K_STORED and two.temperatures == (1.0, 2.0) and two.spec.layers == (0, 1)
  for m in (two, remote):
    for info in m.shards:
      assert hashlib.sha256((dumps["two" if m is two else "remote"] / info.file).read_bytes()).hexdigest() == info.sha256
  # Every example's answer is the same whether the server or the in-process engine computed it.
  a, b = AnswerStore(dumps["two"]), AnswerStore(dumps["remote"])
  ids = shards.expand_runs([r for info in remote.shards for r in info.ids])
  assert sorted(ids.tolist()) == sorted(shards.expand_runs([r for i in two.shards for r in i.ids]).tolist())
  for chunk in np.array_split(ids, 8):
    x, y = a.batch(chunk), b.batch(chunk)
    for name in ("topk_ids", "topk_logits", "logsumexp"):
      np.testing.assert_array_equal(np.asarray(getattr(x, name)), np.asarray(getattr(y, name)), err_msg=name)
    np.testing.assert_array_equal(x.layer_states["attn_out"], y.layer_states["attn_out"])
  for log in (dumps["remote_log"], dumps["writer_log"]):
    assert "bytes/token" in log and "bytes per top-k entry" in log
  assert "teacher busy 0." in dumps["writer_log"] or "teacher busy 1." in dumps["writer_log"]


def open_sources(cfg):
  mesh, rules = make_mesh(cfg.mesh), rules_table(cfg.mesh)
  return make_source(cfg, mesh, rules)


def first_batch(cfg):
  it = make_iterator(cfg.data, "train")
  try:
    return next(it)
  finally:
    it.close()


def grads_and_loss(cfg, batch, targets):
  """Loss and gradients of the first step (fresh student, the step's own loss function)."""
  from flax import nnx
  from student_trainer import step as step_lib
  from student_trainer.state import create_train_state
  state = create_train_state(cfg, make_mesh(cfg.mesh), rules_table(cfg.mesh))
  model, _ = nnx.merge(state.graphdef, state.params)
  # The exact function the train step differentiates.
  loss_fn = step_lib._LossFn(cfg.loss, cfg.model)  # noqa: SLF001
  hyper = step_lib.hyperparameters(cfg, 0)
  tokens = np.float32(batch.loss_mask.sum())
  (loss, _), grads = nnx.value_and_grad(lambda m: loss_fn(m, batch, targets, hyper, tokens), has_aux=True)(model)
  return float(loss), [np.asarray(g) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))]


@pytest.mark.parametrize("which", ["two", "remote"])
def test_offline_targets_loss_and_gradients_equal_local(dumps, small_dataset, tmp_path, which):
  local = local_cfg(small_dataset, tmp_path / "local")
  offline = train_cfg(small_dataset, tmp_path / "off", "teacher.source=offline", f"teacher.offline.path={dumps[which]}")
  batch = first_batch(local)
  with open_sources(local) as a, open_sources(offline) as b:
    a.submit(batch, 1.0)
    b.submit(batch, 1.0)
    ta, tb = a.next(), b.next()
  assert tb.k == ta.k == 8 and tb.state_layers == ta.state_layers == (0, 1)
  for name in ("topk_ids", "topk_logits", "logsumexp", "temperatures"):
    x, y = np.asarray(getattr(ta, name)), np.asarray(getattr(tb, name))
    assert x.dtype == y.dtype and x.shape == y.shape, name
    np.testing.assert_array_equal(x, y, err_msg=name)
  np.testing.assert_array_equal(np.asarray(ta.layer_states["attn_out"]), np.asarray(tb.layer_states["attn_out"]))
  (loss_a, grads_a), (loss_b, grads_b) = grads_and_loss(local, batch, ta), grads_and_loss(offline, batch, tb)
  assert loss_a == loss_b and loss_a > 0
  for x, y in zip(grads_a, grads_b, strict=True):
    np.testing.assert_array_equal(x, y)


def params_of(result):
  from flax import nnx
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(result.state.model(), nnx.Param))]


def test_offline_training_and_bit_exact_resume(dumps, small_dataset, tmp_path):
  """Train from the shards (shuffled, eval included); stop after 2 steps and resume: bitwise the same student."""
  from student_trainer.train import run
  args = ("teacher.source=offline", f"teacher.offline.path={dumps['two']}", "teacher.offline.read_threads=2")
  local = run(local_cfg(small_dataset, tmp_path / "local"), keep_state=True)
  whole = run(train_cfg(small_dataset, tmp_path / "whole", *args), keep_state=True)
  assert whole.trained_example_ids == local.trained_example_ids
  rows_l = [r for r in jsonl(tmp_path / "local" / "metrics.jsonl") if "train/total_loss" in r]
  rows_o = [r for r in jsonl(tmp_path / "whole" / "metrics.jsonl") if "train/total_loss" in r]
  for key in ("train/total_loss", "train/kd_loss", "train/feature_loss"):
    assert rows_o[0][key] == rows_l[0][key], key
    for a, b in zip(rows_o, rows_l):
      assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
  assert whole.last_metrics["eval/kd_loss"] == pytest.approx(local.last_metrics["eval/kd_loss"], rel=1e-5)
  cfg = train_cfg(small_dataset, tmp_path / "resumed", *args)
  first = run(cfg, stop_after=2)
  meta = json.loads((tmp_path / "resumed" / "checkpoints" / "2" / "meta" / "metadata").read_text())
  assert meta["teacher"]["source"] == "offline" and meta["teacher"]["batches"] == 2 and meta["teacher"]["grain"]
  second = run(cfg, keep_state=True)
  assert len((second.run_dir / "example_ids.jsonl").read_text().splitlines()) == 6  # none trained twice
  assert second.trained_example_ids == whole.trained_example_ids
  for a, b in zip(params_of(second), params_of(whole), strict=True):
    np.testing.assert_array_equal(a, b)


# -- bad input -------------------------------------------------------------------------------------

def copy_dump(dumps, tmp_path) -> Path:
  out = tmp_path / "answers"
  shutil.copytree(dumps["two"], out)
  return out


def offline_cfg(small_dataset, path, tmp_path, *overrides, steps=4):
  return train_cfg(small_dataset, tmp_path / "run", "teacher.source=offline", f"teacher.offline.path={path}",
                   "data.shuffle=false", *overrides, steps=steps)


@pytest.mark.parametrize("edit, overrides, message", [
    ({"dataset__tokenizer_fingerprint": "f" * 64}, (),
     r"dataset.tokenizer_fingerprint: stored 'f{64}', data.path has '[0-9a-f]{64}'"),
    ({"dataset__dataset_fingerprint": "e" * 64}, (),
     r"dataset.dataset_fingerprint: stored 'e{64}', data.path has '[0-9a-f]{64}'"),
    ({}, ("teacher.offline.weights_fingerprint=" + "a" * 64,),
     r"teacher.weights_fingerprint: stored '[0-9a-f]{64}', teacher.offline.weights_fingerprint is 'a{64}'"),
    ({"teacher__vocab_size": 512}, (), r"teacher.vocab_size: stored 512, the student's 384"),
    ({}, ("loss.top_k=32",), r"spec.k: stored 16, loss.top_k needs 32"),
    ({}, ("loss.temperature=1.5",), r"temperatures: stored \[1.0, 2.0\], loss.temperature needs 1.5"),
    ({}, ("teacher.value_dtype=float32",), r"spec.value_dtype: stored 'float16', teacher.value_dtype is 'float32'"),
])
def test_manifest_mismatches_name_field_and_values(dumps, small_dataset, tmp_path, edit, overrides, message):
  path = copy_dump(dumps, tmp_path)
  if edit:
    edit_manifest(path, **edit)
  with pytest.raises(AnswersMismatch, match=message):
    open_sources(offline_cfg(small_dataset, path, tmp_path, *overrides))


def test_feature_loss_needs_stored_states(dumps, small_dataset, tmp_path):
  path = copy_dump(dumps, tmp_path)
  edit_manifest(path, spec__request__layers=[0])
  with pytest.raises(AnswersMismatch, match=r"spec.layers: stored \[0\], the losses need teacher layers \[0, 1\]"):
    open_sources(offline_cfg(small_dataset, path, tmp_path))


def test_resume_refuses_answers_of_another_teacher(dumps, small_dataset, tmp_path):
  source = open_sources(offline_cfg(small_dataset, dumps["two"], tmp_path))
  with source:
    state = source.state()
    with pytest.raises(AnswersMismatch, match="checkpoint was trained on answers of teacher weights 00000000"):
      source.restore(dict(state, weights_fingerprint="0" * 64))


def rewrite_shard(path: Path, corrupt_record: int) -> None:
  """Rewrites a shard with one record's payload byte flipped, and lists its new sha256 (so only crc32 can tell)."""
  from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
  reader = ArrayRecordReader(str(path))
  records = reader.read(list(range(reader.num_records())))
  reader.close()
  bad = bytearray(records[corrupt_record])
  bad[len(bad) // 2] ^= 0x01
  records[corrupt_record] = bytes(bad)
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for record in records:
    writer.write(record)
  writer.close()
  manifest_path = path.parent / "manifest.json"
  data = json.loads(manifest_path.read_text())
  for info in data["shards"]:
    if info["file"] == path.name:
      info["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
  manifest_path.write_text(json.dumps(data))


def test_flipped_byte_in_a_record_stops_before_training_it(dumps, small_dataset, tmp_path):
  path = copy_dump(dumps, tmp_path)
  shard = path / "answers-p00000-of-00002-00000.array_record"
  rewrite_shard(shard, corrupt_record=10)  # example 10: in the second batch (no shuffle)
  cfg = offline_cfg(small_dataset, path, tmp_path, "teacher.offline.lookahead=0")
  it = make_iterator(cfg.data, "train")
  with open_sources(cfg) as source:
    source.submit(next(it), 1.0)
    assert source.next() is not None
    with pytest.raises(ShardError, match=rf"{shard} \(record 10\): crc32 mismatch"):
      source.submit(next(it), 1.0)  # the train loop submits a batch before it trains on it
  it.close()


def test_truncated_shard_is_refused(dumps, small_dataset, tmp_path):
  path = copy_dump(dumps, tmp_path)
  shard = path / "answers-p00001-of-00002-00002.array_record"
  shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  with pytest.raises(ShardError, match=rf"{shard}: sha256 differs from the manifest"):
    open_sources(offline_cfg(small_dataset, path, tmp_path))
  with pytest.raises(ShardError, match=rf"{shard}: (cannot open shard|has \d+ records, the manifest says 64)"):
    open_sources(offline_cfg(small_dataset, path, tmp_path, "teacher.offline.verify_shards=false"))


def test_missing_example_id_is_an_error_or_counted_ce_only(dumps, small_dataset, tmp_path):
  from student_trainer.train import run
  path = copy_dump(dumps, tmp_path)
  data = json.loads((path / "manifest.json").read_text())
  gone = next(s for s in data["shards"] if s["file"] == "answers-p00000-of-00002-00000.array_record")
  data["shards"].remove(gone)
  data["records"] -= gone["records"]  # a consistent manifest that lacks those answers
  data["complete"] = False
  (path / "manifest.json").write_text(json.dumps(data))
  cfg = offline_cfg(small_dataset, path, tmp_path)
  it = make_iterator(cfg.data, "train")
  with open_sources(cfg) as source:
    with pytest.raises(MissingAnswers, match=r"no stored answer for example id\(s\) 0, 1, 2, 3, 4, 5, 6, 7"):
      source.submit(next(it), 1.0)
  it.close()
  result = run(offline_cfg(small_dataset, path, tmp_path / "ce", "teacher.offline.on_missing=ce_only", steps=2))
  rows = [r for r in jsonl(tmp_path / "ce" / "run" / "metrics.jsonl") if "train/ce_loss" in r]
  assert [("train/kd_loss" in r) for r in rows] == [False, False]  # ids 0..63 are gone
  assert result.last_metrics["teacher/ce_only_batches_total"] == 2
  assert "eval/kd_loss" in result.last_metrics  # the eval ids are stored


def test_follow_trains_from_a_dump_still_being_written(small_dataset, tmp_path, caplog):
  """The student starts before the dump has written anything; it waits (logged) and trains from it."""
  import logging
  from student_trainer.train import run
  caplog.set_level(logging.INFO, logger="student_trainer.sources.offline")
  out = tmp_path / "live"
  proc = start_dump(small_dataset, out, "splits=[train]", "max_examples=48", "records_per_shard=8",
                    "rows_per_request=2", "window=1", log_path=tmp_path / "dump.log")
  try:  # eval ids are never dumped: once the dump is complete they are missing, and CE-only by request
    run(train_cfg(small_dataset, tmp_path / "run", "teacher.source=offline", f"teacher.offline.path={out}",
                  "teacher.offline.follow=true", "teacher.offline.follow_poll_s=0.2", "data.shuffle=false",
                  "teacher.offline.on_missing=ce_only", steps=3))
  finally:
    assert proc.wait(300) == 0, (tmp_path / "dump.log").read_text()[-2000:]
  rows = [r for r in jsonl(tmp_path / "run" / "metrics.jsonl") if "train/ce_loss" in r]
  assert [("train/kd_loss" in r) for r in rows] == [True] * 3
  messages = [r.getMessage() for r in caplog.records]
  assert any("following" in m and "waiting" in m for m in messages), messages


def test_dump_through_a_token_protected_server(small_dataset, tmp_path, capsys):
  """`remote.*` options as for the trainer: with the token, the fake teacher's closed-form answers are stored;
  with a wrong one the dump is refused with the server's status."""
  from remote_utils import ThreadedServer
  from server_utils import fake_expected

  from distill_core.config import load_config
  from distill_core.data import DataConfig, open_split
  from teacher_server.dump import dump, main
  from teacher_server.dump_config import DumpConfig
  from support.fake_engine import FakeEngine, fake_info
  server = ThreadedServer("security.auth_token=s3cret", engine=FakeEngine(fake_info(vocab_size=384)))
  args = [f"data={small_dataset}", "splits=[train]", "max_examples=12", "k=4", "rows_per_request=4", "progress=false",
          f"remote.address={server.address}", "remote.connect_timeout_s=20"]
  try:
    summary = dump(load_config(DumpConfig, None, [*args, f"output={tmp_path / 'ok'}", "remote.token=s3cret"]))
    code = main([*args, f"output={tmp_path / 'refused'}", "remote.token=wrong"])
  finally:
    server.kill()
  assert summary.records == 12 and summary.teacher_busy_fraction is None
  _, source = open_split(DataConfig(path=str(small_dataset)), "train")
  rows = [source[i] for i in range(12)]
  ids, logits, lse = fake_expected(np.stack([r["tokens"] for r in rows]), np.stack([r["positions"] for r in rows]),
                                   4, (1.0,), vocab=384)
  got = AnswerStore(tmp_path / "ok").batch([int(r["example_ids"]) for r in rows])
  np.testing.assert_array_equal(got.topk_ids, ids)
  np.testing.assert_array_equal(np.asarray(got.topk_logits, np.float32), logits)
  np.testing.assert_allclose(got.logsumexp, lse, rtol=1e-6)
  assert code == 1 and "UNAUTHENTICATED" in capsys.readouterr().err


# -- resumable dump --------------------------------------------------------------------------------

def test_sigkilled_dump_resumes_to_identical_shards(dumps, small_dataset, tmp_path):
  """SIGKILL writer 0 after its second shard, start it again: the same shard files as the uninterrupted dump."""
  out = tmp_path / "answers"
  args = ("--process-index", "0", "--process-count", "2", "rows_per_request=1", "window=1")
  proc = start_dump(small_dataset, out, *args, log_path=tmp_path / "killed.log")
  progress = out / "progress-p00000-of-00002.json"

  def two_shards_done():
    if proc.poll() is not None:
      raise RuntimeError(f"dump ended before it was killed:\n{(tmp_path / 'killed.log').read_text()[-2000:]}")
    try:
      return len(json.loads(progress.read_text())["shards"]) >= 2
    except (OSError, ValueError):
      return False

  wait_for(two_shards_done, 300, "two finished shards")
  proc.kill()
  done = json.loads(progress.read_text())["shards"]
  planned = [s for s in shards.read_manifest(dumps["two"]).shards if s.writer == "p00000-of-00002"]
  assert 2 <= len(done) < len(planned)
  log = run_dump(small_dataset, out, *args, log_path=tmp_path / "resumed.log")
  assert f"resuming: {len(done)} of {len(planned)} shards are finished and intact" in log
  resumed = json.loads(progress.read_text())["shards"]
  assert [s["file"] for s in resumed] == [s.file for s in planned]
  for mine, ref in zip(resumed, planned):
    assert mine["sha256"] == ref.sha256 == hashlib.sha256((out / mine["file"]).read_bytes()).hexdigest()
  assert not list((out / ".partial").iterdir())
