"""The `remote` teacher source: batches stream to teacher-server replicas ahead of training.

    teacher.source: remote
    teacher.remote: {address: [10.0.0.5:50051, 10.0.0.6:50051], window: 8, on_timeout: wait}

The train loop calls `submit` for each upcoming batch (up to `window` ahead)
and `next` for the oldest; both are synchronous. Sending, receiving, decoding
and placing the answers on the trainer's mesh happen in the stream client
(`distill_core.stream`: lanes, failover, reconnects, answer checks, on its own
uvloop thread; `python -m teacher_server.dump --remote` uses the same one), so
`next` blocks only when the oldest batch's answer has not arrived yet. Answers
come back strictly in submission order, each batch exactly once. What is the
trainer's own stays here: when the teacher makes no progress for `timeout_s`,
the configured `FallbackPolicy` (`policy.py`) decides; metrics; the
checkpointed cursor.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
import time
import zlib
from typing import Any, Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from distill_core.data import Batch
from distill_core.stream.checks import Requirements
from distill_core.stream.pool import Item, RemoteTeacherError
from distill_core.stream.runner import StreamRunner
from distill_core.stream.stats import StreamStats
from distill_core.targets import TeacherTargets
from student_trainer.distributed import gather_ints
from student_trainer.sources.base import Interrupted, TeacherSource
from student_trainer.sources.common import Student, check_part_inputs, place_targets
from student_trainer.policy import FallbackPolicy, Overdue, PolicyContext, make_policy

log = logging.getLogger(__name__)

_POLL_S = 0.25  # how often a blocked next() re-checks for fatal errors and the timeout
WAITING_LOG_S = 10.0  # how often the wait for a first teacher says what it has tried


class RemoteTeacher(TeacherSource):
  """Streams batches to a teacher server; see the module docstring.

  Args:
    remote_cfg: `teacher.remote` (a `RemoteTeacherConfig`).
    need: what the student needs (checked against every replica's GetInfo).
    mesh: the trainer's mesh; targets are placed on it split along B.
    policy: what to do with overdue batches.
    place: host targets -> what `next` returns (default: placed on `mesh`; the cached source keeps
      them on the host to merge them with answers read from disk).
    interrupt: an event (set on SIGTERM/SIGINT) that ends every wait with `Interrupted`.
  """

  name = "remote"

  def __init__(self, remote_cfg, need: Requirements, *, mesh: Mesh, policy: FallbackPolicy,
               place: Callable[[TeacherTargets], TeacherTargets] | None = None,
               interrupt: threading.Event | None = None):
    self.cfg = remote_cfg
    self.lookahead = remote_cfg.window
    self.interrupt = interrupt
    self.may_fall_back = policy.may_fall_back
    self._policy = policy
    self._mesh = mesh
    self._stats = StreamStats()
    self._place = place or functools.partial(place_targets, mesh=mesh)
    self._runner = StreamRunner(remote_cfg, need, self._place, stats=self._stats)
    self._core = self._runner.core
    self._queue: collections.deque[Item] = collections.deque()
    self._consumed = 0
    self._last_ids: list[int] = []
    self.last_weights = ""  # weights fingerprint of the last batch returned with targets
    self._closed = False
    if self._runner.alive and not self._wait_first_contact(remote_cfg.timeout_s):
      log.warning("no teacher reachable at %s after %.0f s (%s%s); starting anyway, on_timeout=%s applies",
                  remote_cfg.address, remote_cfg.timeout_s, self._core.describe(), self._diagnosis(), policy.name)
    if self._core.fatal is not None:
      self.close()
      self._raise_if_fatal()

  def _wait_first_contact(self, timeout: float) -> bool:
    """Waits for an accepted replica (or a fatal error); returns early, False, when interrupted.

    Says at once what it waits for, then every WAITING_LOG_S what it has tried so far (each lane's last
    error, and what a direct look at the address finds: nothing listening, or a TLS mismatch).
    """
    cfg = self.cfg
    start = time.monotonic()
    deadline = start + timeout
    if self._core.first_contact.wait(_POLL_S):
      return True
    log.info("waiting for the teacher at %s (%s; each try %g s, reconnecting with backoff up to %g s; after %g s "
             "without a teacher, on_timeout=%s applies)", cfg.address,
             "TLS" if cfg.tls or cfg.root_certificates else "plaintext", cfg.connect_timeout_s, cfg.backoff_max_s,
             timeout, cfg.on_timeout)
    next_note = start + WAITING_LOG_S
    while not self._core.first_contact.wait(min(_POLL_S, max(deadline - time.monotonic(), 0.0))):
      now = time.monotonic()
      if now >= deadline or self._interrupted():
        return False
      if now >= next_note:
        log.warning("still waiting for the teacher at %s after %.0f s: %s%s", cfg.address, now - start,
                    self._core.describe(), self._diagnosis())
        next_note = now + WAITING_LOG_S
    return True

  def _diagnosis(self) -> str:
    """'; <what a direct look at each address finds>' or '' (see checks.diagnose_connection)."""
    return self._runner.diagnosis()

  def _interrupted(self) -> bool:
    return self.interrupt is not None and self.interrupt.is_set()

  @classmethod
  def create(cls, remote_cfg, cached_cfg, *, student: Student, mesh: Mesh, rules=None,
             interrupt: threading.Event | None = None, **kwargs) -> "RemoteTeacher":
    """The registry's constructor (`registry.py`): `teacher.remote` (a `RemoteTeacherConfig`) and
    `teacher.cached` (what the cached_shards policy reads), for the student's side of the run."""
    del rules  # the answers are placed on `mesh` as they arrive
    need = student.needs()
    policy = make_policy(remote_cfg.on_timeout, PolicyContext(student=student, cached=cached_cfg, mesh=mesh))
    return cls(remote_cfg, need, mesh=mesh, policy=policy, interrupt=interrupt, **kwargs)

  def _raise_if_fatal(self) -> None:
    self._runner.raise_if_fatal()

  # -- the TeacherSource interface (train-loop thread) ---------------------------------------------

  def _enqueue(self, batch: Batch, temperature: float, priority: int, states: tuple[str, ...] | None,
               part_inputs: Mapping[str, np.ndarray] | None = None) -> Item:
    if self._closed:
      raise RuntimeError("the remote teacher source is closed")
    return self._runner.enqueue(batch, (float(temperature),), priority=priority, states=states,
                                part_inputs=check_part_inputs(batch, part_inputs))

  def submit(self, batch: Batch, temperature: float, states: tuple[str, ...] | None = None,
             part_inputs: Mapping[str, np.ndarray] | None = None) -> None:
    self._queue.append(self._enqueue(batch, temperature, priority=1, states=states, part_inputs=part_inputs))

  def next(self) -> TeacherTargets | None:
    if not self._queue:
      raise RuntimeError("next() called with no submitted batch")
    self._stats.occupancy(sum(item.done.is_set() for item in self._queue) / len(self._queue))
    item = self._queue.popleft()
    targets = self._agree(self._await(item), item.weights)
    if targets is not None and item.weights != self.last_weights:
      if self.last_weights:
        log.warning("teacher: from batch %d on, targets come from teacher weights %s... (was %s...)",
                    self._consumed, item.weights[:16], self.last_weights[:16])
      self.last_weights = item.weights
    self._consumed += 1
    self._last_ids = np.asarray(item.batch.example_ids).tolist()
    return targets

  def compute(self, batch: Batch, temperature: float, states: tuple[str, ...] | None = None,
              part_inputs: Mapping[str, np.ndarray] | None = None) -> TeacherTargets | None:
    """Targets for one batch outside the stream (evaluation): sent ahead of the queued batches."""
    item = self._enqueue(batch, temperature, priority=0, states=states, part_inputs=part_inputs)
    return self._agree(self._await(item), item.weights)

  def _await(self, item: Item) -> TeacherTargets | None:
    timeout = self.cfg.timeout_s
    start = time.monotonic()
    warn_at = 0.0
    while not item.done.is_set():
      self._raise_if_fatal()
      if self._interrupted():
        raise Interrupted(f"stopped while waiting for the teacher's answer to batch {self._consumed} "
                          f"(replicas: {self._core.describe()})")
      now = time.monotonic()
      # From the last answer, but never from before this batch was enqueued: the loop thread may
      # look before the event loop has registered it (an idle teacher is not a stalled one).
      stalled = now - max(self._core.last_progress, item.created)
      if stalled < timeout:
        item.done.wait(min(timeout - stalled, _POLL_S))
        continue
      decision = self._policy.decide(Overdue(item.batch, item.temperatures[0], now - start, stalled))
      if decision.wait:
        if now >= warn_at:
          self._stats.count("stall_warnings")
          log.warning("teacher: no progress for %.0f s; training waits for batch %d (policy %s); replicas: %s%s",
                      stalled, self._consumed, self._policy.name, self._core.describe(),
                      "" if any(lane.ready for lane in self._core.lanes) else self._diagnosis())
          warn_at = now + timeout
        item.done.wait(_POLL_S)
        continue
      if item.done.is_set():  # the answer arrived while the policy decided
        break
      self._runner.cancel(item)
      self._stats.count("fallbacks")
      log.warning("teacher: fallback #%d for batch %d (example ids %s...) by policy %s: %s; replicas: %s",
                  self._stats.totals["fallbacks"], self._consumed,
                  np.asarray(item.batch.example_ids)[:4].tolist(), self._policy.name, decision.note,
                  self._core.describe())
      if decision.targets is None:
        return None
      return self._place(decision.targets)
    if item.error is not None:
      raise RemoteTeacherError(f"batch {self._consumed}: {item.error}") from item.error
    return item.targets

  def _agree(self, targets: TeacherTargets | None, weights: str) -> TeacherTargets | None:
    """With several processes, a batch has targets only if every process has them (same step program),
    and, while teacher weights may change (`on_weights_change: drain`), only if they all come from the
    same weights: each process's rows of a batch are never from two teachers.

    A fallback on any process is logged on every process, naming the processes that had no answer.
    """
    drain = self.cfg.on_weights_change == "drain"
    if jax.process_count() == 1 or (not self._policy.may_fall_back and not drain):
      return targets
    digest = zlib.crc32(weights.encode()) & 0x7FFFFFFF if drain else 0  # int32 on the device
    have, digests = gather_ints(int(targets is not None), digest)
    missing = [p for p, ok in enumerate(have) if not ok]
    if not missing and len(set(digests)) == 1:
      return targets
    if targets is not None:
      self._stats.count("peer_fallbacks")
    why = (f"no teacher answer on process(es) {missing}" if missing else
           "the processes' answers came from different teacher weights (a weights change is under way)")
    log.warning("teacher: batch %d trains on CE only on every process: %s", self._consumed, why)
    return None

  @property
  def teacher_info(self):
    """The first replica's GetInfo answer (None before any replica answered)."""
    return self._core.info

  def state(self) -> dict[str, Any]:
    info = self._core.info
    weights = self.last_weights or (info.weights_fingerprint if info else self._core.expected_weights)
    return {"source": self.name, "batches": self._consumed, "last_example_ids": self._last_ids,
            "weights_fingerprint": weights,
            "tokenizer_fingerprint": info.tokenizer_fingerprint if info else None,
            "fallbacks": self._stats.totals["fallbacks"]}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues a checkpointed stream; refuses one that came from other teacher weights."""
    if not state:
      return
    expected = state.get("weights_fingerprint")

    def check():
      if self._core.info is not None:
        self._core.check_weights(self._core.info.weights_fingerprint, expected)
      self._core.expected_weights = expected

    try:
      self._runner.on_loop(check)
    except RemoteTeacherError:
      self.close()  # refused: nothing will use this source
      raise
    self._consumed = int(state.get("batches", 0))
    self._last_ids = list(state.get("last_example_ids", []))
    self._stats.count("fallbacks", int(state.get("fallbacks", 0)))
    log.info("teacher stream resumes after %d batches (last example ids %s...)", self._consumed,
             self._last_ids[:4])

  def metrics(self) -> dict[str, float]:
    out = self._stats.flush()
    if not self._closed and self._runner.alive:
      snap = self._runner.on_loop(self._core.snapshot)
      out.update(replicas_ready=float(snap["ready_lanes"]), inflight_requests=float(snap["inflight"]))
    return out

  def close(self) -> None:
    """Cancels the streams, closes the channels and joins the loop thread."""
    if self._closed:
      return
    self._closed = True
    self._runner.close()
    self._policy.close()
