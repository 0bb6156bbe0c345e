"""Async client of the teacher server (grpc.aio): info, unary forward, streams, parameters.

    async with TeacherClient("127.0.0.1:50051") as client:
      info = await client.info()
      targets = await client.forward(tokens, OutputSpec(k=64))     # TeacherTargets (numpy)
      async with client.stream() as stream:
        futures = [await stream.submit(batch, OutputSpec(k=64)) for batch in batches]
        for f in futures:
          targets = await f

Responses decode zero-copy into numpy :class:`TeacherTargets` (read-only arrays).
Failures raise :class:`TeacherError` carrying the gRPC status code, the message
and, for per-request errors, the request id and the field at fault.

Several replicas: pass a list of IP ``host:port`` targets, or one
``dns:///name:port`` target (e.g. a Kubernetes headless Service); calls are
spread with gRPC's round_robin policy (one stream sticks to one replica).
For streams that fail over between replicas, reconnect and check every
answer, use :class:`distill_core.stream.runner.StreamRunner` (built on
:class:`TeacherStream`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import json
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from distill_core import wire
from distill_core.proto import teacher_pb2 as pb
from distill_core.proto import teacher_pb2_grpc
from distill_core.targets import TeacherTargets, check_values
from distill_core.wire import OutputSpec

__all__ = ["OutputSpec", "TeacherClient", "TeacherError", "TeacherStream", "answer_error"]


class TeacherError(Exception):
  """A failed call or request: ``code`` (grpc.StatusCode), ``message``, ``field``, ``request_id``."""

  def __init__(self, code: grpc.StatusCode, message: str, *, field: str = "", request_id: int | None = None):
    where = f" (request {request_id})" if request_id is not None else ""
    super().__init__(f"{code.name}{where}: {message}")
    self.code = code
    self.message = message
    self.field = field
    self.request_id = request_id

  @classmethod
  def from_rpc(cls, e: grpc.aio.AioRpcError, request_id: int | None = None) -> "TeacherError":
    return cls(e.code(), e.details() or "", request_id=request_id)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _read(value: str | bytes | None) -> bytes | None:
  if value is None or isinstance(value, bytes):
    return value
  return Path(value).read_bytes()


def target_uri(target: str | Sequence[str]) -> str:
  """One gRPC target for a ``host:port``, a ``scheme:`` URI or a list of IP ``host:port``."""
  if isinstance(target, str):
    return target
  targets = list(target)
  if len(targets) == 1:
    return targets[0]
  hosts = []
  for t in targets:
    host = t.rpartition(":")[0].strip("[]")
    try:
      hosts.append(ipaddress.ip_address(host))
    except ValueError:
      raise ValueError(f"target list entry {t!r}: a list must hold IP host:port entries; use one "
                       "'dns:///name:port' target for a DNS name") from None
  if len({h.version for h in hosts}) != 1:
    raise ValueError(f"target list {targets} mixes IPv4 and IPv6 addresses")
  return f"ipv{hosts[0].version}:" + ",".join(targets)


class TeacherClient:
  """Connection to one teacher service (one or several replicas).

  Args:
    target: ``host:port``, a gRPC URI (``dns:///teacher:50051``) or a list of IP ``host:port``.
    root_certificates: PEM CA (path or bytes) that the server certificate must chain to; enables TLS.
    client_cert, client_key: PEM client certificate and key (path or bytes) for mutual TLS.
    token: bearer token sent as ``authorization: Bearer <token>``.
    server_name_override: TLS name to verify instead of the target host (tests, IP targets).
    max_message_bytes: largest message sent or received.
    tls: use TLS with the system roots when no ``root_certificates`` are given.
    options: extra gRPC channel arguments, e.g. ``("grpc.max_reconnect_backoff_ms", 2000)``.
  """

  def __init__(self, target: str | Sequence[str], *, root_certificates: str | bytes | None = None,
               client_cert: str | bytes | None = None, client_key: str | bytes | None = None,
               token: str | None = None, server_name_override: str | None = None,
               max_message_bytes: int = 256 << 20, tls: bool = False,
               options: Sequence[tuple[str, int | str]] = ()):
    if bool(client_cert) != bool(client_key):
      raise ValueError("client_cert and client_key must be given together")
    self.target = target_uri(target)
    self._creds = None
    if tls or root_certificates or client_cert:
      self._creds = grpc.ssl_channel_credentials(_read(root_certificates), _read(client_key), _read(client_cert))
    self._options = [("grpc.max_send_message_length", max_message_bytes),
                     ("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))]
    if server_name_override:
      self._options.append(("grpc.ssl_target_name_override", server_name_override))
    self._options.extend(options)
    self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
    self._channel: grpc.aio.Channel | None = None
    self._ids = itertools.count(1)

  @property
  def channel(self) -> grpc.aio.Channel:
    """The channel, created on first use (inside the running event loop)."""
    if self._channel is None:
      if self._creds is not None:
        self._channel = grpc.aio.secure_channel(self.target, self._creds, options=self._options)
      else:
        self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
      self._stub = teacher_pb2_grpc.TeacherStub(self._channel)
    return self._channel

  @property
  def stub(self) -> teacher_pb2_grpc.TeacherStub:
    _ = self.channel
    return self._stub

  def next_request_id(self) -> int:
    return next(self._ids)

  async def __aenter__(self) -> "TeacherClient":
    _ = self.channel
    return self

  async def __aexit__(self, *exc) -> None:
    await self.close()

  async def close(self) -> None:
    if self._channel is not None:
      await self._channel.close()
      self._channel = None

  async def info(self, timeout: float | None = None) -> pb.GetInfoResponse:
    """Model shape, limits, buckets and fingerprints."""
    try:
      return await self.stub.GetInfo(pb.GetInfoRequest(), metadata=self.metadata, timeout=timeout)
    except grpc.aio.AioRpcError as e:
      raise TeacherError.from_rpc(e) from None

  async def health(self, service: str = "", timeout: float | None = None) -> str:
    """The health status name (``SERVING``, ``NOT_SERVING``...) of ``service`` ("" = the server)."""
    stub = health_pb2_grpc.HealthStub(self.channel)
    try:
      resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), metadata=self.metadata,
                              timeout=timeout)
    except grpc.aio.AioRpcError as e:
      raise TeacherError.from_rpc(e) from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

  async def wait_until_serving(self, timeout: float = 60.0, interval: float = 0.2) -> None:
    """Polls health until SERVING; raises TimeoutError after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "no answer"
    while loop.time() < deadline:
      try:
        last = await self.health(timeout=max(0.1, min(2.0, deadline - loop.time())))
        if last == "SERVING":
          return
      except TeacherError as e:
        last = str(e)
      await asyncio.sleep(interval)
    raise TimeoutError(f"teacher at {self.target} not SERVING after {timeout} s (last: {last})")

  async def forward(self, tokens: np.ndarray, spec: OutputSpec, segment_ids: np.ndarray | None = None,
                    positions: np.ndarray | None = None, *, example_ids: np.ndarray | None = None,
                    request_id: int | None = None, timeout: float | None = None,
                    vocab_size: int | None = None) -> TeacherTargets:
    """One unary request; returns numpy ``TeacherTargets`` (``example_ids`` [B]: required with samples).

    The answer's values are checked (``targets.check_values``): the temperatures are the requested
    ones, every first value is 0, and, given ``vocab_size``, every id lies in the vocabulary; a
    failed check raises ``TeacherError(DATA_LOSS)`` naming the field.
    """
    rid = self.next_request_id() if request_id is None else request_id
    req = wire.make_request(rid, tokens, spec, segment_ids, positions, example_ids)
    try:
      resp = await self.stub.Forward(req, metadata=self.metadata, timeout=timeout)
    except grpc.aio.AioRpcError as e:
      raise TeacherError.from_rpc(e, rid) from None
    targets = wire.response_to_targets(resp)
    try:
      return check_values(targets, vocab_size=vocab_size, temperatures=spec.temperatures)
    except ValueError as e:
      raise TeacherError(grpc.StatusCode.DATA_LOSS, f"malformed answer: {e}", request_id=rid) from None

  async def list_parameters(self, name_regex: str, timeout: float | None = None
                            ) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of the parameters matching the RE2 pattern ``name_regex``, no bytes."""
    call = self.stub.GetParameters(pb.GetParametersRequest(name_regex=name_regex, names_only=True),
                                   metadata=self.metadata, timeout=timeout)
    out = {}
    try:
      async for chunk in call:
        out[chunk.name] = (wire.numpy_dtype(chunk.dtype), tuple(int(d) for d in chunk.shape))
    except grpc.aio.AioRpcError as e:
      raise TeacherError.from_rpc(e) from None
    return out

  async def get_parameters(self, name_regex: str, chunk_bytes: int = 0, timeout: float | None = None, *,
                           download: "ParameterDownload | None" = None) -> dict[str, np.ndarray]:
    """Parameters whose names match the RE2 pattern ``name_regex`` (searched), reassembled from chunks.

    Pass a :class:`ParameterDownload` to make the download resumable: after a
    failed call, calling again with the same object asks the server to start
    where the received bytes end.
    """
    download = download if download is not None else ParameterDownload()
    start_name, start_offset = download.resume_point()
    call = self.stub.GetParameters(pb.GetParametersRequest(
        name_regex=name_regex, chunk_bytes=chunk_bytes, start_name=start_name, start_offset=start_offset),
        metadata=self.metadata, timeout=timeout)
    try:
      async for chunk in call:
        download.add(chunk)
    except grpc.aio.AioRpcError as e:
      raise TeacherError.from_rpc(e) from None
    return download.arrays()

  def stream(self, window: int | None = None, *, raw: bool = False) -> "TeacherStream":
    """A bidirectional stream; ``window`` bounds the unanswered requests (None = unbounded); ``raw``: futures
    resolve to the ``ForwardResponse`` (see :class:`TeacherStream`)."""
    return TeacherStream(self, window, raw=raw)


class ParameterDownload:
  """The bytes of a GetParameters download so far, so an interrupted one can resume.

  The server sends parameters in order of name, each in order of offset, so
  everything before the last name received is complete and the download resumes
  at (that name, its received length).
  """

  def __init__(self):
    self._parts: dict[str, tuple[pb.ParameterChunk, bytearray]] = {}
    self.received_bytes = 0

  def add(self, chunk: pb.ParameterChunk) -> None:
    head, buf = self._parts.setdefault(chunk.name, (chunk, bytearray()))
    if chunk.offset != len(buf):
      raise TeacherError(grpc.StatusCode.DATA_LOSS, f"{chunk.name}: chunk at offset {chunk.offset}, "
                                                    f"expected {len(buf)}")
    if len(buf) + len(chunk.data) > head.total_bytes:
      raise TeacherError(grpc.StatusCode.DATA_LOSS, f"{chunk.name}: more than its {head.total_bytes} bytes")
    buf += chunk.data
    self.received_bytes += len(chunk.data)

  def resume_point(self) -> tuple[str, int]:
    """("", 0) for a fresh download, else (last name received, its bytes so far)."""
    if not self._parts:
      return "", 0
    name = max(self._parts)
    return name, len(self._parts[name][1])

  def arrays(self) -> dict[str, np.ndarray]:
    out = {}
    for name, (head, buf) in sorted(self._parts.items()):
      if len(buf) != head.total_bytes:
        raise TeacherError(grpc.StatusCode.DATA_LOSS, f"{name}: {len(buf)} of {head.total_bytes} bytes")
      out[name] = wire.decode_tensor(pb.Tensor(dtype=head.dtype, shape=head.shape, data=bytes(buf)), name)
    return out


def answer_error(resp: pb.ForwardResponse) -> TeacherError | None:
  """The per-request error an answer carries, as a :class:`TeacherError` (None for an answer with targets)."""
  if not resp.HasField("error"):
    return None
  code = _CODES.get(resp.error.code, grpc.StatusCode.UNKNOWN)
  return TeacherError(code, resp.error.message, field=resp.error.field, request_id=resp.request_id)


class TeacherStream:
  """Many requests over one ``Stream`` call; use as ``async with client.stream() as s``.

  :meth:`submit` returns a future per request (resolved with ``TeacherTargets``
  or failed with :class:`TeacherError`); answers arrive in submission order.
  With ``raw=True`` every future resolves to the ``ForwardResponse`` itself
  (per-request errors included, see :func:`answer_error`), for callers that
  decode elsewhere and look at the replica each answer names
  (``distill_core.stream.pool``). When the call ends, :attr:`error` says why
  (None: the server ended it) and every unanswered future fails.
  """

  def __init__(self, client: TeacherClient, window: int | None = None, *, raw: bool = False):
    self._client = client
    self._raw = raw
    self._window = asyncio.Semaphore(window) if window else None
    self._pending: dict[int, asyncio.Future] = {}
    self._outbox: asyncio.Queue[pb.ForwardRequest | None] = asyncio.Queue()
    self._call = None
    self._reader: asyncio.Task | None = None
    self._closed = False
    self.error: TeacherError | None = None

  def open(self) -> "TeacherStream":
    """Starts the call and its reader (inside the running event loop)."""
    self._call = self._client.stub.Stream(self._requests(), metadata=self._client.metadata)
    self._reader = asyncio.create_task(self._read())
    return self

  async def __aenter__(self) -> "TeacherStream":
    return self.open()

  async def __aexit__(self, exc_type, *exc) -> None:
    if exc_type is None:
      await self.close()
    else:
      self.cancel()

  async def _requests(self):
    while (req := await self._outbox.get()) is not None:
      yield req

  @property
  def call(self):
    """The underlying ``grpc.aio`` stream call (None before :meth:`open`)."""
    return self._call

  @property
  def pending(self) -> int:
    """Requests submitted but not yet answered."""
    return len(self._pending)

  @property
  def is_open(self) -> bool:
    """Whether requests can still be sent (opened, not half-closed, the call not ended)."""
    return not self._closed and self._reader is not None and not self._reader.done()

  @property
  def reader(self) -> asyncio.Task | None:
    """The task reading the answers; done once the call has ended and every future is settled."""
    return self._reader

  async def submit(self, tokens: np.ndarray, spec: OutputSpec, segment_ids: np.ndarray | None = None,
                   positions: np.ndarray | None = None, *, example_ids: np.ndarray | None = None,
                   request_id: int | None = None) -> asyncio.Future:
    """Sends one request (waiting while the window is full); returns its future."""
    return await self.submit_request(wire.make_request(
        self._client.next_request_id() if request_id is None else request_id, tokens, spec, segment_ids,
        positions, example_ids))

  async def submit_request(self, req: pb.ForwardRequest) -> asyncio.Future:
    """Sends a prepared ``ForwardRequest`` (waiting while the window is full); returns its future."""
    self._check_open(req)
    if self._window is not None:
      await self._window.acquire()
    return self._enqueue(req)

  def send(self, req: pb.ForwardRequest) -> asyncio.Future:
    """Sends a prepared ``ForwardRequest`` at once, outside the window; returns its future."""
    self._check_open(req)
    if self._window is not None:
      raise ValueError("send() bypasses the window: use submit_request() on a stream with a window")
    return self._enqueue(req)

  def _check_open(self, req: pb.ForwardRequest) -> None:
    if self._closed or self._reader is None or self._reader.done():
      raise TeacherError(grpc.StatusCode.FAILED_PRECONDITION, "the stream is not open", request_id=req.request_id)
    if req.request_id in self._pending:
      raise ValueError(f"request id {req.request_id} is already in flight on this stream")

  def _enqueue(self, req: pb.ForwardRequest) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    self._pending[req.request_id] = future
    self._outbox.put_nowait(req)
    return future

  def _resolve(self, request_id: int, result=None, error: Exception | None = None) -> None:
    future = self._pending.pop(request_id, None)
    if future is None:
      return
    if self._window is not None:
      self._window.release()
    if future.done():
      return
    if error is not None:
      future.set_exception(error)
    else:
      future.set_result(result)

  def _answer(self, resp: pb.ForwardResponse) -> None:
    rid = resp.request_id
    if self._raw:
      self._resolve(rid, resp)
      return
    error = answer_error(resp)
    if error is not None:
      self._resolve(rid, error=error)
      return
    try:
      self._resolve(rid, wire.response_to_targets(resp))
    except wire.WireError as e:
      self._resolve(rid, error=TeacherError(grpc.StatusCode.DATA_LOSS, str(e), field=e.field, request_id=rid))

  async def _read(self) -> None:
    error: grpc.aio.AioRpcError | TeacherError | None = None
    try:
      async for resp in self._call:
        self._answer(resp)
    except grpc.aio.AioRpcError as e:
      error = e
    except asyncio.CancelledError:
      error = TeacherError(grpc.StatusCode.CANCELLED, "the stream was cancelled")
    if isinstance(error, grpc.aio.AioRpcError):
      self.error = TeacherError.from_rpc(error)
    else:
      self.error = error
    for rid in list(self._pending):
      if isinstance(error, grpc.aio.AioRpcError):
        self._resolve(rid, error=TeacherError.from_rpc(error, rid))
      else:
        code, message = ((error.code, error.message) if error is not None else
                         (grpc.StatusCode.UNAVAILABLE, "the stream ended before the answer"))
        self._resolve(rid, error=TeacherError(code, message, request_id=rid))

  def half_close(self) -> None:
    """Ends the request side; the reader keeps reading the outstanding answers."""
    if not self._closed:
      self._closed = True
      self._outbox.put_nowait(None)

  async def close(self) -> None:
    """Half-closes the stream and waits for every outstanding answer."""
    self.half_close()
    if self._reader is not None:
      await self._reader

  def cancel(self) -> None:
    """Abandons the stream; outstanding futures fail with CANCELLED."""
    self.half_close()
    if self._call is not None:
      self._call.cancel()
