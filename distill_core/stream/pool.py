"""The event-loop side of the stream client: lanes, dispatch, retries, failover, answer checks.

Everything here runs on one background thread's event loop (uvloop, see
`runner.py`). A *lane* is one `TeacherStream` (one bidirectional `Stream`
call) to a teacher replica, reopened after a failure; it connects (opens
the stream and checks the replica that stream reached, from the GetInfo the
server sends in the stream's initial metadata: behind a load-balanced name a
separate GetInfo call may reach another replica), streams requests, and on
any failure hands its unanswered requests back to the dispatcher and
reconnects after an exponential backoff with jitter. A lane whose stream is
older than `stream_max_age_s` drains and reconnects, so the channel's
round-robin spreads lanes over replicas that came up meanwhile.

Every answer names the replica and weights it came from. All answers of one
batch come from one set of weights: when a replica with other weights
appears (a rolling update), `on_weights_change` says what happens: `stop`
ends training with the error; `drain` moves to the new weights at a batch
boundary: replicas with the old weights get no more requests, answers from
them that are not yet part of a complete batch are asked again from the new
ones, and the old weights are never accepted again. The dispatcher splits
each batch into requests of `plan.rows_per_request` rows and sends each to the
ready lane with the fewest requests in flight. Answers are decoded on a
worker thread (so big answers never stall the streams); a batch is complete
when all of its requests are answered, and the worker reassembles its rows in
order and places them on the trainer's mesh. The train-loop thread only waits
on `Item.done`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import heapq
import itertools
import logging
import random
import threading
import time
from typing import Any, Callable

import grpc
import numpy as np

from distill_core import wire
from distill_core.client import TeacherClient, TeacherError, TeacherStream, answer_error
from distill_core.data import Batch
from distill_core.parts import PARTS
from distill_core.proto import teacher_pb2 as pb
from distill_core.stream.checks import RequestPlan, RequestShape, Requirements, TeacherMismatch, bucket_fill, \
    plan_requests, replica_problems
from distill_core.stream.stats import StreamStats
from distill_core.targets import TeacherTargets, check_values, concat

log = logging.getLogger(__name__)

# Per-request error codes worth another attempt (the replica is draining or its engine failed).
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
              grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.DATA_LOSS}
# Call errors that no reconnect can fix.
_CONFIG_ERRORS = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                  grpc.StatusCode.UNIMPLEMENTED}


class RemoteTeacherError(RuntimeError):
  """The remote teacher cannot deliver (a rejected request, an incompatible replica...)."""


@dataclasses.dataclass(eq=False)
class Item:
  """One batch on its way to the teacher and back (shared with the train-loop thread)."""

  seq: int
  priority: int  # 0: out of band (evaluation), 1: training stream
  batch: Batch
  temperatures: tuple[float, ...]  # asked for (and checked in) every answer
  states: tuple[str, ...] | None = None  # state names this batch needs (None: every planned one)
  # Per-position inputs of parts ("<part>.<input>" -> (B, T, ...)), cut into each request's rows like the tokens;
  # each part completes its answer with them (`Part.with_inputs`: e.g. the ids asked, not sent back).
  part_inputs: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  created: float = dataclasses.field(default_factory=time.monotonic)  # when the train loop enqueued it
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  targets: TeacherTargets | None = None  # on the mesh, once done
  error: BaseException | None = None
  cancelled: bool = False  # a fallback took its place
  weights: str = ""  # fingerprint of the teacher weights every answer of this batch came from
  settled: bool = False  # every request answered (or failed): no more sends
  chunks: list["_Chunk"] = dataclasses.field(default_factory=list)
  remaining: int = 0


@dataclasses.dataclass(eq=False)
class _Chunk:
  """Rows [start, stop) of an item: one request (re-sent as a new request id after a failure)."""

  item: Item
  index: int
  start: int
  stop: int
  result: TeacherTargets | None = None
  errors: int = 0
  sends: int = 0
  sent_at: float = 0.0
  weights: str = ""  # of the answer in `result`

  @property
  def key(self) -> tuple[int, int, int]:
    return (self.item.priority, self.item.seq, self.index)


class _Broken(Exception):
  """A lane's stream or connection failed; the lane reconnects."""


