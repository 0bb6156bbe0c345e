"""The gRPC servicer: proto <-> domain objects, nothing else (validation, batcher and engine do the work)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

import grpc
import numpy as np

from distill_core import wire
from distill_core.proto import teacher_pb2 as pb
from distill_core.proto import teacher_pb2_grpc
from teacher_server.batcher import Batcher, QueueFullError, ShuttingDownError, new_future
from teacher_server.config import LimitsConfig
from teacher_server.engine_api import Engine, EngineInfo
from teacher_server.metrics import Metrics
from teacher_server.parameters import chunk_size, compile_name_regex
from teacher_server.validation import Prepared, RequestError, prepare

log = logging.getLogger(__name__)
SERVER_VERSION = "0.1.0"
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def info_message(info: EngineInfo, limits: LimitsConfig, max_message_bytes: int, *,
                 serve_parameters: bool = False) -> pb.GetInfoResponse:
  """The GetInfo answer for an engine and the configured limits."""
  return pb.GetInfoResponse(
      model_type=info.model_type, vocab_size=info.vocab_size, padded_vocab_size=info.padded_vocab_size,
      num_layers=info.num_layers, hidden_size=info.hidden_size,
      num_attention_heads=info.num_attention_heads, num_key_value_heads=info.num_key_value_heads,
      head_dim=info.head_dim, max_position_embeddings=info.max_position_embeddings,
      value_dtypes=[wire.dtype_enum(d) for d in wire.VALUE_DTYPES],
      state_dtypes=[wire.dtype_enum(d) for d in wire.STATE_DTYPES], state_names=list(info.state_names),
      limits=pb.Limits(max_k=min(info.max_k, info.vocab_size), max_batch=limits.max_batch,
                       max_tokens_per_request=limits.max_tokens_per_request,
                       max_temperatures=info.max_temperatures, max_seq_len=info.max_seq_len,
                       selectable_layers=list(info.selectable_layers), max_message_bytes=max_message_bytes),
      weights_fingerprint=info.weights_fingerprint, tokenizer_fingerprint=info.tokenizer_fingerprint,
      buckets=[pb.Bucket(batch=b, length=t) for b, t in info.buckets], server_version=SERVER_VERSION,
      packed_id_bits=wire.bits_for(info.vocab_size), serves_parameters=serve_parameters)


def response_bytes(req: Prepared, hidden_size: int) -> int:
  """Approximate encoded size of the answer to ``req``."""
  bt = req.rows * req.length
  size = bt * req.k * (4 + req.value_dtype.itemsize) + bt * len(req.temperatures) * 4
  size += len(req.states) * len(req.layers) * bt * hidden_size * req.state_dtype.itemsize
  return size + 1024


class TeacherServicer(teacher_pb2_grpc.TeacherServicer):
  """Implements ``distill.teacher.v1.Teacher`` on top of an engine and a batcher."""

  def __init__(self, engine: Engine, batcher: Batcher, limits: LimitsConfig, metrics: Metrics, *,
               stream_window: int, max_message_bytes: int, parameter_chunk_bytes: int,
               serve_parameters: bool = False):
    self._engine = engine
    self._info = engine.info
    self._batcher = batcher
    self._limits = limits
    self._metrics = metrics
    self._window = stream_window
    self._max_message_bytes = max_message_bytes
    self._chunk_bytes = parameter_chunk_bytes
    self._serve_parameters = serve_parameters
    self._info_msg = info_message(self._info, limits, max_message_bytes, serve_parameters=serve_parameters)
    self._id_bits = wire.bits_for(self._info.vocab_size)
    self.ready = False  # set once the engine is warm

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
    return wire.targets_to_response(request_id, targets, packed_id_bits=self._id_bits if prepared.pack_ids else 0)

  async def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.GetInfoResponse:
    return self._info_msg

  async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
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

  async def Stream(self, request_iterator: AsyncIterator[pb.ForwardRequest],
                   context) -> AsyncIterator[pb.ForwardResponse]:
    window: asyncio.Queue = asyncio.Queue(self._window)
    reader = asyncio.create_task(self._read_stream(request_iterator, window))
    self._metrics.open_streams.inc()
    try:
      while (entry := await window.get()) is not None:
        if isinstance(entry, BaseException):
          raise entry
        yield await self._answer(*entry)
    finally:
      reader.cancel()
      self._metrics.open_streams.dec()

  async def _read_stream(self, request_iterator: AsyncIterator[pb.ForwardRequest], window: asyncio.Queue) -> None:
    """Validates and queues every request in arrival order; waits while the window or queue is full."""
    try:
      async for req in request_iterator:
        start = time.perf_counter()
        prepared = None
        try:
          prepared = self._prepare(req)
          future = await self._batcher.submit(prepared)
        except (RequestError, ShuttingDownError) as e:
          future = new_future()
          future.set_exception(e)
        await window.put((req.request_id, prepared, future, start))
    except asyncio.CancelledError:
      raise
    except Exception as e:  # noqa: BLE001 - handed to the writer, which fails the call
      await window.put(e)
    else:
      await window.put(None)

  async def _answer(self, request_id: int, prepared: Prepared | None, future: asyncio.Future,
                    start: float) -> pb.ForwardResponse:
    try:
      targets = await future
    except (RequestError, ShuttingDownError) as e:
      code, message = _status_of(e)
      self._metrics.record("Stream", code.name, time.perf_counter() - start)
      return wire.error_response(request_id, code.value[0], message, getattr(e, "field", ""))
    response = self._encode(request_id, prepared, targets)
    self._metrics.record("Stream", "OK", time.perf_counter() - start, prepared.rows * prepared.length)
    return response

  async def GetParameters(self, request: pb.GetParametersRequest, context) -> AsyncIterator[pb.ParameterChunk]:
    if not self._serve_parameters:
      await context.abort(grpc.StatusCode.UNIMPLEMENTED, "GetParameters is off on this server "
                                                         "(start it with serve_parameters=true)")
    try:
      pattern = compile_name_regex(request.name_regex)
      chunk = chunk_size(request.chunk_bytes, self._chunk_bytes, self._max_message_bytes)
    except RequestError as e:
      await context.abort(e.code, str(e))
    params = self._engine.parameters(pattern)
    found = 0
    while (item := await asyncio.to_thread(next, params, None)) is not None:
      name, value = item
      value = np.asarray(value)
      data = wire.le_bytes(value)
      meta = dict(name=name, dtype=wire.dtype_enum(value.dtype), shape=value.shape, total_bytes=len(data))
      for offset in range(0, max(len(data), 1), chunk):
        yield pb.ParameterChunk(offset=offset, data=data[offset:offset + chunk], **meta)
      found += 1
    if not found:
      await context.abort(grpc.StatusCode.NOT_FOUND, f"name_regex: no parameter matches {wire.echo(request.name_regex)}")


def _status_of(e: Exception) -> tuple[grpc.StatusCode, str]:
  if isinstance(e, RequestError):
    return e.code, str(e)
  if isinstance(e, QueueFullError):
    return grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)
  return _UNAVAILABLE, str(e)
