"""The Teacher service's gRPC method handlers: lenient decoding and a cap on concurrent calls.

Request bytes are decoded by :func:`lenient`, which never raises: bytes that are
not a valid message (random, truncated, bad UTF-8 in a string, an overlong
varint) become a :class:`Malformed` value, which the servicer answers with
INVALID_ARGUMENT naming the message (per request on ``Stream``, which stays
open) and one rate-limited log line, never a traceback. The bearer-token
interceptor refuses unauthenticated calls before any decoding.

Every Teacher call counts against ``max_concurrent_rpcs`` and, per client
connection, against ``max_streams_per_connection``; a call over either cap fails
with RESOURCE_EXHAUSTED at once, naming the option. gRPC's own
``maximum_concurrent_rpcs`` is set :data:`PROBE_HEADROOM_RPCS` higher, so health
probes and reflection still get through when the Teacher calls are at the cap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
from typing import Any, Callable

import grpc

from distill_core.proto import teacher_pb2 as pb
from teacher_server.logs import RateLimitedLog
from teacher_server.metrics import Metrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Teacher"].full_name
PROBE_HEADROOM_RPCS = 16  # calls beyond max_concurrent_rpcs that gRPC admits, for health and reflection
_CLOSE_WAIT_S = 5.0  # after a failed write, how long to wait for gRPC to report the client's close
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Malformed:
  """Request bytes that do not parse as ``message``."""

  message: str  # e.g. "ForwardRequest"
  size: int
  request_id: int  # read from the leading field 1 when the bytes start with it, else 0

  def describe(self) -> str:
    return f"{self.size} bytes that do not parse as a protobuf {self.message}"


def leading_request_id(data: bytes) -> int:
  """Field 1 (``request_id``, varint) when the bytes start with it, as every protobuf encoder writes it; else 0."""
  if not data or data[0] != 0x08:
    return 0
  value = 0
  for i, byte in enumerate(data[1:11]):
    value |= (byte & 0x7F) << (7 * i)
    if not byte & 0x80:
      return value if value < 1 << 64 else 0
  return 0


def lenient(message_type) -> Callable[[bytes], Any]:
  """A request deserializer that returns :class:`Malformed` instead of raising."""
  name = message_type.DESCRIPTOR.name

  def parse(data: bytes):
    try:
      return message_type.FromString(data)
    except Exception:  # noqa: BLE001 - DecodeError, or anything else the parser raises on garbage
      return Malformed(name, len(data), leading_request_id(data))

  return parse


class CallGate:
  """Counts open Teacher calls, in all and per connection; refuses the ones over either cap."""

  def __init__(self, limit: int, per_connection: int, metrics: Metrics):
    self.limit = limit
    self.per_connection = per_connection
    self.active = 0
    self._by_peer: collections.Counter[str] = collections.Counter()
    self._metrics = metrics

  async def enter(self, method: str, context) -> str:
    """Admits a call (returns its connection's key for :meth:`leave`) or aborts it with RESOURCE_EXHAUSTED."""
    peer = context.peer()  # "ipv4:10.0.0.5:53124": one per client connection
    if self.active >= self.limit:
      message = (f"too many concurrent calls: the server takes at most max_concurrent_rpcs {self.limit} "
                 "Teacher calls at once; retry later or use another replica")
    elif self._by_peer[peer] >= self.per_connection:
      message = (f"too many calls on one connection: at most max_streams_per_connection "
                 f"{self.per_connection} Teacher calls (streams) per connection at once")
    else:
      self.active += 1
      self._by_peer[peer] += 1
      return peer
    self._metrics.record(method, "RESOURCE_EXHAUSTED", 0.0)
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

  def leave(self, peer: str) -> None:
    self.active -= 1
    self._by_peer[peer] -= 1
    if not self._by_peer[peer]:
      del self._by_peer[peer]


class MalformedLog:
  """One log line per interval for malformed requests (with the count of those not logged)."""

  def __init__(self, metrics: Metrics, interval_s: float = 10.0):
    self.metrics = metrics
    self._log = RateLimitedLog(log, interval_s)

  def __call__(self, method: str, bad: Malformed, context) -> None:
    self.metrics.malformed.labels(method).inc()
    self._log.warning("%s: malformed request from %s: %s", method, context.peer(), bad.describe())

  async def refuse(self, method: str, bad: Malformed, context) -> None:
    """Logs (rate-limited), counts and fails a call whose only request did not parse."""
    self(method, bad, context)
    self.metrics.record(method, "INVALID_ARGUMENT", 0.0)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{bad.message}: {bad.describe()}")


def _unary(method: str, fn, gate: CallGate, malformed: MalformedLog):
  async def call(request, context):
    peer = await gate.enter(method, context)
    try:
      if isinstance(request, Malformed):
        await malformed.refuse(method, request, context)
      return await fn(request, context)
    finally:
      gate.leave(peer)
  return call


def _streaming(method: str, fn, gate: CallGate, malformed: MalformedLog, *, per_request: bool):
  async def call(request, context):
    peer = await gate.enter(method, context)
    try:
      if not per_request and isinstance(request, Malformed):
        await malformed.refuse(method, request, context)
      async with contextlib.aclosing(fn(request, context)) as responses:
        async for response in responses:
          try:
            await context.write(response)
          except Exception:
            # The client went away during the write (cancelled, deadline, reconnect). gRPC cancels
            # this task once the transport reports the close, and then ends the call quietly; a
            # failure it has not yet seen as a close would be logged with a traceback.
            log.debug("%s: a write failed; waiting for the client's close", method)
            await asyncio.sleep(_CLOSE_WAIT_S)
            raise
    finally:
      gate.leave(peer)
  return call


def teacher_handler(servicer, gate: CallGate) -> grpc.GenericRpcHandler:
  """The Teacher service's handlers around ``servicer`` (a ``TeacherServicer``, which owns ``malformed``)."""
  malformed = servicer.malformed
  out = pb.ForwardResponse.SerializeToString
  handlers = {
      "GetInfo": grpc.unary_unary_rpc_method_handler(
          _unary("GetInfo", servicer.GetInfo, gate, malformed),
          request_deserializer=lenient(pb.GetInfoRequest), response_serializer=pb.GetInfoResponse.SerializeToString),
      "Forward": grpc.unary_unary_rpc_method_handler(
          _unary("Forward", servicer.Forward, gate, malformed),
          request_deserializer=lenient(pb.ForwardRequest), response_serializer=out),
      "Stream": grpc.stream_stream_rpc_method_handler(
          _streaming("Stream", servicer.Stream, gate, malformed, per_request=True),
          request_deserializer=lenient(pb.ForwardRequest), response_serializer=out),
      "GetParameters": grpc.unary_stream_rpc_method_handler(
          _streaming("GetParameters", servicer.GetParameters, gate, malformed, per_request=False),
          request_deserializer=lenient(pb.GetParametersRequest),
          response_serializer=pb.ParameterChunk.SerializeToString),
  }
  return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