class Lane:
  """One stream to one replica (or to whichever replica gRPC picks for a DNS name)."""

  def __init__(self, core: "StreamCore", client: TeacherClient, name: str):
    self.core, self.client, self.name = core, client, name
    self.inflight: dict[int, _Chunk] = {}
    self.ready = False
    self.draining = False
    self.replica_id = ""  # of the replica this lane's stream reached
    self.weights = ""  # its weights fingerprint
    self.opened_at = 0.0
    self.sent = 0
    self.connections = 0
    self.drain_reason = ""
    self.rotating = False  # drained because of its age (stream_max_age_s), not a failure
    self.answers = 0  # answers received on the current connection
    self.last_error = "not connected yet"
    self._stream: TeacherStream | None = None
    self._abort_reason = ""

  async def run(self) -> None:
    cfg = self.core.cfg
    failures = 0
    while self.core.fatal is None:
      self.replica_id = self.weights = ""
      broke_after_serving = False
      self.answers = 0
      try:
        await self._connect()
        broke_after_serving = True
        await self._serve()
      except _Broken as e:
        self.last_error = str(e)
      except TeacherError as e:
        self.last_error = str(e)
        if e.code in _CONFIG_ERRORS:
          self.core.fail(RemoteTeacherError(f"teacher at {self.name}: {e}"))
          return
      except grpc.aio.AioRpcError as e:
        self.last_error = f"{e.code().name}: {e.details()}"
        if e.code() in _CONFIG_ERRORS:
          self.core.fail(RemoteTeacherError(f"teacher at {self.name}: {self.last_error}"))
          return
      except Exception as e:  # a bug here must stop the run, not silently lose this lane's requests
        log.exception("teacher %s: unexpected error", self.name)
        self.core.fail(RemoteTeacherError(f"teacher at {self.name}: unexpected {type(e).__name__}: {e}"))
        return
      finally:
        self._down(broke_after_serving)
      if self.core.fatal is not None:
        return
      if self.answers:  # progress is an answer, not a connection: a hung replica keeps backing off
        failures = 0
      cap = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** failures)
      failures += 1
      delay = cap * (0.5 + 0.5 * random.random())  # jitter: replicas do not reconnect in lockstep
      planned = self.rotating and broke_after_serving
      log.log(logging.INFO if planned else logging.WARNING if broke_after_serving else logging.DEBUG,
              "teacher %s: %s; reconnecting in %.2f s", self.name, self.last_error, delay)
      await asyncio.sleep(delay)

  async def _connect(self) -> None:
    """Opens the stream and checks the replica it reached (its GetInfo comes in the initial metadata)."""
    timeout = self.core.cfg.connect_timeout_s
    self._abort_reason = ""
    self._stream = self.client.stream(raw=True).open()
    call = self._stream.call
    try:
      metadata = await asyncio.wait_for(call.initial_metadata(), timeout)
    except asyncio.TimeoutError:
      raise _Broken(f"no answer to the stream within {timeout:g} s") from None
    info, ready = wire.stream_info(metadata)
    if info is None:
      if call.done():  # refused (unreachable, unauthenticated...): the call's status says why
        code, details = await call.code(), await call.details()
        raise TeacherError(code, details or "the stream ended")
      raise _Broken("the server sent no replica info with the stream (a server older than this client?)")
    if not ready:
      raise _Broken(f"replica {info.replica_id} is warming up")
    problems = self.core.accept(self, info)
    if problems:
      log.error("teacher %s (replica %s) cannot take these requests: %s", self.name, info.replica_id,
                "; ".join(problems))
      raise _Broken(f"replica {info.replica_id}: " + "; ".join(problems))

  async def _serve(self) -> None:
    """Until the stream ends: answers reach the core through `_answered` (the stream's futures)."""
    self.ready, self.draining, self.drain_reason = True, False, ""
    self.opened_at = time.monotonic()
    self.connections += 1
    self.core.lane_ready(self)
    self.rotating = False
    # asyncio.wait, not await: cancelling this task (closing) must not be swallowed by the reader's end.
    await asyncio.wait({self._stream.reader})
    if self._abort_reason:
      raise _Broken(self._abort_reason)
    error = self._stream.error
    if error is not None:
      raise _Broken(f"stream failed: {error.code.name}: {error.message}")
    raise _Broken("the server ended the stream")

  def _answered(self, future: asyncio.Future) -> None:
    if future.cancelled() or future.exception() is not None:
      return  # the stream failed: `_down` hands the unanswered requests back to the dispatcher
    self.answers += 1
    self.core.on_response(self, future.result())
    if self.draining and not self.inflight and self.ready:
      self.abort(self.drain_reason or "the replica is shutting down")

  def abort(self, reason: str) -> None:
    """Drops the stream (e.g. a hung replica); its requests go back to the dispatcher."""
    if self._stream is not None and not self._stream.reader.done():
      self._abort_reason = self._abort_reason or reason
      self._stream.cancel()

  def _down(self, was_serving: bool) -> None:
    self.ready = False
    if self._stream is not None:
      self._stream.cancel()
    self._stream = None
    orphans = list(self.inflight.values())
    self.inflight.clear()
    if was_serving and not self.core.closing and not self.rotating:
      self.core.stats.count("failovers")
    self.core.requeue(orphans)

  def send(self, chunk: _Chunk, request: pb.ForwardRequest) -> None:
    self.inflight[request.request_id] = chunk
    self.sent += 1
    if self._stream.is_open:  # else it ended (or was aborted) a moment ago: `_down` hands the request back
      self._stream.send(request).add_done_callback(self._answered)


