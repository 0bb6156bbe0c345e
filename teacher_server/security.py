"""TLS / mutual-TLS server credentials and the bearer-token interceptor."""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from teacher_server.config import SecurityConfig

HEALTH_PREFIX = "/grpc.health.v1.Health/"
PARAMETERS_METHOD = "/distill.teacher.v1.Teacher/GetParameters"


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


def _token(value: str | None, path: str | None, what: str) -> str | None:
  if path:
    token = _read(path, f"{what}_file").decode().strip()
    if not token:
      raise ValueError(f"security.{what}_file {path} is empty")
    return token
  return value or None


def load_token(cfg: SecurityConfig) -> str | None:
  """The configured bearer token (from ``auth_token`` or ``auth_token_file``), or None."""
  return _token(cfg.auth_token, cfg.auth_token_file, "auth_token")


def load_parameters_token(cfg: SecurityConfig) -> str | None:
  """The GetParameters token (from ``parameters_token`` or ``parameters_token_file``), or None."""
  return _token(cfg.parameters_token, cfg.parameters_token_file, "parameters_token")


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
  """A handler of the same kind as ``handler`` that fails with ``code`` without parsing the request."""

  async def deny(request, context):
    await context.abort(code, message)

  # No request deserializer: the bytes of a refused call are never parsed.
  io = dict(request_deserializer=None, response_serializer=handler.response_serializer)
  if handler.unary_unary:
    return grpc.unary_unary_rpc_method_handler(deny, **io)
  if handler.unary_stream:
    return grpc.unary_stream_rpc_method_handler(deny, **io)
  if handler.stream_unary:
    return grpc.stream_unary_rpc_method_handler(deny, **io)
  return grpc.stream_stream_rpc_method_handler(deny, **io)


_NO_TOKEN = "missing or invalid bearer token (send metadata 'authorization: Bearer <token>')"


def _bearer(token: str | None) -> bytes | None:
  return f"Bearer {token}".encode() if token else None


def _matches(got: bytes, want: bytes | None) -> bool:
  return want is not None and hmac.compare_digest(got, want)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
  """Requires ``authorization: Bearer <token>`` on every call (health checks optionally exempt).

  ``token`` guards every call (None: open). ``parameters_token``, when set, is the only token that
  may call GetParameters, and it is accepted for every other call too.
  """

  def __init__(self, token: str | None, *, parameters_token: str | None = None, authenticate_health: bool = False):
    self._token = _bearer(token)
    self._parameters = _bearer(parameters_token)
    self._exempt = () if authenticate_health else (HEALTH_PREFIX,)

  async def intercept_service(self, continuation, handler_call_details):
    handler = await continuation(handler_call_details)
    method = handler_call_details.method
    if handler is None or method.startswith(self._exempt):
      return handler
    got = b""
    for key, value in handler_call_details.invocation_metadata or ():
      if key == "authorization":
        got = value.encode("latin-1", "replace") if isinstance(value, str) else bytes(value)
    general = self._token is None or _matches(got, self._token) or _matches(got, self._parameters)
    if method == PARAMETERS_METHOD and self._parameters is not None:
      if _matches(got, self._parameters):
        return handler
      if general:
        return _denied(handler, grpc.StatusCode.PERMISSION_DENIED,
                       "GetParameters needs the parameters token (security.parameters_token)")
      return _denied(handler, grpc.StatusCode.UNAUTHENTICATED, _NO_TOKEN)
    return handler if general else _denied(handler, grpc.StatusCode.UNAUTHENTICATED, _NO_TOKEN)
