"""Server wiring: grpc.aio server, health, reflection, auth, metrics endpoint, lifecycle.

Start-up: load the engine, listen (health NOT_SERVING), compile every bucket
(warm-up, logged with timings), then health SERVING. SIGTERM/SIGINT: health
NOT_SERVING, stop accepting new calls, give open calls ``shutdown_grace_s`` to
finish (streams keep being answered), answer everything queued, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from teacher_server.batcher import Batcher
from teacher_server.config import ServerConfig, split_address
from teacher_server.engine import JaxEngine
from teacher_server.engine_api import Engine
from teacher_server.handlers import PROBE_HEADROOM_RPCS, SERVICE_NAME, CallGate, teacher_handler
from teacher_server.metrics import Metrics
from teacher_server.security import BearerTokenInterceptor, load_parameters_token, load_token, server_credentials
from teacher_server.servicer import TeacherServicer
from teacher_server.validation import max_request_bytes

log = logging.getLogger(__name__)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class TeacherServer:
  """One teacher server around an engine. ``await start()``, later ``await drain()``."""

  def __init__(self, cfg: ServerConfig, engine: Engine):
    self.cfg = cfg
    self.engine = engine
    self.metrics = Metrics()
    b = cfg.batcher
    self.batcher = Batcher(engine, max_wait_ms=b.max_wait_ms, queue_size=b.queue_size,
                           max_inflight_batches=b.max_inflight_batches, metrics=self.metrics)
    self.servicer = TeacherServicer(engine, self.batcher, cfg, self.metrics)
    self.gate = CallGate(cfg.max_concurrent_rpcs, cfg.max_streams_per_connection, self.metrics)
    self.health = health.aio.HealthServicer()
    self.port: int | None = None
    self._server: grpc.aio.Server | None = None
    self._health_server: grpc.aio.Server | None = None
    self.health_port: int | None = None
    self._metrics_http = None
    self._drained = False

  def _build(self) -> grpc.aio.Server:
    cfg = self.cfg
    interceptors = []
    token, parameters_token = load_token(cfg.security), load_parameters_token(cfg.security)
    if token or parameters_token:
      interceptors.append(BearerTokenInterceptor(token, parameters_token=parameters_token,
                                                 authenticate_health=cfg.security.authenticate_health))
    options = [("grpc.max_send_message_length", cfg.max_message_bytes),
               # Requests over this are refused by gRPC before they are parsed.
               ("grpc.max_receive_message_length", max_request_bytes(cfg.limits)),
               ("grpc.so_reuseport", 0)]
    if cfg.max_connection_age_s is not None:  # clients reconnect, re-resolving a dns:/// name
      options += [("grpc.max_connection_age_ms", int(cfg.max_connection_age_s * 1000)),
                  ("grpc.max_connection_age_grace_ms", int(cfg.shutdown_grace_s * 1000))]
    server = grpc.aio.server(interceptors=interceptors, options=options,
                             maximum_concurrent_rpcs=cfg.max_concurrent_rpcs + PROBE_HEADROOM_RPCS)
    server.add_generic_rpc_handlers((teacher_handler(self.servicer, self.gate),))
    health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    creds = server_credentials(cfg.security)
    try:
      port = server.add_secure_port(cfg.address, creds) if creds else server.add_insecure_port(cfg.address)
    except RuntimeError as e:
      raise OSError(f"could not bind address {cfg.address}: {e}") from None
    if not port:
      raise OSError(f"could not bind address {cfg.address}")
    self.port = port
    log.info("listening on %s (port %d, %s%s%s)", cfg.address, port, "TLS" if creds else "plaintext",
             ", bearer token required" if token else "",
             ", GetParameters served" + (" to the parameters token" if parameters_token else "")
             if cfg.serve_parameters else "")
    return server

  def _build_health(self) -> grpc.aio.Server:
    """Health alone, in plaintext, for orchestrator probes (Kubernetes' gRPC probe speaks no TLS)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], maximum_concurrent_rpcs=PROBE_HEADROOM_RPCS)
    health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
    try:
      self.health_port = server.add_insecure_port(self.cfg.health_address)
    except RuntimeError as e:
      raise OSError(f"could not bind health_address {self.cfg.health_address}: {e}") from None
    if not self.health_port:
      raise OSError(f"could not bind health_address {self.cfg.health_address}")
    log.info("health (grpc.health.v1 only, plaintext) on %s", self.cfg.health_address)
    return server

  def _serve_metrics(self, address: str):
    try:
      return self.metrics.serve(address)
    except OSError as e:  # e.g. a second server on this machine with the same metrics port
      _, port = split_address(address, "metrics_address")
      raise OSError(f"metrics_address: cannot listen on {address} (port {port}): {e.strerror or e}; set "
                    f"metrics_address=HOST:PORT to a free port, or metrics_address=null to serve no metrics") from None

  async def _set_health(self, status) -> None:
    for name in ("", SERVICE_NAME):
      await self.health.set(name, status)

  async def start(self) -> int:
    """Listens, warms the engine up, starts batching; returns the bound port."""
    await self._set_health(_NOT_SERVING)
    self._server = self._build()
    await self._server.start()
    if self.cfg.health_address:
      self._health_server = self._build_health()
      await self._health_server.start()
    if self.cfg.metrics_address:
      self._metrics_http = self._serve_metrics(self.cfg.metrics_address)
      log.info("metrics on http://%s/metrics", self.cfg.metrics_address)
    start = time.perf_counter()
    timings = await asyncio.to_thread(self.engine.warmup)
    for name, seconds in timings.items():
      log.info("warm-up %s: %.2f s", name, seconds, extra={"variant": name, "seconds": round(seconds, 3)})
    log.info("warm-up done in %.1f s (%d variants, %d compilations)", time.perf_counter() - start,
             len(timings), self.engine.compilations())
    self.metrics.compilations.set(self.engine.compilations())
    await self.batcher.start()
    self.servicer.ready = True
    await self._set_health(_SERVING)
    log.info("serving as replica %s, weights %s", self.servicer.replica_id,
             self.engine.info.weights_fingerprint[:16])
    return self.port

  async def wait(self) -> None:
    await self._server.wait_for_termination()

  async def drain(self) -> None:
    """NOT_SERVING, refuse new calls, let open calls finish within the grace period, flush the batcher."""
    if self._drained:
      return
    self._drained = True
    log.info("draining (grace %.1f s)", self.cfg.shutdown_grace_s)
    await self.health.enter_graceful_shutdown()
    if self._server is not None:
      await self._server.stop(self.cfg.shutdown_grace_s)
    if self._health_server is not None:
      await self._health_server.stop(0)
    await self.batcher.close()
    if self._metrics_http is not None:
      self._metrics_http[0].shutdown()
    log.info("stopped")


async def serve(cfg: ServerConfig, engine: Engine | None = None) -> int:
  """Runs the server until SIGTERM/SIGINT, then drains; returns the process exit code."""
  loop = asyncio.get_running_loop()
  stop = asyncio.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    loop.add_signal_handler(sig, stop.set)
  try:
    if engine is None:
      engine = await asyncio.to_thread(JaxEngine.from_config, cfg)
    server = TeacherServer(cfg, engine)
    await server.start()
  except (OSError, ValueError) as e:  # missing files, bad checkpoints, unusable settings, busy port
    log.error("cannot start: %s", e)
    return 1
  stopped = asyncio.create_task(stop.wait())
  terminated = asyncio.create_task(server.wait())
  await asyncio.wait({stopped, terminated}, return_when=asyncio.FIRST_COMPLETED)
  if terminated.done():
    log.error("the gRPC server terminated unexpectedly")
    return 1
  log.info("shutdown signal received")
  await server.drain()
  terminated.cancel()
  return 0
