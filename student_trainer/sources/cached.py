"""The `cached` teacher source (remote + disk cache) and the `cached_shards` fallback policy.

    teacher.source: cached
    teacher.cached: {path: runs/teacher_cache}
    teacher.remote: {address: 127.0.0.1:50051, on_timeout: cached_shards}

Every batch is split by example id: rows whose answer (at the batch's
temperature) is in the cache are read from its shards and never requested;
only the other rows go to the teacher server, through the `remote` source.
Their answers are merged back in batch order and, on a background thread,
appended to the cache in the offline format (`distill_core/shards.py`): same
records, same manifest, so `teacher.source=offline` can read a cache too. A
run over data already cached asks the server for nothing.

The cache is crash-safe: a shard is written under `.partial/`, moved into
place when finished and only then listed (with its sha256) in this run's
progress file; a student killed mid-shard loses that shard's answers and
nothing else. Each run and process writes its own shards, so runs never
overwrite each other.

`cached_shards` (for `remote` and `cached`): when the teacher is overdue, a
batch that the cache holds entirely is served from it; anything else gets the
secondary policy (`teacher.cached.secondary`: `wait` or `ce_only`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from distill_core import shards, wire
from distill_core.data import Batch, load_manifest
from distill_core.shards import DatasetInfo, Progress, ShardError, StoredSpec, TeacherInfo
from distill_core.shards_io import AnswerStore, ShardWriter
from distill_core.targets import TeacherTargets, concat, slice_batch
from student_trainer.sources.base import TeacherSource
from student_trainer.sources.common import Student
from student_trainer.sources.offline import check_answers, place_on
from student_trainer.sources.remote import RemoteTeacher
from student_trainer.policy import CEOnlyPolicy, Decision, FallbackPolicy, Overdue, PolicyContext, WaitPolicy

log = logging.getLogger(__name__)
_DONE = object()


def _needs(student: Student, num_layers: int, states=None) -> tuple[int, tuple[int, ...], tuple[str, ...]]:
  """(k, teacher layers, state names) the student's steps ask for (`states` narrows the names)."""
  layers = student.feature_layers(num_layers)
  names = student.state_names if layers else ()
  names = names if states is None else tuple(name for name in names if name in states)
  return student.loss.request_k, layers if names else (), names


def _open_cache(ccfg, student: Student) -> AnswerStore:
  try:
    store = AnswerStore(ccfg.path, verify=ccfg.verify_shards, must_exist=False)
  except ShardError as e:
    raise ShardError(f"teacher.cached.path: {e}") from None
  if store.manifest is not None:
    check_answers(store.manifest, dataclasses.replace(student.needs(), temperatures=()),
                  where=f"teacher.cached.path={ccfg.path}")
  return store


def _served(store: AnswerStore, student: Student, ids: np.ndarray, temperature: float, names=None) -> TeacherTargets:
  """Host targets of `ids` from the cache, trimmed like a remote answer."""
  k, layers, states = _needs(student, store.manifest.teacher.num_layers, names)
  return shards.select(store.batch(ids), temperature=temperature, k=k, layers=layers, states=states,
                       where=f"teacher.cached.path={store.root}")


def rows_of(batch: Batch, rows: list[int]) -> Batch:
  """Rows of a host batch (every field has B first)."""
  return jax.tree.map(lambda x: np.asarray(x)[rows], batch)


