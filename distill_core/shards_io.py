"""Writing and reading teacher-answer shards (format: ``shards.py``).

:class:`ShardWriter` appends records of one writer to numbered ArrayRecord
files, staged under a temporary name and moved into place when finished, then
listed (with sha256) in the writer's progress file and merged into the manifest.
:class:`AnswerStore` opens the finished shards named by the manifest, checks
them, and reads answers by example id from any thread.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from grain.sources import ArrayRecordDataSource

from distill_core import shards
from distill_core.shards import Progress, ShardError, ShardInfo
from distill_core.targets import TeacherTargets, concat

log = logging.getLogger(__name__)


def is_local(path: str | epath.Path) -> bool:
  return "://" not in str(path)


def file_sha256(path: str | epath.Path) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


class ShardWriter:
  """Appends one writer's records to shards of the answers directory `root`.

  Args:
    root: the answers directory (local path or epath URL).
    progress: the writer's progress so far (header + finished shards); updated per shard.
    name_of: shard index -> file name.
    next_index: index of the first shard this writer opens.
    records_per_shard: the current shard is finished when it holds this many records
      (a dump also finishes shards explicitly at its planned boundaries).
  """

  def __init__(self, root: str | epath.Path, progress: Progress, *, name_of: Callable[[int], str],
               next_index: int = 0, records_per_shard: int = 1024):
    self._writer_cls = ArrayRecordWriter
    self.root = epath.Path(root)
    self.root.mkdir(parents=True, exist_ok=True)
    self.progress = progress
    self._name_of = name_of
    self._index = next_index
    self._per_shard = records_per_shard
    self._staging = Path(self.root / ".partial") if is_local(self.root) else Path(tempfile.mkdtemp("-shards"))
    self._staging.mkdir(parents=True, exist_ok=True)
    self._open: tuple[Path, object] | None = None
    self._ids: list[int] = []
    self._tokens = 0
    self._temps: set[float] = set()
    self._positions = 0

  @property
  def pending(self) -> int:
    """Records in the unfinished shard."""
    return len(self._ids)

  def add(self, example_id: int, record: bytes, *, positions: int, tokens: int,
          temperatures: Sequence[float]) -> ShardInfo | None:
    """Appends one record; returns the shard it finished, if any."""
    if self._open is None:
      path = self._staging / self._name_of(self._index)
      path.unlink(missing_ok=True)
      # One record per chunk (random access); no ArrayRecord compression: records are compact already and
      # zstd, when asked for, is applied per record (StoredSpec.zstd_level), so sizes are what the format says.
      self._open = (path, self._writer_cls(str(path), "group_size:1,uncompressed"))
    self._open[1].write(record)
    self._ids.append(int(example_id))
    self._positions += positions
    self._tokens += tokens
    self._temps.update(float(t) for t in temperatures)
    return self.finish_shard() if len(self._ids) >= self._per_shard else None

  def finish_shard(self) -> ShardInfo | None:
    """Closes the current shard, moves it into place and records it (None if it is empty)."""
    if self._open is None:
      return None
    staged, writer = self._open
    writer.close()
    self._open = None
    name = self._name_of(self._index)
    final = self.root / name
    info = ShardInfo(file=name, writer=self.progress.writer, records=len(self._ids), positions=self._positions,
                     tokens=self._tokens, bytes=staged.stat().st_size, temperatures=sorted(self._temps),
                     sha256=file_sha256(staged), ids=shards.id_runs(self._ids))
    if is_local(self.root):
      staged.replace(Path(final))
    else:
      epath.Path(staged).copy(final, overwrite=True)
      staged.unlink()
    self._index += 1
    self._ids, self._positions, self._tokens, self._temps = [], 0, 0, set()
    progress = self.progress.model_copy(update={"shards": [*self.progress.shards, info]})
    shards.write_progress(self.root, progress)
    shards.write_manifest(self.root)
    # Published last: a reader on another thread that sees the shard in `progress` finds it in the manifest.
    self.progress = progress
    return info

  def close(self, *, keep_partial: bool = True) -> None:
    """Finishes the current shard (or drops it when `keep_partial` is false)."""
    if keep_partial:
      self.finish_shard()
    elif self._open is not None:
      self._open[1].close()
      self._open[0].unlink(missing_ok=True)
      self._open = None
    if not is_local(self.root):
      shutil.rmtree(self._staging, ignore_errors=True)


class MissingAnswers(KeyError):
  """Example ids that no shard holds."""

  def __init__(self, ids: Sequence[int], root, hint: str = ""):
    self.ids = [int(i) for i in ids]
    shown = ", ".join(map(str, self.ids[:8])) + (", ..." if len(self.ids) > 8 else "")
    super().__init__(f"{root}: no stored answer for example id(s) {shown} ({len(self.ids)} missing)"
                     + (f"; {hint}" if hint else ""))

  def __str__(self) -> str:
    return self.args[0]


class AnswerStore:
  """Answers by example id from the finished shards of an answers directory.

  Args:
    root: the answers directory.
    verify: check every shard's sha256 against the manifest when it is opened.
    must_exist: a missing manifest is an error (otherwise the store is empty until one appears: a cache
      whose first shard is not finished yet).
  """

  def __init__(self, root: str | epath.Path, *, verify: bool = True, must_exist: bool = True):
    self.root = epath.Path(root)
    self._verify = verify
    self._must_exist = must_exist
    self._lock = threading.Lock()
    self._sources: list = []
    self._paths: list[str] = []
    self._temps: list[set[float]] = []  # per shard: the temperatures its records store
    self._index: dict[int, tuple[int, int]] = {}
    self._opened: set[str] = set()
    self.manifest: shards.Manifest | None = None
    self.refresh()

  def __len__(self) -> int:
    return len(self._index)

  def __contains__(self, example_id: int) -> bool:
    return int(example_id) in self._index

  def refresh(self) -> int:
    """Re-reads the manifest and opens shards finished since; returns the records added.

    Without `must_exist`, a directory with no manifest yet (no shard finished) holds nothing: 0.
    """
    if not self._must_exist and not (self.root / shards.MANIFEST_NAME).exists():
      return 0  # the manifest is written atomically and never removed: absent now means nothing finished
    manifest = shards.read_manifest(self.root)
    added = 0
    for info in manifest.shards:
      if info.file in self._opened:
        continue
      path = self.root / info.file
      if not path.exists():
        raise ShardError(f"{path}: shard listed in the manifest is missing")
      if self._verify and file_sha256(path) != info.sha256:
        raise ShardError(f"{path}: sha256 differs from the manifest ({info.sha256[:16]}...); corrupt or truncated "
                         "shard")
      try:
        source = ArrayRecordDataSource([str(path)])
      except (RuntimeError, OSError, ValueError) as e:
        raise ShardError(f"{path}: cannot open shard: {e}") from e
      if len(source) != info.records:
        raise ShardError(f"{path}: has {len(source)} records, the manifest says {info.records}; truncated shard")
      if info.records:  # whose answers: the first record's stamp, before anything is trained on
        try:
          first = source[0]
        except RuntimeError as e:
          raise ShardError(f"{path} (record 0): corrupt shard: {e}") from e
        shards.decode_record(first, f"{path} (record 0)", weights_fingerprint=manifest.teacher.weights_fingerprint)
      ids = shards.expand_runs(info.ids)
      with self._lock:
        shard = len(self._sources)
        self._sources.append(source)
        self._paths.append(str(path))
        self._temps.append({float(np.float32(t)) for t in info.temperatures})
        for record, example_id in enumerate(ids.tolist()):
          if self._index.setdefault(example_id, (shard, record)) == (shard, record):
            added += 1
        self._opened.add(info.file)
    self.manifest = manifest
    return added

  def missing(self, ids: Sequence[int], temperature: float | None = None) -> list[int]:
    """The ids with no stored answer (at `temperature`, when given)."""
    want = None if temperature is None else float(np.float32(temperature))
    with self._lock:
      return [int(i) for i in ids if (where := self._index.get(int(i))) is None
              or (want is not None and want not in self._temps[where[0]])]

  def read(self, example_id: int) -> TeacherTargets:
    """The stored answer of one example (B = 1, numpy)."""
    with self._lock:
      where = self._index.get(int(example_id))
    if where is None:
      raise MissingAnswers([example_id], self.root)
    shard, record = where
    name = f"{self._paths[shard]} (record {record})"
    try:
      raw = self._sources[shard][record]
    except RuntimeError as e:  # riegeli: corrupted block / hash mismatch
      raise ShardError(f"{name}: corrupt shard: {e}") from e
    stored_id, targets = shards.decode_record(raw, name, weights_fingerprint=self.manifest.teacher.weights_fingerprint)
    if stored_id != int(example_id):
      raise ShardError(f"{name}: holds example {stored_id}, the manifest says {example_id}")
    return targets

  def batch(self, ids: Sequence[int]) -> TeacherTargets:
    """Answers of `ids` stacked along B (numpy); MissingAnswers names ids not stored."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    missing = self.missing(ids)
    if missing:
      raise MissingAnswers(missing, self.root)
    return concat([self.read(i) for i in ids.tolist()])
