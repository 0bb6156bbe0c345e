"""Tokenizer: any Hugging Face ``tokenizer.json``, plus byte-level BPE training.

:class:`Tokenizer` wraps :class:`tokenizers.Tokenizer` with the handful of
calls the project needs (numpy ids, special-token ids, a fingerprint that the
teacher and the student compare). Raw text is always encoded as text: a literal
``<eos>`` inside a document becomes ordinary bytes, never the special token, so
``decode(encode(x)) == x`` holds for every string with the byte-level BPE that
:func:`train_bpe` builds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<eos>"
# Special tokens looked up, in order, when a tokenizer.json does not say which is which.
EOS_CANDIDATES = (EOS_TOKEN, "<|endoftext|>", "<|end_of_text|>", "</s>", "<|eot_id|>", "<|im_end|>")
PAD_CANDIDATES = (PAD_TOKEN, "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<|endoftext|>")
NUM_BYTES = 256


class TokenizerError(ValueError):
  """A tokenizer file could not be loaded or lacks a required special token."""


def canonical_json(tok: tokenizers.Tokenizer) -> str:
  """The tokenizer's JSON with sorted keys and no whitespace (stable across save/load)."""
  return json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"),
                    ensure_ascii=False)


def fingerprint_of(tok: tokenizers.Tokenizer) -> str:
  """sha256 (hex) of :func:`canonical_json`."""
  return hashlib.sha256(canonical_json(tok).encode("utf-8")).hexdigest()


class Tokenizer:
  """A loaded tokenizer with numpy outputs and resolved ``pad_id`` / ``eos_id``.

  Args:
    tok: the underlying ``tokenizers.Tokenizer``.
    eos_token: the end-of-document token; found among common names when None.
    pad_token: the padding token; found among common names when None, else
      the eos token is used for padding.
    source: where the tokenizer came from, for error messages.
  """

  def __init__(self, tok: tokenizers.Tokenizer, *, eos_token: str | None = None,
               pad_token: str | None = None, source: str = "<memory>"):
    self._tok = tok
    self._tok.encode_special_tokens = True  # text is text: "<eos>" in a file is not id 1
    self.source = source
    self.eos_id = self._resolve(eos_token, EOS_CANDIDATES, "eos")
    try:
      self.pad_id = self._resolve(pad_token, PAD_CANDIDATES, "pad")
    except TokenizerError:
      if pad_token is not None:
        raise
      self.pad_id = self.eos_id
    self.fingerprint = fingerprint_of(tok)

  def _resolve(self, name: str | None, candidates: Sequence[str], role: str) -> int:
    names = (name,) if name is not None else candidates
    for n in names:
      idx = self._tok.token_to_id(n)
      if idx is not None:
        return int(idx)
    raise TokenizerError(f"{self.source}: no {role} token found (tried {', '.join(names)}); "
                         f"name it explicitly with {role}_token=...")

  @classmethod
  def from_file(cls, path: str | Path, **kwargs) -> "Tokenizer":
    """Loads a Hugging Face ``tokenizer.json``."""
    path = Path(path)
    if not path.is_file():
      raise TokenizerError(f"tokenizer file not found: {path}")
    try:
      tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception with the parse error
      raise TokenizerError(f"{path}: not a valid tokenizer.json: {e}") from e
    return cls(tok, source=str(path), **kwargs)

  def save(self, path: str | Path) -> None:
    """Writes ``tokenizer.json`` (loadable by ``tokenizers`` and ``transformers``)."""
    self._tok.save(str(path))

  @property
  def vocab_size(self) -> int:
    """Number of token ids, special tokens included."""
    return int(self._tok.get_vocab_size(with_added_tokens=True))

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The wrapped ``tokenizers.Tokenizer``."""
    return self._tok

  def encode(self, text: str, *, add_special_tokens: bool = False) -> np.ndarray:
    """Text -> ids, shape (N,) int32. No BOS/EOS unless ``add_special_tokens``."""
    return np.asarray(self._tok.encode(text, add_special_tokens=add_special_tokens).ids,
                      dtype=np.int32)

  def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False
                   ) -> list[np.ndarray]:
    """Encodes many texts in parallel (Rust threads); one int32 array per text."""
    encs = self._tok.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)
    return [np.asarray(e.ids, dtype=np.int32) for e in encs]

  def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
    """Ids -> text; special tokens are dropped unless ``skip_special_tokens=False``."""
    ids = np.asarray(ids).reshape(-1)
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise TokenizerError(f"token id {int(bad[0])} outside the vocabulary [0, {self.vocab_size})")
    return self._tok.decode(ids.tolist(), skip_special_tokens=skip_special_tokens)

  def __repr__(self) -> str:
    return (f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id}, fingerprint={self.fingerprint[:12]})")


def _texts_from_files(files: Iterable[str | Path]) -> Iterator[str]:
  for f in files:
    yield Path(f).read_text(encoding="utf-8")


def train_bpe(data: Iterable[str | Path] | Iterable[str], vocab_size: int = 8192, *,
              from_files: bool | None = None, min_frequency: int = 2,
              show_progress: bool = False) -> Tokenizer:
  """Trains a byte-level BPE tokenizer (``<pad>`` = id 0, ``<eos>`` = id 1).

  Every byte is in the initial alphabet, so any text encodes without unknown
  tokens and decodes back exactly. Training is deterministic for a given input.

  Args:
    data: texts, or paths of UTF-8 files (``pathlib.Path`` items, or set
      ``from_files=True`` for string paths).
    vocab_size: final vocabulary size including the 256 bytes and 2 specials.
    from_files: whether ``data`` holds file paths; guessed from the first item's
      type (``Path`` -> files) when None.
    min_frequency: pairs seen fewer times are never merged.
    show_progress: the ``tokenizers`` training progress bar.
  """
  if vocab_size < NUM_BYTES + 2:
    raise ValueError(f"vocab_size={vocab_size} is below {NUM_BYTES + 2} (256 bytes + <pad> + <eos>)")
  items = list(data)
  if from_files is None:
    from_files = bool(items) and isinstance(items[0], Path)
  texts: Iterable[str] = _texts_from_files(items) if from_files else items
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
      special_tokens=[PAD_TOKEN, EOS_TOKEN],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer, length=len(items))
  return Tokenizer(tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, source="train_bpe")
