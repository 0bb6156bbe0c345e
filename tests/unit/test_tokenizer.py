"""Tokenizer wrapper and byte-level BPE training."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from distill_core.tokenizer import Tokenizer, TokenizerError, fingerprint_of, train_bpe

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)  # squares\n",
    "import os\nprint(os.path.join('a', 'b'))\n",
] * 8

ROUND_TRIP = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand\x00nul",
    "unicode: é ß 中文 русский 🙂 \u200b",
    "literal specials: <eos> <pad> </s>",
    "def f():\n\treturn {'k': [1, 2.5e-3]}\n",
]


@pytest.fixture(scope="module")
def tok():
  return train_bpe(CORPUS, vocab_size=300)


def test_special_ids_and_vocab(tok):
  assert tok.pad_id == 0 and tok.eos_id == 1
  assert tok.backend.token_to_id("<pad>") == 0
  assert tok.backend.token_to_id("<eos>") == 1
  assert 258 < tok.vocab_size <= 300  # bytes + specials + some merges


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_any_text(tok, text):
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert tok.decode(ids) == text


def test_literal_special_text_is_not_a_special_token(tok):
  ids = tok.encode("x <eos> y <pad>")
  assert tok.eos_id not in ids.tolist() and tok.pad_id not in ids.tolist()


def test_merges_compress_training_text(tok):
  text = CORPUS[0]
  assert len(tok.encode(text)) < len(text.encode("utf-8"))


def test_encode_batch_matches_encode(tok):
  batch = tok.encode_batch(ROUND_TRIP)
  assert len(batch) == len(ROUND_TRIP)
  for text, ids in zip(ROUND_TRIP, batch):
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, tok.encode(text))


def test_decode_special_tokens(tok):
  ids = np.concatenate([tok.encode("ab"), [tok.eos_id]])
  assert tok.decode(ids) == "ab"
  assert tok.decode(ids, skip_special_tokens=False) == "ab<eos>"
  with pytest.raises(TokenizerError, match="outside the vocabulary"):
    tok.decode([tok.vocab_size])


def test_fingerprint_stable_across_save_load(tok, tmp_path):
  path = tmp_path / "tokenizer.json"
  tok.save(path)
  loaded = Tokenizer.from_file(path)
  assert loaded.fingerprint == tok.fingerprint
  assert len(tok.fingerprint) == 64
  # Re-serialised with different key order / whitespace: same canonical JSON.
  data = json.loads(path.read_text())
  reordered = tmp_path / "reordered.json"
  reordered.write_text(json.dumps(dict(reversed(list(data.items()))), indent=4))
  assert Tokenizer.from_file(reordered).fingerprint == tok.fingerprint
  for text in ROUND_TRIP:
    np.testing.assert_array_equal(loaded.encode(text), tok.encode(text))


def test_fingerprint_differs_between_tokenizers(tok):
  assert train_bpe(CORPUS, vocab_size=280).fingerprint != tok.fingerprint
  assert train_bpe(CORPUS, vocab_size=300).fingerprint == tok.fingerprint  # deterministic


def test_train_from_files(tmp_path, tok):
  paths = []
  for i, text in enumerate(CORPUS):
    p = tmp_path / f"doc{i}.py"
    p.write_text(text, encoding="utf-8")
    paths.append(p)
  assert train_bpe(paths, vocab_size=300).fingerprint == tok.fingerprint


def test_load_tokenizer_written_by_tokenizers_library(tmp_path):
  vocab = {"<pad>": 0, "</s>": 1, "hello": 2, "world": 3, "[UNK]": 4}
  raw = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  raw.pre_tokenizer = pre_tokenizers.Whitespace()
  raw.add_special_tokens(["<pad>", "</s>"])
  path = tmp_path / "tokenizer.json"
  raw.save(str(path))
  tok = Tokenizer.from_file(path)
  assert tok.fingerprint == fingerprint_of(tokenizers.Tokenizer.from_file(str(path)))
  assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 5)
  assert tok.encode("hello world world").tolist() == [2, 3, 3]
  assert tok.encode("hello moon").tolist() == [2, 4]
  assert tok.decode([2, 1, 3]) == "hello world"


def test_missing_eos_is_a_clear_error(tmp_path):
  raw = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
  path = tmp_path / "tokenizer.json"
  raw.save(str(path))
  with pytest.raises(TokenizerError, match="no eos token"):
    Tokenizer.from_file(path)
  tok = Tokenizer.from_file(path, eos_token="a")
  assert tok.eos_id == 0 and tok.pad_id == 0  # padding falls back to eos


def test_bad_files_are_clear_errors(tmp_path):
  with pytest.raises(TokenizerError, match="not found"):
    Tokenizer.from_file(tmp_path / "missing.json")
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(TokenizerError, match="bad.json"):
    Tokenizer.from_file(bad)


def test_vocab_size_too_small():
  with pytest.raises(ValueError, match="vocab_size=100"):
    train_bpe(CORPUS, vocab_size=100)
