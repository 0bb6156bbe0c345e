"""On-disk formats of a prepared dataset: the packed-example record and the manifest.

A record is one packed example as raw little-endian bytes::

  offset  size   field
  0       4      magic b"DKEX"
  4       2      format version (uint16, currently 1)
  6       2      number of int32 arrays (uint16, always 3)
  8       8      example id (int64)
  16      4      seq_len T (uint32)
  20      4      reserved, zero
  24      4*T    tokens       int32
  24+4T   4*T    segment_ids  int32 (0 = padding, 1, 2, ... per document piece)
  24+8T   4*T    positions    int32 (restart at 0 in every segment)
  24+12T  4      crc32 of bytes [0, 24+12T) (uint32)

Decoding is ``np.frombuffer`` (no pickle); any mismatch raises
:class:`RecordError` naming where the record came from.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from array_record.python.array_record_module import ArrayRecordWriter

MAGIC = b"DKEX"
RECORD_VERSION = 1
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
SHARD_SUFFIX = ".array_record"
_HEADER = struct.Struct("<4sHHqII")  # magic, version, n_arrays, example_id, seq_len, reserved
HEADER_BYTES = _HEADER.size  # 24
_CRC = struct.Struct("<I")
_FIELDS = ("tokens", "segment_ids", "positions")
_I32 = np.dtype("<i4")


class RecordError(ValueError):
  """A record or a prepared dataset is malformed or corrupt; the message names the file."""


def record_size(seq_len: int) -> int:
  """Bytes of one encoded record of length ``seq_len``."""
  return HEADER_BYTES + 12 * seq_len + _CRC.size


def encode_record(example_id: int, tokens: np.ndarray, segment_ids: np.ndarray,
                  positions: np.ndarray) -> bytes:
  """Encodes one packed example; the three arrays are (T,) integers fitting int32."""
  seq_len = len(tokens)
  arrays = [np.asarray(a) for a in (tokens, segment_ids, positions)]
  for name, a in zip(_FIELDS, arrays):
    if a.shape != (seq_len,):
      raise ValueError(f"{name} has shape {a.shape}, expected ({seq_len},)")
  header = _HEADER.pack(MAGIC, RECORD_VERSION, len(_FIELDS), int(example_id), seq_len, 0)
  body = header + b"".join(a.astype(_I32, copy=False).tobytes() for a in arrays)
  return body + _CRC.pack(zlib.crc32(body))


def decode_record(data: bytes, *, seq_len: int | None = None, where: str = "record"
                  ) -> dict[str, Any]:
  """Decodes and verifies one record.

  Args:
    data: the record's bytes.
    seq_len: the expected length (from the manifest); checked when given.
    where: names the record's origin (shard file and index) in errors.

  Returns:
    ``{"example_ids": int64 scalar, "tokens", "segment_ids", "positions": (T,) int32}``.
  """
  if len(data) < HEADER_BYTES + _CRC.size:
    raise RecordError(f"{where}: record of {len(data)} bytes is shorter than its header")
  magic, version, n_arrays, example_id, t, _ = _HEADER.unpack_from(data, 0)
  if magic != MAGIC:
    raise RecordError(f"{where}: bad magic {magic!r} (expected {MAGIC!r}); corrupt or not a "
                      "prepared-dataset record")
  if len(data) != record_size(t) or n_arrays != len(_FIELDS):
    raise RecordError(f"{where}: record is {len(data)} bytes with seq_len={t}, "
                      f"expected {record_size(t)}; corrupt record")
  (stored,) = _CRC.unpack_from(data, len(data) - _CRC.size)
  computed = zlib.crc32(memoryview(data)[: len(data) - _CRC.size])
  if stored != computed:
    raise RecordError(f"{where}: crc32 mismatch (stored {stored:#010x}, computed "
                      f"{computed:#010x}); corrupt record")
  if version != RECORD_VERSION:
    raise RecordError(f"{where}: record format version {version}, this code reads "
                      f"{RECORD_VERSION}")
  if seq_len is not None and t != seq_len:
    raise RecordError(f"{where}: seq_len {t} differs from the manifest's {seq_len}")
  arrays = np.frombuffer(data, dtype=_I32, count=3 * t, offset=HEADER_BYTES).reshape(3, t)
  out: dict[str, Any] = {"example_ids": np.int64(example_id)}
  for name, row in zip(_FIELDS, arrays):
    out[name] = row.astype(np.int32)  # native-endian, writable copy
  return out


class StrictModel(pydantic.BaseModel):
  """A frozen, closed record of an on-disk format (unknown keys are an error): manifests and their parts."""
  model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class ShardInfo(StrictModel):
  """One ArrayRecord file of a split."""

  file: str = pydantic.Field(description="File name, relative to the dataset directory.")
  records: int = pydantic.Field(description="Number of records (packed examples) in the file.")
  sha256: str = pydantic.Field(description="sha256 (hex) of the whole file.")


class SplitInfo(StrictModel):
  """Statistics and shards of one split."""

  files: int = pydantic.Field(description="Source files assigned to this split.")
  bytes: int = pydantic.Field(description="UTF-8 bytes of those files.")
  documents: int = pydantic.Field(description="Documents packed (non-empty files).")
  tokens: int = pydantic.Field(description="Real tokens, the <eos> after each document included.")
  examples: int = pydantic.Field(description="Packed rows of seq_len tokens.")
  first_example_id: int = pydantic.Field(description="Id of the first row; ids are consecutive.")
  records_sha256: str = pydantic.Field(description="sha256 over this split's records in order.")
  shards: list[ShardInfo] = pydantic.Field(description="ArrayRecord files, in order.")


class Manifest(StrictModel):
  """``manifest.json`` of a prepared dataset directory."""

  format_version: int = pydantic.Field(description="Manifest format version.")
  record_version: int = pydantic.Field(description="Record format version (see records.py).")
  seq_len: int = pydantic.Field(description="Tokens per packed example.")
  vocab_size: int = pydantic.Field(description="Tokenizer vocabulary size, specials included.")
  pad_id: int = pydantic.Field(description="Token id written at padding positions.")
  eos_id: int = pydantic.Field(description="Token id appended after every document.")
  tokenizer_file: str = pydantic.Field(description="Tokenizer file name in the directory.")
  tokenizer_fingerprint: str = pydantic.Field(description="sha256 of the canonical tokenizer JSON.")
  dataset_fingerprint: str = pydantic.Field(
      description="sha256 over format, seq_len, tokenizer fingerprint and every split's records.")
  source_fingerprint: str = pydantic.Field(
      description="sha256 over the selected source files' relative paths and contents.")
  config: dict[str, Any] = pydantic.Field(description="The preparation config that produced it.")
  splits: dict[str, SplitInfo] = pydantic.Field(description="Per split: statistics and shards.")
  skipped_files: list[str] = pydantic.Field(
      default_factory=list, description="Selected files left out because they are not UTF-8.")

  def shard_paths(self, root: str | Path, split: str) -> list[Path]:
    """Absolute shard paths of ``split``; a clear error when the split is unknown."""
    if split not in self.splits:
      raise RecordError(f"{Path(root) / MANIFEST_NAME}: no split {split!r} "
                        f"(have {', '.join(sorted(self.splits))})")
    return [Path(root) / s.file for s in self.splits[split].shards]


def write_manifest(manifest: Manifest, root: str | Path) -> Path:
  """Writes ``manifest.json`` atomically (temp file + rename)."""
  path = Path(root) / MANIFEST_NAME
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
  tmp.replace(path)
  return path


def read_manifest(root: str | Path) -> Manifest:
  """Reads and validates ``<root>/manifest.json``."""
  path = Path(root) / MANIFEST_NAME
  if not path.is_file():
    raise RecordError(f"{path}: not found; run `python -m distill_core.prepare` first")
  try:
    data = json.loads(path.read_text())
    manifest = Manifest.model_validate(data)
  except (json.JSONDecodeError, pydantic.ValidationError) as e:
    raise RecordError(f"{path}: invalid manifest: {e}") from e
  if manifest.format_version != MANIFEST_VERSION:
    raise RecordError(f"{path}: manifest format {manifest.format_version}, this code reads "
                      f"{MANIFEST_VERSION}")
  return manifest


def write_shards(out_dir: str | Path, split: str, tokens: np.ndarray, segment_ids: np.ndarray,
                 positions: np.ndarray, first_example_id: int, records_per_shard: int,
                 advance=None) -> tuple[list[ShardInfo], str]:
  """Writes the (N, T) packed rows of ``split`` as ArrayRecord shards.

  Row i gets example id ``first_example_id + i``. Shards are named
  ``<split>-<index>-of-<count>.array_record`` and written with ``group_size:1``
  (every record individually addressable).

  Args:
    advance: optional callable taking a number of records written (progress).

  Returns:
    The shards' descriptions and the sha256 over all records in order.
  """
  n = len(tokens)
  n_shards = -(-n // records_per_shard)
  split_hash = hashlib.sha256()
  shards = []
  for s in range(n_shards):
    name = f"{split}-{s:05d}-of-{n_shards:05d}{SHARD_SUFFIX}"
    path = Path(out_dir) / name
    lo, hi = s * records_per_shard, min(n, (s + 1) * records_per_shard)
    writer = ArrayRecordWriter(str(path), "group_size:1")
    try:
      for i in range(lo, hi):
        rec = encode_record(first_example_id + i, tokens[i], segment_ids[i], positions[i])
        split_hash.update(rec)
        writer.write(rec)
    finally:
      writer.close()
    shards.append(ShardInfo(file=name, records=hi - lo, sha256=file_sha256(path)))
    if advance is not None:
      advance(hi - lo)
  return shards, split_hash.hexdigest()


def file_sha256(path: str | Path) -> str:
  """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
