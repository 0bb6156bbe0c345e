"""grain data pipeline over a prepared dataset (a few standard-library files)."""

import dataclasses
import json
import shutil
import sysconfig

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from distill_core import records
from distill_core.data import (Batch, DataConfig, load_manifest, make_dataset, make_eval_iterator,
                               make_iterator, num_batches, open_split)
from distill_core.prepare import PrepareConfig, prepare

B = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp("data") / "json"
  cfg = PrepareConfig(source_dir=sysconfig.get_paths()["stdlib"], glob="json/*.py",
                      vocab_size=300, seq_len=32, eval_fraction=0.25, records_per_shard=100,
                      output_dir=str(out))
  manifest, _ = prepare(cfg, show_progress=False)
  assert min(s.examples for s in manifest.splits.values()) > 4 * B
  return str(out)


def records_by_id(path: str, split: str) -> dict[int, dict]:
  manifest = load_manifest(path)
  out = {}
  for p in manifest.shard_paths(path, split):
    reader = ArrayRecordReader(str(p))
    for raw in reader.read_all():
      ex = records.decode_record(raw)
      out[int(ex["example_ids"])] = ex
    reader.close()
  return out


def take(it, n):
  return [next(it) for _ in range(n)]


def ids_of(batches):
  return [b.example_ids.tolist() for b in batches]


def test_batches_match_records_and_brute_force_targets(dataset):
  by_id = records_by_id(dataset, "train")
  it = make_iterator(DataConfig(path=dataset, batch_size=B, seed=3))
  for batch in take(it, 5):
    assert batch.shape == (B, 32)
    assert batch.example_ids.dtype == np.int64 and batch.loss_mask.dtype == np.float32
    for name in ("tokens", "segment_ids", "positions", "targets"):
      assert getattr(batch, name).dtype == np.int32
    for r in range(B):
      ex = by_id[int(batch.example_ids[r])]
      np.testing.assert_array_equal(batch.tokens[r], ex["tokens"])
      np.testing.assert_array_equal(batch.segment_ids[r], ex["segment_ids"])
      np.testing.assert_array_equal(batch.positions[r], ex["positions"])
      for t in range(32):
        nxt = t + 1 < 32
        same = nxt and ex["segment_ids"][t] != 0 and ex["segment_ids"][t + 1] == ex["segment_ids"][t]
        assert batch.loss_mask[r, t] == (1.0 if same else 0.0)
        if nxt:
          assert batch.targets[r, t] == ex["tokens"][t + 1]
  it.close()


