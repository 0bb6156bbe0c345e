"""Teacher-answer shards: sorted-delta value coding, records, id runs, writer/store round trips, corruption."""

import ml_dtypes
import numpy as np
import pytest

from distill_core import shards, sorted_delta, wire
from distill_core.proto import teacher_pb2 as pb
from distill_core.shards import Progress, ShardError, StoredSpec
from distill_core.shards_io import AnswerStore, MissingAnswers, ShardWriter
from distill_core.targets import TeacherTargets


FP = "w" * 64  # the teacher weights fingerprint every test record is stamped with


def sorted_rows(rng, shape, vocab=500, dtype=np.float16):
  """Shifted top-k values as a teacher computes them: z - max(z), the k largest, descending."""
  z = rng.normal(0, 3, shape[:-1] + (vocab,)).astype(np.float32)
  z -= z.max(-1, keepdims=True)
  return -np.sort(-z, axis=-1)[..., :shape[-1]].astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_sorted_delta_round_trip_is_bit_exact_and_smaller(dtype):
  rng = np.random.default_rng(0)
  values = sorted_rows(rng, (3, 5, 64), dtype=dtype)
  values[0, 0, 10:20] = values[0, 0, 10]  # ties
  values[1, 1, -4:] = -np.inf  # underflow in the stored dtype
  assert sorted_delta.applicable(values)
  msg = wire.encode_tensor(values, sorted_delta_coding=True)
  assert msg.coding == pb.TENSOR_CODING_SORTED_DELTA
  assert len(msg.data) < values.nbytes * 0.75
  out = wire.decode_tensor(msg, "topk_logits")
  assert out.dtype == values.dtype and out.shape == values.shape
  np.testing.assert_array_equal(out.view(np.uint8), values.view(np.uint8))


@pytest.mark.parametrize("values", [
    np.array([[0.0, -1.0, -0.5]], np.float16),  # not sorted
    np.array([[0.5, 0.0]], np.float16),  # positive
    np.array([[-0.0, -1.0]], np.float16),  # negative zero
    np.array([[0, -1]], np.int32),  # not a float
])
def test_unsortable_values_are_stored_raw(values):
  msg = wire.encode_tensor(values, sorted_delta_coding=True)
  assert msg.coding == pb.TENSOR_CODING_RAW
  np.testing.assert_array_equal(wire.decode_tensor(msg, "x").view(np.uint8), values.view(np.uint8))


def test_sorted_delta_rejects_malformed_bytes():
  values = sorted_rows(np.random.default_rng(1), (4, 16))
  msg = wire.encode_tensor(values, sorted_delta_coding=True)
  for bad in (msg.data[:-1], msg.data + b"\0", b"\x00" * 4 + msg.data[4:]):
    broken = pb.Tensor(dtype=msg.dtype, shape=msg.shape, data=bad, coding=msg.coding)
    with pytest.raises(wire.WireError, match="topk_logits"):
      wire.decode_tensor(broken, "topk_logits")


def answer(rng, t=6, k=8, temps=(1.0, 2.0), layers=(0, 1), width=4, vocab=300):
  """A B=1 answer with every tensor kind a record carries."""
  ids = np.stack([rng.permutation(vocab)[:k] for _ in range(t)])[None].astype(np.int32)
  states = {"attn_out": rng.standard_normal((len(layers), 1, t, width)).astype(np.float32)} if layers else {}
  return TeacherTargets(topk_ids=ids, topk_logits=sorted_rows(rng, (1, t, k)),
                        logsumexp=rng.standard_normal((1, t, len(temps))).astype(np.float32), temperatures=temps,
                        layer_states=states, state_layers=layers if layers else ())


def spec(**changes) -> StoredSpec:
  base = dict(id_bits=wire.bits_for(300), value_coding="sorted_delta", zstd_level=0)
  base.update(changes)
  return StoredSpec.build(wire.OutputSpec(k=8, temperatures=(1.0, 2.0), layers=(0, 1), states=("attn_out",),
                                          pack_ids=True), **base)