class CacheWriter:
  """Appends answers to the cache on a background thread; a writer name per run and process.

  `ccfg`: teacher.cached (a `CachedTeacherConfig`); `data_path`: the student's data.path.
  """

  def __init__(self, ccfg, data_path: str, *, process_index: int, queue_size: int = 8):
    self._ccfg = ccfg
    self._data_path = data_path
    self.name = f"cache-p{process_index:05d}-{time.time_ns():x}"
    self._queue: queue.Queue = queue.Queue(queue_size)
    self._writer: ShardWriter | None = None
    self._error: BaseException | None = None
    self.records = 0
    self._thread = threading.Thread(target=self._run, name="teacher-cache", daemon=True)
    self._thread.start()

  def header(self, info, plan_spec: wire.OutputSpec) -> Progress:
    data = load_manifest(self._data_path)
    dataset = DatasetInfo(path=str(self._data_path), dataset_fingerprint=data.dataset_fingerprint,
                          tokenizer_fingerprint=data.tokenizer_fingerprint, seq_len=data.seq_len,
                          splits={name: split.examples for name, split in data.splits.items()})
    spec = StoredSpec.build(plan_spec, id_bits=wire.bits_for(info.vocab_size) if plan_spec.pack_ids else 0,
                            value_coding="sorted_delta", zstd_level=0)
    return Progress(teacher=TeacherInfo.from_info(info), dataset=dataset, spec=spec, writer=self.name)

  def put(self, header: Progress, batch: Batch, targets: TeacherTargets) -> None:
    if self._error is not None:
      raise ShardError(f"teacher.cached.path={self._ccfg.path}: writing the cache failed: "
                       f"{self._error}") from self._error
    self._queue.put((header, batch, targets))

  def _run(self) -> None:
    try:
      while (item := self._queue.get()) is not _DONE:
        header, batch, targets = item
        if self._writer is None:
          self._writer = ShardWriter(self._ccfg.path, header,
                                     name_of=lambda i: f"{self.name}-{i:05d}{shards.SHARD_SUFFIX}",
                                     records_per_shard=self._ccfg.records_per_shard)
        spec = self._writer.progress.spec
        temps = tuple(float(t) for t in np.asarray(targets.temperatures))
        for row, example_id in enumerate(np.asarray(batch.example_ids).tolist()):
          record = shards.encode_record(example_id, slice_batch(targets, row, row + 1), spec,
                                        weights_fingerprint=header.teacher.weights_fingerprint)
          self._writer.add(example_id, record, positions=batch.tokens.shape[1],
                           tokens=int(np.count_nonzero(batch.segment_ids[row])), temperatures=temps)
          self.records += 1
    except BaseException as e:  # noqa: BLE001 - reported by put() and close()
      self._error = e
      while self._queue.get() is not _DONE:
        pass

  @property
  def finished_shards(self) -> int:
    """Shards this writer has finished and listed in the manifest so far (ShardWriter publishes a shard
    in its progress only after the manifest lists it, so a reader may refresh as soon as this grows)."""
    return len(self._writer.progress.shards) if self._writer is not None else 0

  def close(self) -> None:
    """Writes what is queued, finishes the last (partial) shard and lists it."""
    self._queue.put(_DONE)
    self._thread.join()
    if self._writer is not None and self._error is None:
      self._writer.close()
    if self._error is not None:
      log.error("teacher cache: writing failed: %s", self._error)


@dataclasses.dataclass
class _Item:
  batch: Batch
  temperature: float
  cached_rows: list[int]
  missing_rows: list[int]
  cached: TeacherTargets | None  # host targets of cached_rows


