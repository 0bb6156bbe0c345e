"""The `offline` teacher source: answers dumped once (`python -m teacher_server.dump`), read by example id.

    teacher.source: offline
    teacher.offline: {path: runs/answers, read_threads: 2}

The answers are read through Grain: a dataset of the training split's example
ids is put in exactly the order of the student's own data pipeline
(`distill_core.data.ordered_batches`: same seed, shuffle, epochs and process
shard), and a map step looks every id of a batch up in the shards
(`distill_core.shards_io.AnswerStore`), decodes and stacks the answers on
`read_threads` threads, `prefetch` batches ahead. Its iterator state is the
source's cursor in the student's checkpoint, so a resumed run reads on from
where it stopped. Whatever order the dump wrote, the lookup is by id. The
targets are trimmed to what the step asks (k, the logsumexp column of exactly
the step's temperature, the feature loss's layers) and placed on the mesh like
the remote source's, so the losses cannot tell the sources apart.

On open the manifest is checked against the student (`check_answers`); a
corrupt record or shard stops the run naming the file (and record) before the
batch is trained on.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh

from distill_core import shards
from distill_core.data import Batch, load_manifest, ordered_batches
from distill_core.needs import Needs, Offer, check
from distill_core.shards import ShardError
from distill_core.shards_io import AnswerStore, MissingAnswers
from distill_core.targets import TeacherTargets
from student_trainer.errors import RunError
from student_trainer.sources.base import TeacherSource
from student_trainer.sources.common import Student, place_targets

log = logging.getLogger(__name__)


class AnswersMismatch(RunError):
  """Stored answers that cannot train this student; the message names each field and both values."""


def check_answers(manifest: shards.Manifest, needs: Needs, *, where: str) -> None:
  """Raises AnswersMismatch listing every field where the stored answers of `manifest` do not fit `needs`
  (`distill_core.needs.check`; a cache leaves `needs.temperatures` empty: it fills in what is missing)."""
  problems = check(needs, Offer.from_manifest(manifest))
  if problems:
    raise AnswersMismatch(f"{where}: the stored answers do not fit this student: " + "; ".join(problems))


class _SplitIds:
  """Random access over a split's example ids (record i of a prepared split has id first + i)."""

  def __init__(self, first: int, count: int):
    self._first, self._count = first, count

  def __len__(self) -> int:
    return self._count

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    return {"example_ids": np.int64(self._first + index.__index__())}


def place_on(targets: TeacherTargets, mesh: Mesh) -> TeacherTargets:
  return place_targets(targets, mesh)


class AnswerLookup:
  """Answers of a batch of ids from an AnswerStore, waiting for a live dump when following."""

  def __init__(self, store: AnswerStore, ocfg):
    self.store = store
    self._cfg = ocfg

  def __call__(self, ids) -> TeacherTargets | MissingAnswers:
    """The stacked answers, or the MissingAnswers when on_missing is ce_only (raised otherwise)."""
    try:
      return self._wait_for(np.asarray(ids, np.int64).reshape(-1))
    except MissingAnswers as e:
      if self._cfg.on_missing == "ce_only":
        return e
      raise MissingAnswers(e.ids, f"teacher.offline.path={self.store.root}",
                           "these answers were never written (an unfinished or partial dump): finish the dump, "
                           "or set teacher.offline.on_missing=ce_only to train such batches on CE alone") from None

  def _wait_for(self, ids: np.ndarray) -> TeacherTargets:
    cfg = self._cfg
    if not cfg.follow:
      return self.store.batch(ids)
    start = time.monotonic()
    warned = 0.0
    while missing := self.store.missing(ids):
      waited = time.monotonic() - start
      if self.store.manifest.complete or (cfg.follow_timeout_s is not None and waited > cfg.follow_timeout_s):
        raise MissingAnswers(missing, self.store.root)  # the dump is finished (or the wait is over)
      if waited >= warned:
        log.info("offline teacher: following %s: waiting for example id %d (%d of this batch not written yet; "
                 "%d records stored so far)", self.store.root, missing[0], len(missing), len(self.store))
        warned = waited + 30.0
      time.sleep(cfg.follow_poll_s)
      self.store.refresh()
    return self.store.batch(ids)


