"""The gRPC servicer: proto <-> domain objects, nothing else (validation, batcher and engine do the work)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import secrets
import socket
import time
from typing import AsyncIterator

import grpc
import numpy as np

from distill_core import wire
from distill_core.parts import PARTS
from distill_core.proto import teacher_pb2 as pb
from distill_core.proto import teacher_pb2_grpc
from teacher_server.batcher import Batcher, QueueFullError, ShuttingDownError, new_future
from teacher_server.config import ServerConfig
from teacher_server.engine_api import Engine, EngineInfo
from teacher_server.handlers import Malformed, MalformedLog
from teacher_server.metrics import Metrics
from teacher_server.parameters import chunk_size, compile_name_regex
from teacher_server.validation import Prepared, RequestError, max_request_bytes, prepare

log = logging.getLogger(__name__)
SERVER_VERSION = "0.1.0"
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def default_replica_id() -> str:
  """Host name, process id and a random suffix: unique per server process."""
  return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def info_message(info: EngineInfo, cfg: ServerConfig, replica_id: str = "") -> pb.GetInfoResponse:
  """The GetInfo answer for an engine and the server's configuration."""
  limits = cfg.limits
  msg = pb.GetInfoResponse(
      model_type=info.model_type, vocab_size=info.vocab_size, padded_vocab_size=info.padded_vocab_size,
      num_layers=info.num_layers, hidden_size=info.hidden_size,
      num_attention_heads=info.num_attention_heads, num_key_value_heads=info.num_key_value_heads,
      head_dim=info.head_dim, max_position_embeddings=info.max_position_embeddings,
      value_dtypes=[wire.dtype_enum(d) for d in wire.VALUE_DTYPES],
      state_dtypes=[wire.dtype_enum(d) for d in wire.STATE_DTYPES], state_names=list(info.state_names),
      limits=pb.Limits(max_k=min(info.max_k, info.vocab_size), max_batch=limits.max_batch,
                       max_tokens_per_request=limits.max_tokens_per_request,
                       max_temperatures=info.max_temperatures, max_seq_len=info.max_seq_len,
                       selectable_layers=list(info.selectable_layers), max_message_bytes=cfg.max_message_bytes,
                       max_request_bytes=max_request_bytes(limits),
                       max_streams_per_connection=cfg.max_streams_per_connection,
                       stream_window_bytes=cfg.batcher.stream_window_bytes),
      weights_fingerprint=info.weights_fingerprint, tokenizer_fingerprint=info.tokenizer_fingerprint,
      buckets=[pb.Bucket(batch=b, length=t) for b, t in info.buckets], server_version=SERVER_VERSION,
      packed_id_bits=wire.bits_for(info.vocab_size), serves_parameters=cfg.serve_parameters,
      replica_id=replica_id)
  for part in PARTS:
    part.write_limits(info.part_limits, msg.limits)
  return msg


def response_bytes(req: Prepared, hidden_size: int) -> int:
  """Approximate encoded size of the answer to ``req``."""
  bt = req.rows * req.length
  size = bt * req.k * (4 + req.value_dtype.itemsize) + bt * len(req.temperatures) * 4
  size += len(req.states) * len(req.layers) * bt * hidden_size * req.state_dtype.itemsize
  size += bt * req.answer_bytes()
  return size + 1024


class PeerLog:
  """Logs each client connection once ("client ipv4:10.0.0.5:53124 connected: Stream"), remembering at
  most `capacity` peers (the oldest is forgotten first) and at most `max_chars` of each peer string."""

  def __init__(self, capacity: int = 1024, max_chars: int = 64):
    self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
    self._capacity = capacity
    self._max_chars = max_chars

  def __call__(self, context, method: str) -> None:
    peer = str(context.peer() or "unknown")[:self._max_chars]
    if peer in self._seen:
      self._seen.move_to_end(peer)
      return
    self._seen[peer] = None
    if len(self._seen) > self._capacity:
      self._seen.popitem(last=False)
    log.info("client %s connected: %s", peer, method)


@dataclasses.dataclass(eq=False)
class _Entry:
  """One request of a stream, from reading to its answer being sent."""

  request_id: int
  prepared: Prepared | None  # None: refused before the batcher (the future holds the error)
  future: asyncio.Future
  start: float
  held: int = 0  # estimated answer bytes counted against the stream's byte budget


def _failed(request_id: int, error: Exception, start: float) -> _Entry:
  future = new_future()
  future.set_exception(error)
  return _Entry(request_id, None, future, start)


