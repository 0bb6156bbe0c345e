"""Where the teacher replicas are and how the stream client reconnects and fails over.

Shared by the trainer's ``teacher.remote`` and the dump's ``remote``, so both
reach their replicas, retry and refuse changed weights the same way.
"""

from __future__ import annotations

from typing import Literal

import pydantic
from pydantic import Field

from distill_core.client_config import ClientSecurityConfig

ADDRESS_SCHEMES = ("dns", "unix", "ipv4", "ipv6")


class StreamClientConfig(ClientSecurityConfig):
  """Replicas of one teacher service, reached over reconnecting streams (TLS/token options inherited)."""

  address: str | list[str] = Field(
      "127.0.0.1:50051", description="Teacher server as host:port, a list of host:port replicas (one "
      "channel each, balanced by requests in flight), or a gRPC name such as dns:///teacher:50051 "
      "(resolved and balanced round-robin by gRPC; use streams_per_address > 1 to spread over its replicas).")
  request_timeout_s: float | None = Field(
      60.0, gt=0, description="A request unanswered this long marks its replica hung: the stream is "
      "dropped and its requests are re-sent elsewhere (null: never).")
  connect_timeout_s: float = Field(10.0, gt=0, description="Deadline of each attempt to open a stream and "
                                   "read the replica's info.")
  backoff_initial_s: float = Field(0.2, gt=0, description="First reconnect delay; doubles per failed attempt.")
  backoff_max_s: float = Field(10.0, gt=0, description="Largest reconnect delay (each delay is drawn from "
                               "50-100% of its cap).")
  streams_per_address: int = Field(1, ge=1, description="Streams opened per address (for a DNS name, "
                                   "about its replica count, so gRPC spreads them).")
  max_request_errors: int = Field(3, ge=1, description="Per-request server failures (e.g. engine errors) "
                                  "tolerated for one batch before the client stops with the error.")
  on_weights_change: Literal["stop", "drain"] = Field(
      "stop", description="A replica serves other weights than the run's (a rolling update): 'stop' ends "
      "the run with the error; 'drain' moves to the new weights at a batch boundary (replicas with the old "
      "weights get no more requests; every batch's answers come from one set of weights, never mixed).")
  stream_max_age_s: float | None = Field(
      600.0, gt=0, description="Reconnect a stream after this long (after its answers are in), so streams "
      "spread over replicas added since (pair with the server's max_connection_age_s for dns:/// names, "
      "which makes gRPC re-resolve); null: never.")
  allow_teacher_change: bool = Field(False, description="Resume from a checkpoint whose teacher stream came "
                                     "from different teacher weights (refused by default).")

  @pydantic.field_validator("address")
  @classmethod
  def _check_address(cls, value: str | list[str] | None) -> str | list[str] | None:
    if value is None:
      return value
    entries = [value] if isinstance(value, str) else list(value)
    if not entries:
      raise ValueError("give at least one address")
    for entry in entries:
      host, _, port = entry.rpartition(":")
      if not (host and port.isdigit()) and entry.split(":", 1)[0] not in ADDRESS_SCHEMES:
        raise ValueError(f"{entry!r} is not host:port or a gRPC target such as dns:///name:port")
    if len(set(entries)) != len(entries):
      raise ValueError(f"duplicate addresses in {entries}")
    return value

  @pydantic.model_validator(mode="after")
  def _check_stream(self) -> "StreamClientConfig":
    self.check_plaintext_token(self.addresses)
    if self.backoff_max_s < self.backoff_initial_s:
      raise ValueError(f"backoff_max_s ({self.backoff_max_s}) < backoff_initial_s ({self.backoff_initial_s})")
    return self

  @property
  def addresses(self) -> list[str]:
    """Every configured address ([] when none is set)."""
    if self.address is None:
      return []
    return [self.address] if isinstance(self.address, str) else list(self.address)