class OfflineTeacher(TeacherSource):
  """Serves dumped answers in the student's batch order; see the module docstring."""

  name = "offline"

  @classmethod
  def create(cls, offline_cfg, *, student: Student, mesh: Mesh, rules, interrupt) -> "OfflineTeacher":
    """The registry's constructor (`registry.py`): `teacher.offline` (an `OfflineTeacherConfig`), this
    process's share of the batches."""
    del rules, interrupt  # answers are placed like the remote source's; a following reader polls on its own
    return cls(offline_cfg, student, mesh, shard_index=jax.process_index(), shard_count=jax.process_count())

  def __init__(self, ocfg, student: Student, mesh: Mesh, *, shard_index: int = 0, shard_count: int = 1):
    self.cfg = ocfg
    self.lookahead = ocfg.lookahead
    self._mesh = mesh
    self._k = student.loss.request_k
    self.store = _open_store(ocfg)
    manifest = self.store.manifest
    where = f"teacher.offline.path={ocfg.path}"
    self._layers = student.teacher_layers(layers=manifest.teacher.num_layers, width=manifest.teacher.hidden_size,
                                          where=f"{where}: teacher")
    self._states = student.state_names if self._layers else ()
    needs = dataclasses.replace(student.needs(), weights_fingerprint=ocfg.weights_fingerprint or "")
    check_answers(manifest, needs, where=where)
    if not manifest.complete and not ocfg.follow:
      log.warning("offline teacher: %s holds %d of %d examples (an unfinished dump?); missing ids are %s",
                  ocfg.path, manifest.records, sum(manifest.dataset.splits.values()),
                  "trained on CE only" if ocfg.on_missing == "ce_only" else "an error")
    self.weights_fingerprint = manifest.teacher.weights_fingerprint
    self._lookup = AnswerLookup(self.store, ocfg)
    data = load_manifest(student.data.path)
    split = data.splits["train"]
    ids = grain.MapDataset.source(_SplitIds(split.first_example_id, split.examples))
    ds = ordered_batches(ids, student.data, "train", training=True, shard_index=shard_index, shard_count=shard_count)
    ds = ds.map(lambda element: (element["example_ids"], self._lookup(element["example_ids"])))
    self._it = ds.to_iter_dataset(grain.ReadOptions(num_threads=ocfg.read_threads,
                                                    prefetch_buffer_size=ocfg.prefetch)).__iter__()
    self._pending: collections.deque[tuple[dict, TeacherTargets | None]] = collections.deque()
    self._batches = 0
    self._ce_only = 0
    self._ce_only_window = 0
    self._reordered = False

  def _targets(self, ids: np.ndarray, found, temperature: float, states=None) -> TeacherTargets | None:
    if isinstance(found, MissingAnswers):
      self._ce_only += 1
      self._ce_only_window += 1
      log.warning("offline teacher: %s; training this batch on CE only (%d such batches)", found, self._ce_only)
      return None
    where = f"teacher.offline.path={self.cfg.path} (example ids {ids[:4].tolist()}...)"
    names = self._states if states is None else tuple(n for n in self._states if n in states)
    picked = shards.select(found, temperature=temperature, k=self._k, layers=self._layers if names else (),
                           states=names, where=where)
    return place_on(picked, self._mesh)

  def submit(self, batch: Batch, temperature: float, states: tuple[str, ...] | None = None) -> None:
    state = self._it.get_state()
    ids, found = next(self._it)
    want = np.asarray(batch.example_ids, np.int64)
    if not np.array_equal(ids, want):  # the data pipeline is not the one mirrored: look the batch up directly
      if not self._reordered:
        log.warning("offline teacher: batch ids %s... differ from the mirrored order %s...; looking batches up "
                    "directly", want[:4].tolist(), ids[:4].tolist())
        self._reordered = True
      ids, found = want, self._lookup(want)
    self._pending.append((state, self._targets(ids, found, temperature, states)))

  def next(self) -> TeacherTargets | None:
    if not self._pending:
      raise RuntimeError("next() called with no submitted batch")
    self._batches += 1
    return self._pending.popleft()[1]

  def compute(self, batch: Batch, temperature: float,
              states: tuple[str, ...] | None = None) -> TeacherTargets | None:
    ids = np.asarray(batch.example_ids, np.int64)
    return self._targets(ids, self._lookup(ids), temperature, states)

  def state(self) -> dict[str, Any]:
    grain_state = self._pending[0][0] if self._pending else self._it.get_state()
    return {"source": self.name, "grain": grain_state, "batches": self._batches,
            "weights_fingerprint": self.weights_fingerprint, "ce_only_batches": self._ce_only}

  def restore(self, state: dict[str, Any]) -> None:
    if not state:
      return
    if state.get("source") != self.name:
      raise ValueError(f"teacher.source={self.name} cannot resume a checkpoint of the {state.get('source')!r} source")
    saved = state.get("weights_fingerprint")
    if saved != self.weights_fingerprint and not self.cfg.allow_teacher_change:
      raise AnswersMismatch(f"teacher.offline.path={self.cfg.path}: teacher.weights_fingerprint: the checkpoint "
                            f"was trained on answers of teacher weights {str(saved)[:16]}..., these are from "
                            f"{self.weights_fingerprint[:16]}... (set teacher.offline.allow_teacher_change=true "
                            "to continue anyway)")
    self._it.set_state(state["grain"])
    self._batches = int(state.get("batches", 0))
    self._ce_only = int(state.get("ce_only_batches", 0))

  def metrics(self) -> dict[str, float]:
    out = {"ce_only_batches": float(self._ce_only_window), "ce_only_batches_total": float(self._ce_only),
           "stored_records": float(len(self.store))}
    self._ce_only_window = 0
    return out

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def _open_store(ocfg) -> AnswerStore:
  """The store of `ocfg.path`; a following reader waits for the first manifest of a starting dump."""
  start = time.monotonic()
  while True:
    try:
      return AnswerStore(ocfg.path, verify=ocfg.verify_shards)
    except ShardError as e:
      if not ocfg.follow or "not found" not in str(e) or (
          ocfg.follow_timeout_s is not None and time.monotonic() - start > ocfg.follow_timeout_s):
        raise ShardError(f"teacher.offline.path: {e}") from None
      log.info("offline teacher: following %s: no manifest yet, waiting", ocfg.path)
      time.sleep(ocfg.follow_poll_s)