def assert_same(a: TeacherTargets, b: TeacherTargets) -> None:
  for name in ("topk_ids", "topk_logits", "logsumexp", "temperatures"):
    x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
    assert x.dtype == y.dtype and x.shape == y.shape, name
    np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=name)
  assert a.state_layers == b.state_layers and set(a.layer_states) == set(b.layer_states)
  for name in a.layer_states:
    np.testing.assert_array_equal(a.layer_states[name], b.layer_states[name])


@pytest.mark.parametrize("changes", [{}, {"zstd_level": 3}, {"value_coding": "raw", "id_bits": 0}])
def test_record_round_trip(changes):
  rng = np.random.default_rng(2)
  one = answer(rng)
  data = shards.encode_record(1234, one, spec(**changes), weights_fingerprint=FP)
  example_id, out = shards.decode_record(data, "x.array_record (record 0)")
  assert example_id == 1234
  assert_same(out, one)


def test_record_corruption_names_the_record():
  data = bytearray(shards.encode_record(7, answer(np.random.default_rng(3)), spec(), weights_fingerprint=FP))
  data[40] ^= 0x10
  with pytest.raises(ShardError, match=r"f\.array_record \(record 5\): crc32 mismatch"):
    shards.decode_record(bytes(data), "f.array_record (record 5)")
  with pytest.raises(ShardError, match="bad magic"):
    shards.decode_record(b"XXXX" + bytes(data[4:]), "f")
  with pytest.raises(ShardError, match="shorter than its header"):
    shards.decode_record(b"DKTA", "f")


@pytest.mark.parametrize("ids", [[], [5], [1, 2, 3, 10, 20, 30, 31], [4, 4, 4], list(range(0, 100, 7)) + [3]])
def test_id_runs_round_trip(ids):
  runs = shards.id_runs(ids)
  assert shards.expand_runs(runs).tolist() == ids
  if ids == list(range(0, 100, 7)) + [3]:
    assert runs[0] == (0, 15, 7)


def header(writer="w0") -> Progress:
  teacher = shards.TeacherInfo(model_type="llama", weights_fingerprint=FP, tokenizer_fingerprint="",
                               vocab_size=300, num_layers=2, hidden_size=4)
  dataset = shards.DatasetInfo(path="d", dataset_fingerprint="d" * 64, tokenizer_fingerprint="t" * 64, seq_len=6,
                               splits={"train": 10})
  return Progress(teacher=teacher, dataset=dataset, spec=spec(), writer=writer)


def test_writer_and_store_round_trip(tmp_path):
  rng = np.random.default_rng(4)
  answers = {i: answer(rng) for i in range(10)}
  writers = [ShardWriter(tmp_path, header(f"w{n}"), name_of=lambda i, n=n: f"w{n}-{i}.array_record",
                         records_per_shard=3) for n in range(2)]
  for i, one in answers.items():
    writers[i % 2].add(i, shards.encode_record(i, one, spec(), weights_fingerprint=FP), positions=6, tokens=5,
                       temperatures=(1.0, 2.0))
  assert writers[0].pending == 2 and not (tmp_path / "w0-1.array_record").exists()  # staged until finished
  store = AnswerStore(tmp_path)
  assert len(store) == 6 and 9 not in store and 0 in store
  for w in writers:
    w.close()
  manifest = shards.read_manifest(tmp_path)
  assert manifest.complete and manifest.records == 10 and manifest.writers == ["w0", "w1"]
  assert manifest.tokens == 50 and manifest.positions == 60
  assert [s.file for s in manifest.shards] == ["w0-0.array_record", "w0-1.array_record", "w1-0.array_record",
                                               "w1-1.array_record"]
  assert store.refresh() == 4
  batch = store.batch([9, 0, 4])
  assert batch.batch_size == 3
  for row, i in enumerate([9, 0, 4]):
    np.testing.assert_array_equal(batch.topk_ids[row], answers[i].topk_ids[0])
    np.testing.assert_array_equal(batch.layer_states["attn_out"][:, row], answers[i].layer_states["attn_out"][:, 0])
  with pytest.raises(MissingAnswers, match=r"no stored answer for example id\(s\) 11, 12"):
    store.batch([0, 11, 12])


