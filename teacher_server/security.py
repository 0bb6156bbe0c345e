"""TLS / mutual-TLS server credentials and the bearer-token interceptor."""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from teacher_server.config import SecurityConfig

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def _read(path: str, what: str) -> bytes:
  p = Path(path)
  if not p.is_file():
    raise FileNotFoundError(f"security.{what}: file not found: {path}")
  return p.read_bytes()


def server_credentials(cfg: SecurityConfig) -> grpc.ServerCredentials | None:
  """TLS credentials (client certificates verified against ``client_ca``), or None for plaintext."""
  if not cfg.tls_cert:
    return None
  key, cert = _read(cfg.tls_key, "tls_key"), _read(cfg.tls_cert, "tls_cert")
  client_ca = _read(cfg.client_ca, "client_ca") if cfg.client_ca else None
  return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                     require_client_auth=cfg.require_client_cert)


def load_token(cfg: SecurityConfig) -> str | None:
  """The configured bearer token (from ``auth_token`` or ``auth_token_file``), or None."""
  if cfg.auth_token_file:
    token = _read(cfg.auth_token_file, "auth_token_file").decode().strip()
    if not token:
      raise ValueError(f"security.auth_token_file {cfg.auth_token_file} is empty")
    return token
  return cfg.auth_token or None


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
  """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED."""

  async def deny(request, context):
    await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                        "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')")

  io = dict(request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
  if handler.unary_unary:
    return grpc.unary_unary_rpc_method_handler(deny, **io)
  if handler.unary_stream:
    return grpc.unary_stream_rpc_method_handler(deny, **io)
  if handler.stream_unary:
    return grpc.stream_unary_rpc_method_handler(deny, **io)
  return grpc.stream_stream_rpc_method_handler(deny, **io)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
  """Requires ``authorization: Bearer <token>`` on every call (health checks optionally exempt)."""

  def __init__(self, token: str, *, authenticate_health: bool = False):
    self._expected = f"Bearer {token}".encode()
    self._exempt = () if authenticate_health else (HEALTH_PREFIX,)

  async def intercept_service(self, continuation, handler_call_details):
    handler = await continuation(handler_call_details)
    if handler is None or handler_call_details.method.startswith(self._exempt):
      return handler
    got = ""
    for key, value in handler_call_details.invocation_metadata or ():
      if key == "authorization":
        got = value if isinstance(value, str) else value.decode("latin-1")
    if hmac.compare_digest(got.encode(), self._expected):
      return handler
    return _denied(handler)