class CachedTeacher(TeacherSource):
  """The remote source with a disk cache; see the module docstring."""

  name = "cached"

  @classmethod
  def create(cls, cached_cfg, remote_cfg, *, student: Student, mesh: Mesh, rules,
             interrupt: threading.Event | None) -> "CachedTeacher":
    """The registry's constructor (`registry.py`): `teacher.cached` and `teacher.remote`, for this process."""
    del rules  # answers are placed on `mesh` once merged
    return cls(cached_cfg, remote_cfg, student, mesh, process_index=jax.process_index(), interrupt=interrupt)

  def __init__(self, ccfg, remote_cfg, student: Student, mesh: Mesh, *, process_index: int = 0,
               interrupt: threading.Event | None = None):
    self._ccfg = ccfg
    self._student = student
    self._mesh = mesh
    self.store = _open_cache(ccfg, student)
    # Its remote part is what may wait: it watches `interrupt` too.
    self.remote = RemoteTeacher.create(remote_cfg, ccfg, student=student, mesh=mesh, interrupt=interrupt,
                                       place=lambda targets: targets)
    self.lookahead = self.remote.lookahead
    self._writer = CacheWriter(ccfg, student.data.path, process_index=process_index)
    self._header: Progress | None = None
    self._seen_shards = 0
    self._pending: collections.deque[_Item] = collections.deque()
    self._counts = collections.Counter()
    self._window = collections.Counter()
    if self.remote.teacher_info is not None:  # a teacher answered at start: refuse a cache of another one now
      try:
        self._checked_header()
      except ShardError:
        self.close()
        raise

  def _count(self, name: str, value: int = 1) -> None:
    self._counts[name] += value
    self._window[name] += value

  def _checked_header(self) -> Progress | None:
    """This run's cache header, once a teacher has answered; refuses a cache of another teacher."""
    info = self.remote.teacher_info
    if self._header is None and info is not None:
      k, layers, states = _needs(self._student, info.num_layers)
      plan = wire.OutputSpec(k=k, temperatures=(), value_dtype=self._student.value_dtype, layers=layers,
                             states=states, state_dtype=self.remote.cfg.state_dtype, pack_ids=self.remote.cfg.pack_ids,
                             samples=self._student.loss.sampling)
      header = self._writer.header(info, plan)
      stored = self.store.manifest
      if stored is not None:
        where = f"teacher.cached.path={self._ccfg.path}"
        for field in ("teacher", "dataset", "spec"):
          if shards.differs(getattr(stored, field), getattr(header, field)):
            raise ShardError(f"{where}: the cache holds answers with another {field} than this run's "
                             f"(stored {getattr(stored, field)!r}, now {getattr(header, field)!r}); use another "
                             "cache path")
      self._header = header
    return self._header

  def _split(self, batch: Batch, temperature: float, states=None) -> _Item:
    if self._writer.finished_shards != self._seen_shards:  # this run's own answers, readable from now on
      self._seen_shards = self._writer.finished_shards
      self.store.refresh()
    ids = np.asarray(batch.example_ids, np.int64)
    missing = set(self.store.missing(ids, temperature))
    missing_rows = [r for r, i in enumerate(ids.tolist()) if i in missing]
    cached_rows = [r for r in range(len(ids)) if r not in set(missing_rows)]
    cached = _served(self.store, self._student, ids[cached_rows], temperature, states) if cached_rows else None
    self._count("rows_from_cache", len(cached_rows))
    self._count("rows_requested", len(missing_rows))
    return _Item(batch, float(temperature), cached_rows, missing_rows, cached)

  def _merge(self, item: _Item, fetched: TeacherTargets | None) -> TeacherTargets | None:
    if item.missing_rows:
      if fetched is None:  # the fallback policy gave no answer: the whole batch trains on CE alone
        self._count("ce_only_batches")
        return None
      header = self._checked_header()
      sub = rows_of(item.batch, item.missing_rows)
      new = self.store.missing(sub.example_ids, item.temperature)
      if header is not None and new:
        keep = [r for r, i in enumerate(np.asarray(sub.example_ids).tolist()) if i in set(new)]
        self._writer.put(header, rows_of(sub, keep), concat([slice_batch(fetched, r, r + 1) for r in keep]))
    else:
      self._count("batches_from_cache")
    parts = {}
    for source, rows in ((item.cached, item.cached_rows), (fetched, item.missing_rows)):
      for j, row in enumerate(rows):
        parts[row] = slice_batch(source, j, j + 1)
    merged = parts[0] if len(parts) == 1 else concat([parts[r] for r in sorted(parts)])
    return place_on(merged, self._mesh)

  def submit(self, batch: Batch, temperature: float, states: tuple[str, ...] | None = None) -> None:
    item = self._split(batch, temperature, states)
    if item.missing_rows:
      self.remote.submit(rows_of(batch, item.missing_rows), temperature, states)
    self._pending.append(item)

  def next(self) -> TeacherTargets | None:
    if not self._pending:
      raise RuntimeError("next() called with no submitted batch")
    item = self._pending.popleft()
    return self._merge(item, self.remote.next() if item.missing_rows else None)

  def compute(self, batch: Batch, temperature: float,
              states: tuple[str, ...] | None = None) -> TeacherTargets | None:
    item = self._split(batch, temperature, states)
    fetched = (self.remote.compute(rows_of(batch, item.missing_rows), temperature, states) if item.missing_rows
               else None)
    return self._merge(item, fetched)

  def state(self) -> dict[str, Any]:
    return {"source": self.name, "remote": self.remote.state(), "counts": dict(self._counts)}

  def restore(self, state: dict[str, Any]) -> None:
    if not state:
      return
    if state.get("source") != self.name:
      raise ValueError(f"teacher.source={self.name} cannot resume a checkpoint of the {state.get('source')!r} source")
    self.remote.restore(state.get("remote", {}))
    self._counts.update(state.get("counts", {}))

  def metrics(self) -> dict[str, float]:
    out = self.remote.metrics()
    for name in ("rows_from_cache", "rows_requested", "batches_from_cache", "ce_only_batches"):
      out[name] = float(self._window[name])
      out[f"{name}_total"] = float(self._counts[name])
    out["cache_records_written_total"] = float(self._writer.records)
    self._window.clear()
    return out

  def close(self) -> None:
    try:
      self.remote.close()
    finally:
      self._writer.close()


class CachedShardsPolicy(FallbackPolicy):
  """Serves an overdue batch from the cache when it holds every row; otherwise the secondary policy."""

  name = "cached_shards"

  def __init__(self, ccfg, student: Student):
    self._student = student
    self._path = ccfg.path
    self._store = AnswerStore(self._path, verify=ccfg.verify_shards, must_exist=False)
    self._secondary = WaitPolicy() if ccfg.secondary == "wait" else CEOnlyPolicy()
    self._refreshed = 0.0

  def decide(self, overdue: Overdue) -> Decision:
    now = time.monotonic()
    if now - self._refreshed >= 1.0:
      self._store.refresh()  # answers cached since (by this run or another)
      self._refreshed = now
    ids = np.asarray(overdue.batch.example_ids, np.int64)
    if self._store.manifest is not None and not self._store.missing(ids, overdue.temperature):
      return Decision.use(_served(self._store, self._student, ids, overdue.temperature),
                          f"served {len(ids)} rows from the cache {self._path}")
    decision = self._secondary.decide(overdue)
    if decision.wait:
      return decision
    return Decision.use(decision.targets, f"not in the cache {self._path}; secondary policy "
                                          f"{self._secondary.name}: {decision.note}")


def make_cached_shards_policy(context: PolicyContext) -> CachedShardsPolicy:
  """The factory registered as `cached_shards` (policy.py)."""
  return CachedShardsPolicy(context.cached, context.student)