class StreamCore:
  """Dispatcher and bookkeeping shared by the lanes (event-loop thread only, except `fatal`/`progress`)."""

  def __init__(self, cfg, need: Requirements, place: Callable[[TeacherTargets], TeacherTargets],
               stats: StreamStats, shape: RequestShape | None = None):
    self.cfg = cfg  # a StreamClientConfig
    self.need = need
    self.shape = shape or RequestShape.of(cfg)
    self.place = place
    self.stats = stats
    self.lanes: list[Lane] = []
    self.plan: RequestPlan | None = None
    self.info: pb.GetInfoResponse | None = None  # of the first replica, with the current weights
    self.retired: set[str] = set()  # weights replaced by on_weights_change=drain; never used again
    self.expected_weights: str | None = None  # from a restored cursor
    self.fatal: BaseException | None = None
    self.closing = False
    self.first_contact = threading.Event()  # a replica was accepted, or a fatal error
    # Read by the train loop: the last answer, or the start of work after an idle spell. Never a
    # (re)connect: a replica whose engine hangs still answers health and GetInfo, so counting
    # connections as progress would keep the fallback policy's timeout from ever expiring.
    self.last_progress = time.monotonic()
    self._pending: list[tuple[tuple[int, int, int], _Chunk]] = []  # heap by (priority, seq, index)
    self._unplanned: list[Item] = []
    self._active: set[Item] = set()
    self._request_ids = itertools.count(1)
    # Decoding and device placement: off the event loop, one at a time.
    self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="remote-teacher-work")
    self.loop: asyncio.AbstractEventLoop | None = None  # the loop the core runs on (set by the source)

  # -- lanes ---------------------------------------------------------------------------------------

  def accept(self, lane: Lane, info: pb.GetInfoResponse) -> list[str]:
    """Checks a connecting replica; returns why it cannot serve (fatal problems stop the source)."""
    if self.plan is None:
      try:
        plan = plan_requests(info, self.need, state_dtype=self.shape.state_dtype, pack_ids=self.shape.pack_ids,
                             rows_per_request=self.shape.rows_per_request,
                             max_message_bytes=self.cfg.max_message_mb << 20)
        self.check_weights(info.weights_fingerprint, self.expected_weights)
      except (TeacherMismatch, RemoteTeacherError) as e:
        self.fail(e)
        return [str(e)]
      self.plan, self.info = plan, info
      lane.replica_id, lane.weights = info.replica_id, info.weights_fingerprint
      states = f", {'+'.join(plan.states)} of layers {list(plan.layers)}" if plan.layers else ""
      log.info("teacher %s accepted: %s, %d layers, vocab %d, weights %s; %d rows per request, k=%d%s",
               lane.name, info.model_type, info.num_layers, info.vocab_size, info.weights_fingerprint[:16],
               plan.rows_per_request, plan.k, states)
      self._warn_fill(info, plan)
      for item in self._unplanned:
        self._split(item)
      self._unplanned.clear()
      self.first_contact.set()
      return []
    if info.weights_fingerprint != self.info.weights_fingerprint:
      problem = self.weights_changed(lane, info.replica_id, info.weights_fingerprint)
      if problem:
        return [problem]
    if info.tokenizer_fingerprint != self.info.tokenizer_fingerprint:
      return [f"tokenizer {info.tokenizer_fingerprint[:16]}... differs from the other replicas' "
              f"{self.info.tokenizer_fingerprint[:16]}..."]
    if (info.vocab_size, info.num_layers, info.hidden_size) != \
        (self.info.vocab_size, self.info.num_layers, self.info.hidden_size):
      return [f"vocabulary/layers/width {info.vocab_size}/{info.num_layers}/{info.hidden_size} differ from the "
              f"other replicas' {self.info.vocab_size}/{self.info.num_layers}/{self.info.hidden_size}"]
    problems = replica_problems(info, self.plan, self.need)
    if not problems:
      lane.replica_id, lane.weights = info.replica_id, info.weights_fingerprint
    return problems

  def weights_changed(self, lane: Lane, replica_id: str, weights: str) -> str:
    """A replica serves other weights than the current ones; returns why the lane must not use it ("" = ok).

    `stop`: fatal. `drain`: weights seen before are retired and refused; new
    ones become current, replicas with the old ones drain, and answers from
    them that are not part of a complete batch yet are asked again.
    """
    old = self.info.weights_fingerprint
    if weights in self.retired:
      return f"serves retired teacher weights {weights[:16]}... (now {old[:16]}...)"
    self.stats.count("weight_changes")
    if self.cfg.on_weights_change == "stop":
      self.fail(RemoteTeacherError(
          f"teacher weights changed: replica {replica_id or '?'} at {lane.name} serves {weights[:16]}..., "
          f"training started with {old[:16]}... (a rolling update?); teacher.remote.on_weights_change=stop. "
          "Set it to 'drain' to move to the new weights at a batch boundary"))
      return "different teacher weights"
    log.warning("teacher weights changed: replica %s at %s serves %s..., was %s...; on_weights_change=drain: "
                "replicas with the old weights get no more requests, every later batch uses the new weights",
                replica_id or "?", lane.name, weights[:16], old[:16])
    self.retired.add(old)
    self.info = self._info_with(weights)
    for other in self.lanes:
      if other.ready and other.weights == old:
        other.draining = True
        other.drain_reason = f"replica {other.replica_id} serves the retired weights {old[:16]}..."
    for item in list(self._active):
      redo = [c for c in item.chunks if c.result is not None and c.weights != weights]
      for chunk in redo:
        chunk.result = None
        item.remaining += 1
      self.requeue(redo)
    return ""

  def _info_with(self, weights: str) -> pb.GetInfoResponse:
    info = pb.GetInfoResponse()
    info.CopyFrom(self.info)
    info.weights_fingerprint = weights
    return info

  def _warn_fill(self, info: pb.GetInfoResponse, plan: RequestPlan) -> None:
    """Once per source: a loud line when the server's buckets make most of its work padding."""
    found = bucket_fill(info, plan, self.need, rows_in_flight=self.need.batch_rows * max(self.shape.window, 1))
    if found is not None:
      fill, (b, t), (fb, ft) = found
      log.warning("teacher: requests of %d rows x %d tokens run in the server's %dx%d bucket, %.0f%% real "
                  "tokens (the rest is padding the teacher computes for nothing); serve a bucket that fits, "
                  "e.g. teacher_server 'batcher.buckets=[[%d,%d]]'", plan.rows_per_request, self.need.seq_len,
                  b, t, 100 * fill, fb, ft)

  def check_weights(self, actual: str, expected: str | None) -> None:
    if expected and actual != expected and not self.cfg.allow_teacher_change:
      raise RemoteTeacherError(
          f"the checkpoint's teacher stream came from teacher weights {expected[:16]}..., the server now "
          f"serves {actual[:16]}...; resuming would mix teachers (set teacher.remote.allow_teacher_change=true "
          "to accept)")

  def lane_ready(self, lane: Lane) -> None:
    if lane.connections > 1 and not lane.rotating:
      self.stats.count("reconnects")
      log.warning("teacher %s: reconnected", lane.name)
    self._dispatch()  # not progress: a replica whose engine hangs still connects (see last_progress)

  def fail(self, error: BaseException) -> None:
    if self.fatal is None:
      log.error("remote teacher: %s", error)
      self.fatal = error
    self.first_contact.set()

  # -- items ---------------------------------------------------------------------------------------

  def add(self, item: Item) -> None:
    if not self._active:
      self.last_progress = time.monotonic()  # idle time is not a stall
    self._active.add(item)
    if self.plan is None:
      self._unplanned.append(item)
    else:
      self._split(item)

  def _split(self, item: Item) -> None:
    rows = item.batch.tokens.shape[0]
    step = self.plan.rows_per_request
    item.chunks = [_Chunk(item, i, start, min(start + step, rows)) for i, start in enumerate(range(0, rows, step))]
    item.remaining = len(item.chunks)
    for chunk in item.chunks:
      heapq.heappush(self._pending, (chunk.key, chunk))
    self._dispatch()

  def cancel(self, item: Item) -> None:
    """The train loop used a fallback for `item`: drop its requests (late answers are ignored)."""
    item.cancelled = True
    self._active.discard(item)
    if item in self._unplanned:
      self._unplanned.remove(item)

  def requeue(self, chunks: list[_Chunk]) -> None:
    for chunk in chunks:
      if self._live(chunk.item):
        heapq.heappush(self._pending, (chunk.key, chunk))
    self._dispatch()

  def _live(self, item: Item) -> bool:
    return not (item.cancelled or item.settled)

  def _dispatch(self) -> None:
    while self._pending:
      lanes = [lane for lane in self.lanes if lane.ready and not lane.draining]
      if not lanes:
        return
      _, chunk = heapq.heappop(self._pending)
      if not self._live(chunk.item):
        continue
      lane = min(lanes, key=lambda lane: (len(lane.inflight), lane.sent))
      item = chunk.item
      b = item.batch
      rows = slice(chunk.start, chunk.stop)
      spec = self.plan.spec(item.temperatures, item.states)
      request = wire.make_request(next(self._request_ids), b.tokens[rows], spec, b.segment_ids[rows],
                                  b.positions[rows], np.asarray(b.example_ids)[rows],
                                  part_inputs={key: x[rows] for key, x in item.part_inputs.items()})
      if chunk.sends:
        self.stats.count("retries")
      chunk.sends += 1
      chunk.sent_at = time.monotonic()
      lane.send(chunk, request)

  def on_response(self, lane: Lane, resp: pb.ForwardResponse) -> None:
    chunk = lane.inflight.pop(resp.request_id, None)
    if chunk is None:
      return
    now = time.monotonic()
    self.last_progress = now
    self.stats.answered(now - chunk.sent_at, resp.ByteSize())
    item = chunk.item
    if not self._live(item):
      return
    weights = resp.replica.weights_fingerprint or lane.weights
    if weights != self.info.weights_fingerprint:
      if weights not in self.retired and self.weights_changed(lane, resp.replica.replica_id, weights):
        return  # stop: training ends with the error
      if weights in self.retired:  # an answer of old weights: ask the current ones
        self.stats.count("discarded_answers")
        lane.draining = True
        lane.drain_reason = lane.drain_reason or f"replica {resp.replica.replica_id} serves retired weights"
        self.requeue([chunk])
        return
    error = answer_error(resp)
    if error is not None:
      code = error.code
      if code == grpc.StatusCode.UNAVAILABLE:
        lane.draining = True  # warming up or shutting down: no more requests to this replica
        self.requeue([chunk])
      elif code in _RETRYABLE:
        self._retry_or_fail(chunk, f"{lane.name}: {error}")
      else:
        self._finish(item, RemoteTeacherError(f"teacher {lane.name} rejected the batch: {error}"))
      return
    self._worker.submit(self._decode, chunk, resp, lane.name, weights)

  def _decode(self, chunk: _Chunk, resp: pb.ForwardResponse, lane_name: str, weights: str) -> None:
    """Worker thread: bytes -> checked host arrays (unpacking ids can take a while for big batches)."""
    try:
      targets = wire.response_to_targets(resp)
      plan = self.plan
      names = plan.names(chunk.item.states)
      targets.validate(batch_size=chunk.stop - chunk.start, seq_len=chunk.item.batch.tokens.shape[1],
                       k=plan.k, n_temps=len(chunk.item.temperatures), state_names=names,
                       state_layers=plan.layers if names else ())
      check_values(targets, vocab_size=self.info.vocab_size, temperatures=chunk.item.temperatures)
      inputs = {key: x[chunk.start:chunk.stop] for key, x in chunk.item.part_inputs.items()}
      targets = targets.with_parts(**{part.name: part.with_inputs(targets.parts.get(part.name), inputs)
                                      for part in PARTS[1:]})
    except ValueError as e:  # a malformed answer: treat like an engine failure (never trained on)
      self.stats.count("malformed")
      self.loop.call_soon_threadsafe(self._retry_or_fail, chunk, f"{lane_name}: malformed answer: {e}")
      return
    self.loop.call_soon_threadsafe(self._decoded, chunk, targets, weights)

  def _decoded(self, chunk: _Chunk, targets: TeacherTargets, weights: str) -> None:
    item = chunk.item
    if not self._live(item):
      return
    if weights != self.info.weights_fingerprint:  # the weights changed while it was decoded: ask again
      self.requeue([chunk])
      return
    chunk.result, chunk.weights = targets, weights
    item.remaining -= 1
    if item.remaining == 0:
      self._finish(item)

  def _retry_or_fail(self, chunk: _Chunk, why: str) -> None:
    chunk.errors += 1
    log.warning("teacher request failed (%d of %d attempts): %s", chunk.errors, self.cfg.max_request_errors, why)
    if chunk.errors >= self.cfg.max_request_errors:
      self._finish(chunk.item, RemoteTeacherError(f"teacher request failed {chunk.errors} times; last: {why}"))
    else:
      self.requeue([chunk])

  def _finish(self, item: Item, error: BaseException | None = None) -> None:
    self._active.discard(item)
    item.settled = True
    parts = [c.result for c in item.chunks]
    if error is None:
      item.weights = item.chunks[0].weights  # one set of weights per batch (weights_changed re-asks others)
    item.chunks = []
    if error is not None:
      item.error = error
      item.done.set()
    else:  # placing may wait for the device (e.g. behind a running step): never on the event loop
      self._worker.submit(self._place, item, parts)

  def _place(self, item: Item, parts: list[TeacherTargets]) -> None:
    """Worker thread: one batch's rows, reassembled in order, onto the trainer's mesh."""
    try:
      item.targets = self.place(parts[0] if len(parts) == 1 else concat(parts))
    except Exception as e:  # noqa: BLE001 - surfaces in the train loop's next()
      item.error = e
    item.done.set()

  def close(self) -> None:
    self._worker.shutdown(wait=True, cancel_futures=True)

  def check_deadlines(self) -> None:
    """Drops streams whose oldest request waited longer than request_timeout_s; rotates old streams.

    A stream older than stream_max_age_s drains (no new requests) and, once its
    answers are in, reconnects: round-robin then spreads the lanes over every
    replica the channel knows, also ones that came up after the lane connected.
    A draining lane with nothing in flight reconnects at once.
    """
    limit, max_age = self.cfg.request_timeout_s, self.cfg.stream_max_age_s
    now = time.monotonic()
    for lane in self.lanes:
      if limit is not None and lane.inflight and now - min(c.sent_at for c in lane.inflight.values()) > limit:
        log.warning("teacher %s: a request is unanswered after %g s; dropping the stream", lane.name, limit)
        lane.abort(f"a request was unanswered after {limit:g} s")
        continue
      if not lane.ready:
        continue
      if max_age is not None and not lane.draining and now - lane.opened_at > max_age:
        lane.draining = lane.rotating = True
        lane.drain_reason = f"stream older than {max_age:g} s (rotated to spread over the replicas)"
        self.stats.count("rotations")
      if lane.draining and not lane.inflight:
        lane.abort(lane.drain_reason or "the replica is draining")

  def describe(self) -> str:
    return "; ".join(f"{lane.name}: {'ready' if lane.ready else lane.last_error} "
                     f"({len(lane.inflight)} in flight)" for lane in self.lanes)

  def snapshot(self) -> dict[str, Any]:
    return {"ready_lanes": sum(lane.ready for lane in self.lanes),
            "inflight": sum(len(lane.inflight) for lane in self.lanes),
            "pending": len(self._pending)}
