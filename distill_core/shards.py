"""Teacher-answer shards: one record per example, the wire's own encoding, a manifest.

A dump (``python -m teacher_server.dump``) and the ``cached`` teacher source write
the teacher's answers to ArrayRecord files; the ``offline`` and ``cached`` sources
read them back by example id. A record is one example's answer::

  offset  size  field
  0       4     magic b"DKTA"
  4       1     record version (uint8, currently 1)
  5       1     flags: bit 0 = payload is zstd-compressed
  6       2     reserved, zero
  8       8     example id (int64)
  16      4     payload length P (uint32)
  20      P     payload: a serialized ``ForwardResponse`` for B = 1 (``request_id`` = example id),
                the very message the server sends (distill_core/wire.py): top-k ids bit-packed,
                values in the stored dtype (sorted-delta coded by default), logsumexp f32 per
                temperature, layer states and any other tensor the answer carries
  20+P    4     crc32 of bytes [0, 20+P) (uint32)

Every record names the teacher that wrote it: the payload's
``replica.weights_fingerprint`` is the teacher's weights fingerprint (record
version 2). A reader checks it against the manifest's
``teacher.weights_fingerprint`` when it opens a shard (its first record) and on
every record it decodes, so a shard of another teacher, even one copied in with
its manifest entry, is refused naming the file. Version 1 answers carry no
such stamp and are refused with a message saying to dump them again.

Each writer (one dump process, or one student process's cache) keeps a progress
file ``progress-<writer>.json`` listing its finished shards with their sha256;
``manifest.json`` is their deterministic merge. A shard file appears under its
final name only once it is complete (it is staged and renamed), and only shards
listed in a progress file are ever read, so a crash never leaves a partial shard
that looks valid. Paths go through ``etils.epath`` (local or object-store URLs).
"""

from __future__ import annotations

import json
import struct
import uuid
import zlib
from typing import Any, Iterable, Literal, Sequence

import numpy as np
import pydantic
import zstandard
from etils import epath
from google.protobuf import json_format

from distill_core import wire
from distill_core.parts import BY_NAME, PARTS, Selection, ordered
from distill_core.proto import teacher_pb2 as pb
from distill_core.records import StrictModel
from distill_core.targets import TeacherTargets

FORMAT = "distill-teacher-answers"
FORMAT_VERSION = 2  # 2: every record stamped with the teacher's weights fingerprint
RECORD_VERSION = 2
MAGIC = b"DKTA"
MANIFEST_NAME = "manifest.json"
PROGRESS_PREFIX = "progress-"
SHARD_SUFFIX = ".array_record"
FLAG_ZSTD = 1
_REDUMP = ("; version 1 answers carry no teacher identity: dump them again with `python -m teacher_server.dump` "
           "(or start a new teacher.cached.path)")
_HEADER = struct.Struct("<4sBBHqI")  # magic, version, flags, reserved, example id, payload bytes
_CRC = struct.Struct("<I")


class ShardError(ValueError):
  """A shard, record or manifest is corrupt or does not fit; the message names the file (and record)."""


class TeacherInfo(StrictModel):
  """The teacher that produced the answers (from its GetInfo)."""

  model_type: str = pydantic.Field(description="Teacher architecture family.")
  weights_fingerprint: str = pydantic.Field(description="sha256 over the teacher's parameters.")
  tokenizer_fingerprint: str = pydantic.Field(description="Tokenizer fingerprint the teacher reports.")
  vocab_size: int = pydantic.Field(description="Real vocabulary size (ids are below it).")
  num_layers: int = pydantic.Field(description="Teacher depth.")
  hidden_size: int = pydantic.Field(description="Teacher width (the width of stored layer states).")

  @classmethod
  def from_info(cls, info: pb.GetInfoResponse) -> "TeacherInfo":
    return cls(model_type=info.model_type, weights_fingerprint=info.weights_fingerprint,
               tokenizer_fingerprint=info.tokenizer_fingerprint, vocab_size=info.vocab_size,
               num_layers=info.num_layers, hidden_size=info.hidden_size)


