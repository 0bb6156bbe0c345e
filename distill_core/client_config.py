"""How a client reaches a teacher server securely: TLS, mutual TLS, bearer token, message size.

Shared by every client config (the trainer's `teacher.remote`, the dump's `remote`), so the options,
their checks and their meaning exist once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pydantic
from pydantic import Field

from distill_core.addresses import PLAINTEXT_TOKEN_RULE, is_loopback_target
from distill_core.client import TeacherClient
from distill_core.config import ConfigBase


class ClientSecurityConfig(ConfigBase):
  """TLS / mTLS / token options of a teacher-server client."""

  token: str | None = Field(None, description="Bearer token (prefer token_file).")
  token_file: str | None = Field(None, description="File holding the bearer token (one line).")
  tls: bool = Field(False, description="Use TLS with the system roots (implied by root_certificates).")
  root_certificates: str | None = Field(None, description="PEM CA file the server certificate must chain to.")
  client_cert: str | None = Field(None, description="PEM client certificate (mutual TLS).")
  client_key: str | None = Field(None, description="PEM key of client_cert.")
  server_name_override: str | None = Field(None, description="TLS name to verify instead of the address host.")
  max_message_mb: int = Field(256, ge=1, description="Largest gRPC message sent or received, in MiB.")

  @pydantic.model_validator(mode="after")
  def _check_security(self) -> "ClientSecurityConfig":
    if self.token and self.token_file:
      raise ValueError("give token or token_file, not both")
    if bool(self.client_cert) != bool(self.client_key):
      raise ValueError("client_cert and client_key must be given together")
    return self

  def check_plaintext_token(self, targets: Sequence[str]) -> None:
    """A token only travels over TLS, except to a loopback address (ValueError otherwise)."""
    if (self.token or self.token_file) and not (self.tls or self.root_certificates):
      remote = [t for t in targets if not is_loopback_target(t)]
      if remote:
        raise ValueError(f"token for {remote[0]} without tls/root_certificates: {PLAINTEXT_TOKEN_RULE}")

  def read_token(self) -> str | None:
    """The bearer token (from token_file when given)."""
    return Path(self.token_file).read_text().strip() if self.token_file else self.token

  def make_client(self, target: str | Sequence[str], options: Sequence[tuple[str, int | str]] = ()) -> TeacherClient:
    """A `distill_core.client.TeacherClient` for `target` with these options."""
    return TeacherClient(target, token=self.read_token(), tls=self.tls, root_certificates=self.root_certificates,
                         client_cert=self.client_cert, client_key=self.client_key,
                         server_name_override=self.server_name_override,
                         max_message_bytes=self.max_message_mb << 20, options=options)
