"""Corpus preparation: packing, splits, record format, manifest, idempotency, CLI."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from distill_core import records
from distill_core.config import ConfigError, load_config
from distill_core.prepare import (SPLIT_ID_BASE, PrepareConfig, main, pack_documents, prepare,
                                  split_of)
from distill_core.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN = 32
WORDS = ["def", "return", "self", "x", "y", "=", "+", "(", ")", ":", "import", "numpy", "é", "中"]


def write_corpus(root: Path, seed: int = 0) -> Path:
  """Random code-like files, one long one, an empty one, a non-UTF-8 one, an excluded one."""
  rng = np.random.default_rng(seed)
  for i in range(14):
    n_lines = int(rng.integers(1, 25)) if i else 120  # file 0 spans several rows
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 9)))) for _ in range(n_lines)]
    path = root / ("pkg" if i % 2 else "") / f"mod{i}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  (root / "empty.py").write_text("")
  (root / "latin1.py").write_bytes(b"caf\xe9 = 1\n")
  (root / "tests").mkdir(exist_ok=True)
  (root / "tests" / "test_skip.py").write_text("assert False\n")
  (root / "notes.txt").write_text("not python\n")
  return root


def config(src: Path, out: Path, **kw) -> PrepareConfig:
  base = dict(source_dir=str(src), vocab_size=300, seq_len=SEQ_LEN, eval_fraction=0.3,
              records_per_shard=16, output_dir=str(out))
  return PrepareConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared") / "ds"
  manifest, skipped = prepare(config(corpus, out), show_progress=False)
  assert not skipped
  return out, manifest


def reference_pack(docs, seq_len, pad_id):
  """Brute-force greedy packing, one token at a time."""
  rows, row = [], []
  seg = 0
  for doc in docs:
    for j, token in enumerate(doc):
      if len(row) == seq_len:
        rows.append(row)
        row = []
      if j == 0 or not row:  # a new document, or its continuation in a new row
        seg = 1 if not row else seg + 1
        pos = 0
      row.append((token, seg, pos))
      pos += 1
  if row:
    rows.append(row + [(pad_id, 0, 0)] * (seq_len - len(row)))
  arr = np.array(rows, dtype=np.int64).reshape(-1, seq_len, 3)
  return arr[..., 0], arr[..., 1], arr[..., 2]


def reference_split(rel: str, fraction: float) -> str:
  return "eval" if int(hashlib.sha256(rel.encode()).hexdigest()[:16], 16) / 2**64 < fraction else "train"


def reference_documents(corpus: Path, tok: Tokenizer, split: str, fraction: float):
  docs = []
  for path in sorted(corpus.rglob("*.py"), key=lambda p: p.relative_to(corpus).as_posix()):
    rel = path.relative_to(corpus).as_posix()
    if rel.startswith("tests/") or reference_split(rel, fraction) != split:
      continue
    try:
      text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
      continue
    if text:
      docs.append(tok.encode(text).tolist() + [tok.eos_id])
  return docs


def read_split(root: Path, manifest: records.Manifest, split: str):
  out = []
  for path in manifest.shard_paths(root, split):
    reader = ArrayRecordReader(str(path))
    out += [records.decode_record(r, seq_len=manifest.seq_len) for r in reader.read_all()]
    reader.close()
  return out


@pytest.mark.parametrize("lengths", [[5], [32], [33], [3, 29, 1, 70, 2], [31, 1, 32, 64, 7]])
def test_pack_documents_matches_brute_force(lengths):
  rng = np.random.default_rng(len(lengths))
  docs = [rng.integers(2, 50, size=n).astype(np.int32) for n in lengths]
  got = pack_documents(docs, SEQ_LEN, pad_id=0)
  want = reference_pack(docs, SEQ_LEN, pad_id=0)
  for g, w in zip(got, want):
    assert g.dtype == np.int32
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_shards_hold_the_documents_packed(prepared, corpus, split):
  out, manifest = prepared
  tok = Tokenizer.from_file(out / "tokenizer.json")
  docs = reference_documents(corpus, tok, split, 0.3)
  assert docs, f"test corpus left the {split} split empty"
  rows = read_split(out, manifest, split)
  tokens, segs, pos = reference_pack(docs, SEQ_LEN, tok.pad_id)
  np.testing.assert_array_equal(np.stack([r["tokens"] for r in rows]), tokens)
  np.testing.assert_array_equal(np.stack([r["segment_ids"] for r in rows]), segs)
  np.testing.assert_array_equal(np.stack([r["positions"] for r in rows]), pos)
  ids = [int(r["example_ids"]) for r in rows]
  assert ids == list(range(SPLIT_ID_BASE[split], SPLIT_ID_BASE[split] + len(rows)))
  # Non-padding tokens of every segment, concatenated in order, are the documents + eos.
  stream = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
  np.testing.assert_array_equal(stream, np.concatenate(docs))
  info = manifest.splits[split]
  assert (info.documents, info.tokens, info.examples) == (
      len(docs), sum(map(len, docs)), len(rows))


def test_manifest_contents(prepared, corpus):
  out, manifest = prepared
  assert manifest.seq_len == SEQ_LEN and manifest.vocab_size <= 300
  assert (manifest.pad_id, manifest.eos_id) == (0, 1)
  assert manifest.skipped_files == ["latin1.py"]
  assert manifest.tokenizer_fingerprint == Tokenizer.from_file(out / "tokenizer.json").fingerprint
  rels = [p.relative_to(corpus).as_posix() for p in corpus.rglob("*.py")]
  rels = [r for r in rels if not r.startswith("tests/") and r != "latin1.py"]
  for split in ("train", "eval"):
    info = manifest.splits[split]
    assert info.files == sum(reference_split(r, 0.3) == split for r in rels)
    assert sum(s.records for s in info.shards) == info.examples
    assert len(info.shards) == -(-info.examples // 16)
    for shard in info.shards:
      assert hashlib.sha256((out / shard.file).read_bytes()).hexdigest() == shard.sha256
  assert records.read_manifest(out) == manifest
  assert not (out.parent / "ds.partial").exists()


def test_split_of_is_a_deterministic_hash_of_the_path():
  rng = np.random.default_rng(0)
  paths = [f"dir{rng.integers(100)}/file{i}.py" for i in range(4000)]
  for p in paths[:50]:
    assert split_of(p, 0.3) == reference_split(p, 0.3) == split_of(p, 0.3)
  share = np.mean([split_of(p, 0.2) == "eval" for p in paths])
  assert 0.17 < share < 0.23
  assert all(split_of(p, 0.0) == "train" for p in paths)
  # Growing the fraction only moves files from train to eval.
  assert all(split_of(p, 0.5) == "eval" for p in paths if split_of(p, 0.2) == "eval")


def test_fingerprints_follow_the_corpus(prepared, corpus, tmp_path):
  out, manifest = prepared
  again, _ = prepare(config(corpus, tmp_path / "again"), show_progress=False)
  assert again.dataset_fingerprint == manifest.dataset_fingerprint
  assert again.source_fingerprint == manifest.source_fingerprint
  assert again.tokenizer_fingerprint == manifest.tokenizer_fingerprint
  changed = shutil.copytree(corpus, tmp_path / "changed")
  with open(changed / "mod3.py", "a", encoding="utf-8") as f:
    f.write("extra = 1\n")
  other, _ = prepare(config(changed, tmp_path / "other"), show_progress=False)
  assert other.source_fingerprint != manifest.source_fingerprint
  assert other.dataset_fingerprint != manifest.dataset_fingerprint


def test_existing_tokenizer_gives_the_same_dataset(prepared, corpus, tmp_path):
  out, manifest = prepared
  reuse, _ = prepare(config(corpus, tmp_path / "reuse", tokenizer=str(out / "tokenizer.json"),
                            vocab_size=5000), show_progress=False)
  assert reuse.tokenizer_fingerprint == manifest.tokenizer_fingerprint
  assert reuse.dataset_fingerprint == manifest.dataset_fingerprint


def test_rerun_is_skipped_and_changes_need_overwrite(corpus, tmp_path):
  cfg = config(corpus, tmp_path / "ds")
  first, skipped = prepare(cfg, show_progress=False)
  assert not skipped
  shard = tmp_path / "ds" / first.splits["train"].shards[0].file
  os.utime(shard, ns=(1, 1))
  second, skipped = prepare(cfg, show_progress=False)
  assert skipped and second == first
  assert shard.stat().st_mtime_ns == 1  # nothing rewritten
  with pytest.raises(ConfigError, match="seq_len"):
    prepare(config(corpus, tmp_path / "ds", seq_len=16), show_progress=False)
  rebuilt, skipped = prepare(config(corpus, tmp_path / "ds", seq_len=16, overwrite=True),
                             show_progress=False)
  assert not skipped and rebuilt.seq_len == 16
  with open(tmp_path / "ds" / rebuilt.splits["eval"].shards[0].file, "ab") as f:
    f.write(b"junk")
  with pytest.raises(ConfigError, match="sha256"):
    prepare(config(corpus, tmp_path / "ds", seq_len=16), show_progress=False)


def test_refuses_a_foreign_output_dir(corpus, tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "keep.txt").write_text("user data")
  with pytest.raises(ConfigError, match="not a prepared dataset"):
    prepare(config(corpus, tmp_path / "mine", overwrite=True), show_progress=False)
  assert (tmp_path / "mine" / "keep.txt").exists()


def test_no_matching_files(tmp_path):
  with pytest.raises(ConfigError, match="no files match"):
    prepare(config(tmp_path, tmp_path / "out"), show_progress=False)


def test_max_files_keeps_the_first_sorted_files(corpus, tmp_path):
  manifest, _ = prepare(config(corpus, tmp_path / "few", max_files=3, eval_fraction=0.0),
                        show_progress=False)
  # Sorted relative paths: empty.py, latin1.py, mod0.py, ...
  assert manifest.splits["train"].files == 2 and manifest.skipped_files == ["latin1.py"]
  assert manifest.splits["train"].documents == 1 and manifest.splits["eval"].examples == 0


def test_record_round_trip():
  rng = np.random.default_rng(1)
  arrays = [rng.integers(-2**31, 2**31 - 1, size=7, dtype=np.int64).astype(np.int32)
            for _ in range(3)]
  data = records.encode_record(2**40 + 5, *arrays)
  assert len(data) == records.record_size(7) == 24 + 12 * 7 + 4
  ex = records.decode_record(data, seq_len=7)
  assert ex["example_ids"] == 2**40 + 5
  for name, a in zip(("tokens", "segment_ids", "positions"), arrays):
    assert ex[name].dtype == np.int32
    np.testing.assert_array_equal(ex[name], a)


def test_record_errors():
  data = records.encode_record(3, *(np.arange(4, dtype=np.int32),) * 3)
  for i in (0, 9, 30, len(data) - 1):
    bad = bytearray(data)
    bad[i] ^= 0x01
    with pytest.raises(records.RecordError, match="shard-x"):
      records.decode_record(bytes(bad), where="shard-x")
  with pytest.raises(records.RecordError, match="seq_len 4 differs"):
    records.decode_record(data, seq_len=8)
  with pytest.raises(records.RecordError, match="shorter than its header"):
    records.decode_record(data[:10])
  with pytest.raises(records.RecordError, match="expected"):
    records.decode_record(data[:-4])


def test_shipped_yaml_is_the_defaults():
  assert load_config(PrepareConfig, REPO / "configs" / "prepare.yaml") == PrepareConfig()


def test_cli(corpus, tmp_path, capsys):
  assert main(["--help"]) == 0
  text = capsys.readouterr().out
  for name in PrepareConfig.model_fields:
    assert name in text
  args = [f"source_dir={corpus}", "vocab_size=280", "seq_len=16", f"output_dir={tmp_path / 'cli'}"]
  assert main(args) == 0
  text = capsys.readouterr().out
  manifest = records.read_manifest(tmp_path / "cli")
  assert manifest.dataset_fingerprint[:16] in text and "examples" in text
  assert main(args) == 0
  assert "up to date" in capsys.readouterr().out
  assert main(["seq_len=banana"]) == 2
  assert "seq_len" in capsys.readouterr().out