def test_select_picks_exact_temperature_k_and_layers():
  one = answer(np.random.default_rng(5), temps=(1.0, 2.0), layers=(0, 1))
  picked = shards.select(one, temperature=2.0, k=3, layers=(1,), states=("attn_out",))
  assert picked.k == 3 and picked.state_layers == (1,)
  np.testing.assert_array_equal(picked.logsumexp, one.logsumexp[..., 1:2])
  np.testing.assert_array_equal(picked.layer_states["attn_out"], one.layer_states["attn_out"][1:2])
  with pytest.raises(ShardError, match=r"temperature: 1.5 is not stored \(stored: \[1.0, 2.0\]\)"):
    shards.select(one, temperature=1.5, k=3)
  with pytest.raises(ShardError, match="k: 9 needed, 8 stored"):
    shards.select(one, temperature=1.0, k=9)
  with pytest.raises(ShardError, match=r"layers: teacher layer 2 needed, stored layers \[0, 1\]"):
    shards.select(one, temperature=1.0, k=3, layers=(2,), states=("attn_out",))


def test_progress_files_must_agree(tmp_path):
  shards.write_progress(tmp_path, header("a"))
  moved = header("m")  # the same dataset at another path: its path is informational
  shards.write_progress(tmp_path, moved.model_copy(update={"dataset": moved.dataset.model_copy(update={"path": "e"})}))
  assert shards.write_manifest(tmp_path).writers == ["a", "m"]
  other = header("b")
  other = other.model_copy(update={"dataset": other.dataset.model_copy(update={"seq_len": 7})})
  shards.write_progress(tmp_path, other)
  with pytest.raises(ShardError, match="progress-b.json: dataset differs"):
    shards.write_manifest(tmp_path)


def test_record_size_meets_the_format_targets_at_131072_ids():
  """Before zstd: plain f16 within 4.25 bytes per entry plus 4 per temperature per position; delta coding smaller."""
  from benchmarks.bench_offline import synthetic_answers
  rng = np.random.default_rng(6)
  t, k, vocab = 256, 64, 131072
  ids, values = synthetic_answers(rng, t, k, vocab)
  one = TeacherTargets(topk_ids=ids[None], topk_logits=values[None], logsumexp=np.zeros((1, t, 1), np.float32),
                       temperatures=(1.0,))
  sizes = {coding: len(shards.encode_record(0, one, StoredSpec.build(
      wire.OutputSpec(k=k), id_bits=wire.bits_for(vocab), value_coding=coding, zstd_level=0), weights_fingerprint=FP))
      for coding in ("raw", "sorted_delta")}
  assert wire.bits_for(vocab) == 17
  assert sizes["raw"] <= t * (4.25 * k + 4)
  assert sizes["sorted_delta"] < 0.85 * sizes["raw"]


def test_cache_reader_between_shard_file_and_manifest_sees_nothing_yet(tmp_path, monkeypatch):
  """The losing order, forced: a reader looks while the writer has moved its first shard into place
  but not yet written the manifest. The writer must not announce the shard yet, and a store of a cache
  with no manifest is empty, not an error."""
  import threading
  in_manifest, release = threading.Event(), threading.Event()
  original = shards.write_manifest

  def slow_write_manifest(root):
    in_manifest.set()
    assert release.wait(30)
    return original(root)

  monkeypatch.setattr(shards, "write_manifest", slow_write_manifest)
  writer = ShardWriter(tmp_path, header(), name_of=lambda i: f"c-{i}.array_record", records_per_shard=2)
  rng = np.random.default_rng(7)
  records = [shards.encode_record(i, answer(rng), spec(), weights_fingerprint=FP) for i in range(2)]
  writer.add(0, records[0], positions=6, tokens=5, temperatures=(1.0, 2.0))
  thread = threading.Thread(target=writer.add, args=(1, records[1]),
                            kwargs=dict(positions=6, tokens=5, temperatures=(1.0, 2.0)))
  thread.start()
  try:
    assert in_manifest.wait(30)
    assert (tmp_path / "c-0.array_record").exists() and not (tmp_path / shards.MANIFEST_NAME).exists()
    assert len(writer.progress.shards) == 0  # not announced before the manifest lists it
    store = AnswerStore(tmp_path, must_exist=False)
    assert store.refresh() == 0 and store.manifest is None and len(store) == 0
    with pytest.raises(ShardError, match="manifest.json: not found"):  # a dump directory must have one
      AnswerStore(tmp_path)
  finally:
    release.set()
    thread.join(30)
  assert len(writer.progress.shards) == 1
  assert store.refresh() == 2 and store.missing([0, 1, 2]) == [2]