def test_loss_mask_cuts_at_segment_boundaries():
  seg = np.array([[1, 1, 2, 2, 2, 0, 0]], dtype=np.int32)
  ex = {"example_ids": np.array([4]), "tokens": np.arange(7, dtype=np.int32)[None],
        "segment_ids": seg, "positions": np.array([[0, 1, 0, 1, 2, 0, 0]], dtype=np.int32)}
  b = Batch.from_examples(ex)
  np.testing.assert_array_equal(b.loss_mask[0], [1, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(b.targets[0], [1, 2, 3, 4, 5, 6, 0])


def test_seed_controls_the_order(dataset):
  def first(seed):
    it = make_iterator(DataConfig(path=dataset, batch_size=B, seed=seed))
    out = ids_of(take(it, 4))
    it.close()
    return out
  assert first(1) == first(1)
  assert first(1) != first(2)
  unshuffled = make_iterator(DataConfig(path=dataset, batch_size=B, shuffle=False))
  assert ids_of(take(unshuffled, 2)) == [list(range(B)), list(range(B, 2 * B))]


def test_epochs_are_reshuffled_permutations(dataset):
  n = load_manifest(dataset).splits["train"].examples
  cfg = DataConfig(path=dataset, batch_size=B, num_epochs=2, seed=5)
  ids = [i for b in make_iterator(cfg) for i in b.example_ids.tolist()]
  assert len(ids) == (2 * n) // B * B
  assert sorted(ids[:n]) == list(range(n))
  assert len(set(ids[n:])) == len(ids[n:])  # the second epoch repeats nothing within itself
  assert ids[n:2 * n] != ids[:len(ids) - n]  # and is a different order
  assert num_batches(cfg) == n // B


def test_state_round_trip_continues_identically(dataset):
  cfg = DataConfig(path=dataset, batch_size=B, seed=7, read_threads=2)
  it = make_iterator(cfg)
  take(it, 3)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 4)
  it.close()
  resumed = make_iterator(cfg)
  resumed.set_state(state)
  for a, b in zip(expected, take(resumed, 4)):
    for f in dataclasses.fields(Batch):
      np.testing.assert_array_equal(getattr(a, f.name), getattr(b, f.name))
  resumed.close()
  other = make_iterator(DataConfig(path=dataset, batch_size=B, seed=8))
  with pytest.raises(ValueError, match="seed: saved 7, now 8"):
    other.set_state(state)


def test_eval_covers_each_example_once_in_fixed_order(dataset):
  n = load_manifest(dataset).splits["eval"].examples
  cfg = DataConfig(path=dataset, batch_size=B, eval_batch_size=6, seed=9)
  ids = [i for b in make_eval_iterator(cfg) for i in b.example_ids.tolist()]
  first = load_manifest(dataset).splits["eval"].first_example_id
  assert first > 0
  assert ids == list(range(first, first + n // 6 * 6))
  again = [i for b in make_eval_iterator(cfg) for i in b.example_ids.tolist()]
  assert again == ids
  assert num_batches(cfg, "eval") == n // 6


def test_process_shards_partition_each_global_batch(dataset):
  cfg = DataConfig(path=dataset, batch_size=B, seed=11)
  whole = ids_of(take(make_iterator(cfg), 3))
  parts = [ids_of(take(make_iterator(cfg, shard_index=i, shard_count=2), 3)) for i in range(2)]
  for step in range(3):
    assert len(parts[0][step]) == B // 2
    assert sorted(parts[0][step] + parts[1][step]) == sorted(whole[step])
  with pytest.raises(ValueError, match="not divisible"):
    make_dataset(DataConfig(path=dataset, batch_size=B), shard_count=3)


def test_batch_is_a_pytree(dataset):
  batch = next(make_iterator(DataConfig(path=dataset, batch_size=B)))
  leaves = jax.tree_util.tree_leaves(batch)
  assert len(leaves) == 6
  doubled = jax.tree_util.tree_map(lambda x: x * 2, batch)
  assert isinstance(doubled, Batch)
  np.testing.assert_array_equal(doubled.tokens, batch.tokens * 2)
  assert set(dataclasses.asdict(batch)) == {f.name for f in dataclasses.fields(Batch)}


def test_corrupt_shard_names_the_file(dataset, tmp_path):
  copy = shutil.copytree(dataset, tmp_path / "copy")
  manifest = load_manifest(copy)
  shard = copy / manifest.splits["train"].shards[0].file
  data = bytearray(shard.read_bytes())
  data[1000] ^= 0x40  # inside the first records
  shard.write_bytes(bytes(data))
  with pytest.raises(records.RecordError, match="sha256 differs"):
    open_split(DataConfig(path=str(copy)), "train")
  _, source = open_split(DataConfig(path=str(copy), verify_shards=False), "train")
  with pytest.raises(records.RecordError, match=shard.name):
    for i in range(len(source)):
      source[i]


def test_missing_things_are_clear_errors(dataset, tmp_path):
  with pytest.raises(records.RecordError, match="manifest.json: not found"):
    make_iterator(DataConfig(path=str(tmp_path)))
  with pytest.raises(records.RecordError, match="no split 'valid'"):
    make_iterator(DataConfig(path=dataset), "valid")
  n = load_manifest(dataset).splits["eval"].examples
  with pytest.raises(ValueError, match="fewer than one batch"):
    make_eval_iterator(DataConfig(path=dataset, batch_size=n + 1))
