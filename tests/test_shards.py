"""Teacher-answer shards: sorted-delta value coding, records, id runs, writer/store round trips, corruption."""

import ml_dtypes
import numpy as np
import pytest

from distill_core import shards, sorted_delta, wire
from distill_core.proto import teacher_pb2 as pb
from distill_core.shards import Progress, ShardError, StoredSpec
from distill_core.shards_io import AnswerStore, MissingAnswers, ShardWriter
from distill_core.targets import TeacherTargets


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
  data = shards.encode_record(1234, one, spec(**changes))
  example_id, out = shards.decode_record(data, "x.array_record (record 0)")
  assert example_id == 1234
  assert_same(out, one)


def test_record_corruption_names_the_record():
  data = bytearray(shards.encode_record(7, answer(np.random.default_rng(3)), spec()))
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
  teacher = shards.TeacherInfo(model_type="llama", weights_fingerprint="w" * 64, tokenizer_fingerprint="",
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
    writers[i % 2].add(i, shards.encode_record(i, one, spec()), positions=6, tokens=5, temperatures=(1.0, 2.0))
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
      wire.OutputSpec(k=k), id_bits=wire.bits_for(vocab), value_coding=coding, zstd_level=0)))
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
  writer.add(0, shards.encode_record(0, answer(rng), spec()), positions=6, tokens=5, temperatures=(1.0, 2.0))
  thread = threading.Thread(target=writer.add, args=(1, shards.encode_record(1, answer(rng), spec())),
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