class _ByteBudget:
  """Answer bytes one stream may hold (requested, computing or unsent); one request always fits."""

  def __init__(self, limit: int, gauge):
    self.limit = limit
    self.held = 0
    self._gauge = gauge
    self._freed = asyncio.Event()

  async def acquire(self, n: int) -> None:
    while self.held and self.held + n > self.limit:
      self._freed.clear()
      await self._freed.wait()
    self.held += n
    self._gauge.inc(n)

  def release(self, n: int) -> None:
    self.held -= n
    self._gauge.dec(n)
    self._freed.set()


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
  """Implements ``distill.teacher.v1.Teacher`` on top of an engine and a batcher."""

  def __init__(self, engine: Engine, batcher: Batcher, cfg: ServerConfig, metrics: Metrics):
    self._engine = engine
    self._info = engine.info
    self._batcher = batcher
    self._limits = cfg.limits
    self._metrics = metrics
    self.malformed = MalformedLog(metrics)
    self._window = cfg.batcher.stream_window
    self._window_bytes = cfg.batcher.stream_window_bytes
    self._max_message_bytes = cfg.max_message_bytes
    self._chunk_bytes = cfg.parameter_chunk_bytes
    self._serve_parameters = cfg.serve_parameters
    self.replica_id = cfg.replica_id or default_replica_id()
    self._info_msg = info_message(self._info, cfg, self.replica_id)
    self._identity = pb.ReplicaIdentity(replica_id=self.replica_id,
                                        weights_fingerprint=self._info.weights_fingerprint)
    self._id_bits = wire.bits_for(self._info.vocab_size)
    self.ready = False  # set once the engine is warm
    self.peers = PeerLog()

  def _prepare(self, req: pb.ForwardRequest) -> Prepared:
    if not self.ready:
      raise RequestError(_UNAVAILABLE, "", "the server is warming up")
    prepared = prepare(req, self._info, self._limits)
    size = response_bytes(prepared, self._info.hidden_size)
    if size > self._max_message_bytes:
      raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "tokens",
                         f"the answer (~{size} bytes) would exceed max_message_bytes "
                         f"{self._max_message_bytes}; send fewer rows or ask for fewer outputs")
    return prepared

  def _encode(self, request_id: int, prepared: Prepared, targets) -> pb.ForwardResponse:
    response = wire.targets_to_response(request_id, targets,
                                        packed_id_bits=self._id_bits if prepared.pack_ids else 0)
    response.replica.CopyFrom(self._identity)
    return response

  def stream_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
    """Initial metadata of every Stream call: this replica's GetInfo and whether it is warm."""
    return ((wire.INFO_METADATA_KEY, self._info_msg.SerializeToString()),
            (wire.READY_METADATA_KEY, "1" if self.ready else "0"))

  async def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.GetInfoResponse:
    self.peers(context, "GetInfo")
    return self._info_msg

  async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
    self.peers(context, "Forward")
    start = time.perf_counter()
    try:
      prepared = self._prepare(request)
      targets = await self._batcher.submit_nowait(prepared)
    except (RequestError, QueueFullError, ShuttingDownError) as e:
      code, message = _status_of(e)
      self._metrics.record("Forward", code.name, time.perf_counter() - start)
      await context.abort(code, message)
    response = self._encode(request.request_id, prepared, targets)
    self._metrics.record("Forward", "OK", time.perf_counter() - start, prepared.rows * prepared.length)
    return response

  async def Stream(self, request_iterator: AsyncIterator[pb.ForwardRequest | Malformed],
                   context) -> AsyncIterator[pb.ForwardResponse]:
    """Answers in request order. When the call ends early (client cancelled, deadline, reconnect), every
    request still queued is cancelled, so the batcher drops it before the engine runs it."""
    self.peers(context, "Stream")
    await context.send_initial_metadata(self.stream_metadata())  # the client checks this very replica
    window: asyncio.Queue = asyncio.Queue(self._window)
    budget = _ByteBudget(self._window_bytes, self._metrics.stream_held_bytes)
    reader = asyncio.create_task(self._read_stream(request_iterator, window, budget, context))
    self._metrics.open_streams.inc()
    entry = None  # the entry being answered, until its bytes are released
    try:
      while True:
        entry = await window.get()
        if entry is None:
          break
        if isinstance(entry, BaseException):
          raise entry
        response = await self._answer(entry)
        yield response
        budget.release(entry.held)
        entry = None
    finally:
      reader.cancel()
      left = [entry] if isinstance(entry, _Entry) else []
      while not window.empty():
        left.append(window.get_nowait())
      for e in left:
        if isinstance(e, _Entry):
          e.future.cancel()
          budget.release(e.held)
      self._metrics.open_streams.dec()

  async def _read_stream(self, request_iterator, window: asyncio.Queue, budget: _ByteBudget, context) -> None:
    """Validates and queues every request in arrival order; waits while the window, the byte budget or
    the batcher queue is full."""
    entry = None
    try:
      async for req in request_iterator:
        entry = await self._admit(req, budget, context)
        await window.put(entry)
        entry = None
    except asyncio.CancelledError:
      if entry is not None:
        entry.future.cancel()
        budget.release(entry.held)
      raise
    except Exception as e:  # noqa: BLE001 - handed to the writer, which fails the call
      await window.put(e)
    else:
      await window.put(None)

  async def _admit(self, req: pb.ForwardRequest | Malformed, budget: _ByteBudget, context) -> _Entry:
    start = time.perf_counter()
    if isinstance(req, Malformed):
      self.malformed("Stream", req, context)
      return _failed(req.request_id, RequestError(grpc.StatusCode.INVALID_ARGUMENT, req.message,
                                                  req.describe()), start)
    try:
      prepared = self._prepare(req)
    except RequestError as e:
      return _failed(req.request_id, e, start)
    held = response_bytes(prepared, self._info.hidden_size)
    await budget.acquire(held)
    try:
      future = await self._batcher.submit(prepared)
    except ShuttingDownError as e:
      budget.release(held)
      return _failed(req.request_id, e, start)
    except BaseException:
      budget.release(held)
      raise
    return _Entry(req.request_id, prepared, future, start, held)

  async def _answer(self, entry: _Entry) -> pb.ForwardResponse:
    try:
      targets = await entry.future
    except (RequestError, ShuttingDownError) as e:
      code, message = _status_of(e)
      self._metrics.record("Stream", code.name, time.perf_counter() - entry.start)
      response = wire.error_response(entry.request_id, code.value[0], message, getattr(e, "field", ""))
      response.replica.CopyFrom(self._identity)
      return response
    prepared = entry.prepared
    response = self._encode(entry.request_id, prepared, targets)
    self._metrics.record("Stream", "OK", time.perf_counter() - entry.start, prepared.rows * prepared.length)
    return response

  async def GetParameters(self, request: pb.GetParametersRequest, context) -> AsyncIterator[pb.ParameterChunk]:
    self.peers(context, "GetParameters")
    if not self._serve_parameters:
      await context.abort(grpc.StatusCode.UNIMPLEMENTED, "GetParameters is off on this server "
                                                         "(start it with serve_parameters=true)")
    try:
      pattern = compile_name_regex(request.name_regex)
      chunk = chunk_size(request.chunk_bytes, self._chunk_bytes, self._max_message_bytes)
    except RequestError as e:
      await context.abort(e.code, str(e))
    if request.start_offset < 0:
      await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "start_offset: must be >= 0")
    params = self._engine.parameters(pattern)
    found = 0
    while (item := await asyncio.to_thread(next, params, None)) is not None:
      name, value = item
      found += 1
      if request.start_name and name < request.start_name:
        continue  # already received by the interrupted download this one resumes
      dtype = np.dtype(value.dtype)
      meta = dict(name=name, dtype=wire.dtype_enum(dtype), shape=value.shape)
      if request.names_only:
        yield pb.ParameterChunk(offset=0, total_bytes=int(np.prod(value.shape, dtype=np.int64)) * dtype.itemsize,
                                **meta)
        continue
      data = await asyncio.to_thread(lambda v=value: wire.le_bytes(np.asarray(v)))  # device -> host off the loop
      start = request.start_offset if name == request.start_name else 0
      if start > len(data):
        await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"start_offset {start} is beyond the {len(data)} "
                                                          f"bytes of {name}")
      for offset in range(start, max(len(data), start + 1), chunk):
        yield pb.ParameterChunk(offset=offset, data=data[offset:offset + chunk], total_bytes=len(data), **meta)
    if not found:
      await context.abort(grpc.StatusCode.NOT_FOUND, f"name_regex: no parameter matches {wire.echo(request.name_regex)}")


def _status_of(e: Exception) -> tuple[grpc.StatusCode, str]:
  if isinstance(e, RequestError):
    return e.code, str(e)
  if isinstance(e, QueueFullError):
    return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
  return _UNAVAILABLE, str(e)