def _written(root, fingerprint=FP, writer="w0", n=4):
  rng = np.random.default_rng(8)
  head = header(writer)
  head = head.model_copy(update={"teacher": head.teacher.model_copy(update={"weights_fingerprint": fingerprint})})
  out = ShardWriter(root, head, name_of=lambda i: f"{writer}-{i}.array_record", records_per_shard=2)
  for i in range(n):
    out.add(i, shards.encode_record(i, answer(rng), spec(), weights_fingerprint=fingerprint), positions=6,
            tokens=5, temperatures=(1.0, 2.0))
  out.close()
  return shards.read_manifest(root)


def test_manifest_must_list_each_shard_once_and_add_up(tmp_path):
  import json
  _written(tmp_path)
  path = tmp_path / shards.MANIFEST_NAME
  good = json.loads(path.read_text())
  twice = dict(good, shards=good["shards"] + good["shards"][:1], records=good["records"] + 2)
  path.write_text(json.dumps(twice))
  with pytest.raises(ShardError, match=r"manifest.json: invalid manifest file: shards: w0-0.array_record is listed "
                                       r"twice$") as e:
    shards.read_manifest(tmp_path)
  assert "\n" not in str(e.value)
  path.write_text(json.dumps(dict(good, records=good["records"] + 1)))
  with pytest.raises(ShardError, match=r"records: 5, but its shards hold 4$"):
    AnswerStore(tmp_path)


def test_a_shard_of_another_teacher_is_refused_when_opened(tmp_path):
  """Teacher B's shard and its manifest entry copied into teacher A's answers: the stamp in its records
  says whose it is (the manifest entry alone would not: its sha256 matches the file)."""
  import json
  mine, theirs = tmp_path / "a", tmp_path / "b"
  _written(mine, "a" * 64)
  _written(theirs, "b" * 64)
  manifest = json.loads((mine / shards.MANIFEST_NAME).read_text())
  other = json.loads((theirs / shards.MANIFEST_NAME).read_text())
  (mine / "w0-1.array_record").write_bytes((theirs / "w0-1.array_record").read_bytes())
  manifest["shards"][1] = other["shards"][1]
  (mine / shards.MANIFEST_NAME).write_text(json.dumps(manifest))
  with pytest.raises(ShardError, match=r"w0-1.array_record \(record 0\): teacher.weights_fingerprint: the record "
                                       r"was written by teacher weights b{16}\.\.\., the manifest names a{16}"):
    AnswerStore(mine)
  store = AnswerStore(theirs)  # every record is checked too, not only the first
  data = shards.encode_record(3, answer(np.random.default_rng(9)), spec(), weights_fingerprint="c" * 64)
  with pytest.raises(ShardError, match="written by teacher weights c{16}"):
    shards.decode_record(data, "x", weights_fingerprint=store.manifest.teacher.weights_fingerprint)
  with pytest.raises(ValueError, match="weights_fingerprint is empty"):
    shards.encode_record(3, answer(np.random.default_rng(9)), spec(), weights_fingerprint="")


def test_answers_of_format_version_1_are_refused_with_what_to_do(tmp_path):
  import json
  _written(tmp_path)
  path = tmp_path / shards.MANIFEST_NAME
  path.write_text(json.dumps(dict(json.loads(path.read_text()), format_version=1, record_version=1)))
  with pytest.raises(ShardError, match=r"format_version 1, this code reads 2; version 1 answers carry no teacher "
                                       r"identity: dump them again"):
    AnswerStore(tmp_path)
  record = bytearray(shards.encode_record(1, answer(np.random.default_rng(1)), spec(), weights_fingerprint=FP))
  record[4] = 1  # a version 1 record (crc recomputed so only the version differs)
  import zlib
  record[-4:] = zlib.crc32(bytes(record[:-4])).to_bytes(4, "little")
  with pytest.raises(ShardError, match="record version 1, this code reads 2; version 1 answers"):
    shards.decode_record(bytes(record), "x")