class DatasetInfo(StrictModel):
  """The prepared dataset whose examples were answered."""

  path: str = pydantic.Field(description="Prepared dataset directory at dump time (informational).")
  dataset_fingerprint: str = pydantic.Field(description="dataset_fingerprint of its manifest.json.")
  tokenizer_fingerprint: str = pydantic.Field(description="tokenizer_fingerprint of its manifest.json.")
  seq_len: int = pydantic.Field(description="Tokens per example (T of every record).")
  splits: dict[str, int] = pydantic.Field(description="Splits answered -> their example counts.")

  def identity(self) -> dict[str, Any]:
    """Everything but the (informational) path: what two writers must agree on."""
    return self.model_dump(exclude={"path"})


class StoredSpec(StrictModel):
  """What every record holds: the request's ``OutputSpec`` plus the storage options."""

  request: dict[str, Any] = pydantic.Field(
      description="The OutputSpec sent for every example (protobuf JSON, field names as in teacher.proto).")
  id_bits: int = pydantic.Field(description="Bits per packed top-k id (0 = int32).")
  value_coding: Literal["sorted_delta", "raw"] = pydantic.Field(description="Layout of the top-k values.")
  zstd_level: int = pydantic.Field(description="zstd level of each record's payload (0 = uncompressed).")

  @classmethod
  def build(cls, spec: wire.OutputSpec, *, id_bits: int, value_coding: str, zstd_level: int) -> "StoredSpec":
    request = json_format.MessageToDict(spec.to_proto(), preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
    if not request.get("part_options"):  # manifests without parts' own options read as they always did
      request.pop("part_options", None)
    return cls(request=request, id_bits=id_bits, value_coding=value_coding, zstd_level=zstd_level)

  @property
  def proto(self) -> pb.OutputSpec:
    return json_format.ParseDict(self.request, pb.OutputSpec())

  @property
  def k(self) -> int:
    return self.proto.k

  @property
  def temperatures(self) -> tuple[float, ...]:
    return tuple(float(np.float32(t)) for t in self.proto.temperatures) or (1.0,)

  @property
  def value_dtype(self) -> str:
    return wire.dtype_name(self.proto.value_dtype or pb.DTYPE_FLOAT16)

  @property
  def layers(self) -> tuple[int, ...]:
    return tuple(self.proto.layers)

  @property
  def states(self) -> tuple[str, ...]:
    proto = self.proto
    return tuple(proto.states) or (("attn_out",) if proto.layers else ())

  @property
  def parts(self) -> tuple[tuple[str, Any], ...]:
    """(part name, request) of every part each record answers (also read by the part's name: `spec.<part>`)."""
    proto = self.proto
    return ordered((part.name, part.read_request(proto)) for part in PARTS)

  def __getattr__(self, name: str):
    if name in BY_NAME:
      return dict(self.parts).get(name)
    return super().__getattr__(name)


class ShardInfo(StrictModel):
  """One finished shard."""

  file: str = pydantic.Field(description="File name, relative to the answers directory.")
  writer: str = pydantic.Field(description="The writer (dump process or cache) that wrote it.")
  records: int = pydantic.Field(description="Records (examples) in the file.")
  positions: int = pydantic.Field(description="Positions answered (records x seq_len).")
  tokens: int = pydantic.Field(description="Real (non-padding) tokens among them.")
  bytes: int = pydantic.Field(description="File size.")
  temperatures: list[float] = pydantic.Field(description="Temperatures of the logsumexp columns stored.")
  sha256: str = pydantic.Field(description="sha256 (hex) of the whole file.")
  ids: list[tuple[int, int, int]] = pydantic.Field(
      description="Example ids of the records in order, as (start, count, step) runs.")


class _Header(StrictModel):
  format: str = pydantic.Field(FORMAT, description="Always 'distill-teacher-answers'.")
  format_version: int = pydantic.Field(FORMAT_VERSION, description="Manifest format version.")
  record_version: int = pydantic.Field(RECORD_VERSION, description="Record format version.")
  teacher: TeacherInfo = pydantic.Field(description="Who answered.")
  dataset: DatasetInfo = pydantic.Field(description="What was answered.")
  spec: StoredSpec = pydantic.Field(description="What each record holds.")


class Progress(_Header):
  """``progress-<writer>.json``: one writer's finished shards (rewritten after each)."""

  writer: str = pydantic.Field(description="Writer name, e.g. 'p00000-of-00002' or 'cache-p00000'.")
  shards: list[ShardInfo] = pydantic.Field(default_factory=list, description="Finished shards, in order.")


class Manifest(_Header):
  """``manifest.json``: the merge of every writer's progress."""

  writers: list[str] = pydantic.Field(description="Writers merged, sorted.")
  shards: list[ShardInfo] = pydantic.Field(description="Every finished shard, by writer then order.")
  records: int = pydantic.Field(description="Records over all shards.")
  positions: int = pydantic.Field(description="Positions over all shards.")
  tokens: int = pydantic.Field(description="Real tokens over all shards.")
  bytes: int = pydantic.Field(description="Bytes over all shards.")
  complete: bool = pydantic.Field(description="Every example of every split in dataset.splits is stored.")

  @pydantic.model_validator(mode="after")
  def _shards_add_up(self) -> "Manifest":
    seen: set[str] = set()
    for shard in self.shards:
      if shard.file in seen:
        raise ValueError(f"shards: {shard.file} is listed twice")
      seen.add(shard.file)
    total = sum(shard.records for shard in self.shards)
    if self.records != total:
      raise ValueError(f"records: {self.records}, but its shards hold {total}")
    return self

  @property
  def temperatures(self) -> tuple[float, ...]:
    """Every temperature some record stores (a dump: exactly spec.temperatures)."""
    return tuple(sorted({t for shard in self.shards for t in shard.temperatures} or self.spec.temperatures))


# -- records ---------------------------------------------------------------------------------------

def encode_record(example_id: int, targets: TeacherTargets, spec: StoredSpec, *, weights_fingerprint: str) -> bytes:
  """One example's answer (numpy targets with B = 1) as a record, stamped with the teacher's weights."""
  if targets.batch_size != 1:
    raise ValueError(f"a record holds one example, got a batch of {targets.batch_size}")
  if not weights_fingerprint:
    raise ValueError("a record names the teacher that answered: weights_fingerprint is empty")
  resp = wire.targets_to_response(int(example_id), targets, packed_id_bits=spec.id_bits,
                                  sorted_delta_values=spec.value_coding == "sorted_delta")
  resp.replica.weights_fingerprint = weights_fingerprint
  payload = resp.SerializeToString()
  flags = 0
  if spec.zstd_level:
    payload = zstandard.ZstdCompressor(level=spec.zstd_level).compress(payload)
    flags |= FLAG_ZSTD
  body = _HEADER.pack(MAGIC, RECORD_VERSION, flags, 0, int(example_id), len(payload)) + payload
  return body + _CRC.pack(zlib.crc32(body))


def decode_record(data: bytes, where: str, *, weights_fingerprint: str | None = None) -> tuple[int, TeacherTargets]:
  """(example id, numpy targets with B = 1) of a record, after checking magic, length and crc32, and
  (when `weights_fingerprint` is given) that the record was written by that teacher."""
  if len(data) < _HEADER.size + _CRC.size:
    raise ShardError(f"{where}: record of {len(data)} bytes is shorter than its header; corrupt record")
  magic, version, flags, _, example_id, size = _HEADER.unpack_from(data, 0)
  if magic != MAGIC:
    raise ShardError(f"{where}: bad magic {magic!r} (expected {MAGIC!r}); corrupt or not a teacher-answer record")
  if len(data) != _HEADER.size + size + _CRC.size:
    raise ShardError(f"{where}: record is {len(data)} bytes, its header says {_HEADER.size + size + _CRC.size}; "
                     "corrupt record")
  (stored,) = _CRC.unpack_from(data, len(data) - _CRC.size)
  computed = zlib.crc32(memoryview(data)[:len(data) - _CRC.size])
  if stored != computed:
    raise ShardError(f"{where}: crc32 mismatch (stored {stored:#010x}, computed {computed:#010x}); corrupt record")
  if version != RECORD_VERSION:
    raise ShardError(f"{where}: record version {version}, this code reads {RECORD_VERSION}{_REDUMP}")
  payload = memoryview(data)[_HEADER.size:_HEADER.size + size]
  if flags & FLAG_ZSTD:
    payload = zstandard.ZstdDecompressor().decompress(payload)
  try:
    resp = pb.ForwardResponse.FromString(bytes(payload))
    targets = wire.response_to_targets(resp)
  except (wire.WireError, ValueError) as e:  # protobuf's DecodeError is a ValueError too
    raise ShardError(f"{where}: undecodable answer: {e}") from e
  if resp.request_id != example_id:
    raise ShardError(f"{where}: answer of example {resp.request_id} in the record of example {example_id}")
  stamped = resp.replica.weights_fingerprint
  if weights_fingerprint is not None and stamped != weights_fingerprint:
    raise ShardError(f"{where}: teacher.weights_fingerprint: the record was written by teacher weights "
                     f"{stamped[:16] or '(none)'}..., the manifest names {weights_fingerprint[:16]}...; a shard of "
                     "another teacher")
  if targets.batch_size != 1:
    raise ShardError(f"{where}: record holds {targets.batch_size} rows, expected 1")
  return int(example_id), targets


# -- id runs ---------------------------------------------------------------------------------------

def id_runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
  """Example ids as (start, count, step) runs (an arithmetic progression per run)."""
  ids = np.asarray(ids, np.int64)
  runs: list[tuple[int, int, int]] = []
  i = 0
  while i < ids.size:
    if i + 1 == ids.size:
      runs.append((int(ids[i]), 1, 1))
      break
    step = int(ids[i + 1] - ids[i])
    j = i + 1
    while j + 1 < ids.size and ids[j + 1] - ids[j] == step:
      j += 1
    if step == 0:
      runs.extend((int(ids[n]), 1, 1) for n in range(i, j + 1))
    else:
      runs.append((int(ids[i]), j - i + 1, step))
    i = j + 1
  return runs


def expand_runs(runs: Iterable[Sequence[int]]) -> np.ndarray:
  """Inverse of :func:`id_runs` (int64)."""
  parts = [start + step * np.arange(count, dtype=np.int64) for start, count, step in runs]
  return np.concatenate(parts) if parts else np.zeros(0, np.int64)


# -- progress files and the manifest -------------------------------------------------------------

def _write_json(path: epath.Path, data: dict) -> None:
  """Atomic for local paths (temp file + rename); object stores replace objects whole."""
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"  # writers of one directory never share a temp file
  tmp.write_text(json.dumps(data, indent=1) + "\n")
  tmp.replace(path)


def progress_path(root: str | epath.Path, writer: str) -> epath.Path:
  return epath.Path(root) / f"{PROGRESS_PREFIX}{writer}.json"


def read_progress(root: str | epath.Path, writer: str) -> Progress | None:
  path = progress_path(root, writer)
  if not path.exists():
    return None
  return _parse(Progress, path)


def write_progress(root: str | epath.Path, progress: Progress) -> None:
  _write_json(progress_path(root, progress.writer), progress.model_dump(mode="json"))


def _parse(model, path: epath.Path):
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ShardError(f"{path}: invalid {model.__name__.lower()} file: not JSON ({e})") from None
  if isinstance(data, dict) and data.get("format") == FORMAT and data.get("format_version") != FORMAT_VERSION:
    raise ShardError(f"{path}: format_version {data.get('format_version')}, this code reads {FORMAT_VERSION}"
                     f"{_REDUMP}")
  try:
    return model.model_validate(data)
  except pydantic.ValidationError as e:
    problems = "; ".join(((".".join(map(str, err["loc"])) + ": ") if err["loc"] else "")
                         + err["msg"].removeprefix("Value error, ") for err in e.errors())
    raise ShardError(f"{path}: invalid {model.__name__.lower()} file: {problems}") from None


def differs(a, b) -> bool:
  """Whether two header fields disagree (a dataset's path does not count)."""
  if isinstance(a, DatasetInfo) and isinstance(b, DatasetInfo):
    return a.identity() != b.identity()
  return a != b


def merge_progress(root: str | epath.Path) -> Manifest | None:
  """The manifest of every ``progress-*.json`` under `root` (None when there is none).

  The merge is deterministic: writers sorted by name, each one's shards in order.
  Writers must agree on teacher, dataset and spec.
  """
  root = epath.Path(root)
  paths = sorted(root.glob(f"{PROGRESS_PREFIX}*.json")) if root.exists() else []
  if not paths:
    return None
  parts = [_parse(Progress, p) for p in paths]
  first = parts[0]
  for path, part in zip(paths[1:], parts[1:]):
    for field in ("format_version", "record_version", "teacher", "dataset", "spec"):
      if differs(getattr(part, field), getattr(first, field)):
        raise ShardError(f"{path}: {field} differs from {paths[0].name}: {getattr(part, field)!r} vs "
                         f"{getattr(first, field)!r}")
  shards = [s for part in sorted(parts, key=lambda p: p.writer) for s in part.shards]
  records = sum(s.records for s in shards)
  return Manifest(
      teacher=first.teacher, dataset=first.dataset, spec=first.spec, writers=sorted(p.writer for p in parts),
      shards=shards, records=records, positions=sum(s.positions for s in shards),
      tokens=sum(s.tokens for s in shards), bytes=sum(s.bytes for s in shards),
      complete=records >= sum(first.dataset.splits.values()))


def write_manifest(root: str | epath.Path) -> Manifest | None:
  """Merges the progress files into ``manifest.json`` (atomically); returns the manifest."""
  manifest = merge_progress(root)
  if manifest is not None:
    _write_json(epath.Path(root) / MANIFEST_NAME, manifest.model_dump(mode="json"))
  return manifest


def read_manifest(root: str | epath.Path) -> Manifest:
  path = epath.Path(root) / MANIFEST_NAME
  if not path.exists():
    raise ShardError(f"{path}: not found; write answers with `python -m teacher_server.dump` first")
  manifest = _parse(Manifest, path)
  if manifest.format != FORMAT or manifest.format_version != FORMAT_VERSION:
    raise ShardError(f"{path}: format {manifest.format!r} version {manifest.format_version}, this code reads "
                     f"{FORMAT!r} version {FORMAT_VERSION}")
  return manifest


def select(targets: TeacherTargets, *, temperature: float, k: int, layers: Sequence[int] = (),
           states: Sequence[str] = (), where: str = "answers") -> TeacherTargets:
  """Stored targets trimmed to what a step asks, part by part: the logsumexp column of exactly
  `temperature` (as float32), the first k entries, the state rows of `layers` (in that order) for
  `states`; a part kept whole where the step asks nothing of it."""
  need = Selection(k=k, temperature=temperature, layers=tuple(layers), states=tuple(states))
  try:
    return TeacherTargets.of({name: BY_NAME[name].select(value, need, where)
                              for name, value in targets.parts.items()})
  except ShardError:
    raise
  except ValueError as e:
    raise ShardError(str(e)) from None
