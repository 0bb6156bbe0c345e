"""Teacher server configuration (YAML + ``key=value`` overrides; ``--help`` lists every field)."""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import Field

from distill_core.addresses import PLAINTEXT_TOKEN_RULE, is_loopback_host
from distill_core.config import ConfigBase
from distill_core.parts import PARTS
from distill_core.sharding import MeshConfig
from distill_core.targets import STATE_NAMES

MIN_CHUNK_BYTES = 64 << 10  # smallest GetParameters chunk a client may ask for (0 = the server default)


class ModelSourceConfig(ConfigBase):
  """Where the teacher's weights come from."""

  source: Literal["preset", "hf", "orbax"] = Field(
      "preset", description="'hf': a Hugging Face checkpoint folder (config.json + safetensors); "
      "'orbax': an Orbax model folder (model_config.json + state/), or a bare Orbax checkpoint of "
      "nnx.state(model) restored into the architecture of an explicitly given `preset`; "
      "'preset': random weights from `preset` and `seed` (tests and benchmarks).")
  preset: str | None = Field(
      "tiny", description="Model preset name in configs/models/ (or a YAML path) for 'preset' (and "
      "'orbax' without model_config.json).")
  path: str | None = Field(None, description="Checkpoint folder for 'hf' and 'orbax'.")
  seed: int = Field(0, description="Initialisation seed for 'preset'.")
  overrides: dict[str, Any] = Field(
      default_factory=dict, description="ModelConfig fields to override, e.g. {dtype: bfloat16, scan_layers: true}.")

  @pydantic.model_validator(mode="after")
  def _check(self) -> "ModelSourceConfig":
    if self.source in ("hf", "orbax") and not self.path:
      raise ValueError(f"model.path is required when model.source is {self.source!r}")
    if self.source == "preset" and not self.preset:
      raise ValueError("model.preset is required when model.source is 'preset'")
    return self


class _LimitsConfig(ConfigBase):
  """Per-request limits; requests over them get INVALID_ARGUMENT or RESOURCE_EXHAUSTED. The limits of the
  other teacher-target parts are the parts' own (`Part.limits`)."""

  max_k: int = Field(128, gt=0, description="Largest top-k; the engine always computes this many.")
  max_batch: int = Field(64, gt=0, description="Most rows (B) in one request.")
  max_tokens_per_request: int = Field(65536, gt=0, description="Most tokens (B * T) in one request.")
  max_temperatures: int = Field(2, gt=0, description="Most temperatures in one request (each costs one "
                                "pass over the vocabulary for every position, requested or not).")
  selectable_layers: list[int] | Literal["all"] = Field(
      "all", description="Layers whose states may be requested. Only the layers a batch asks for are "
      "copied off the device, but a batch with states keeps all of these in device memory while it runs, so "
      "list the layers your students use; [] disables states.")
  state_names: list[Literal["attn_in", "attn_out"]] = Field(
      list(STATE_NAMES), description="State names offered (attn_in: attention input after the norm; "
      "attn_out: attention output after o_proj).")


LimitsConfig = pydantic.create_model(
    "LimitsConfig", __base__=_LimitsConfig, __module__=__name__,
    **{name: (int, Field(default, ge=0, description=description))
       for part in PARTS for name, (default, description) in part.limits.items()})


class BatcherConfig(ConfigBase):
  """Request batching and backpressure."""

  buckets: list[tuple[int, int]] = Field(
      [(8, 128), (8, 256)], description="Compiled (batch, length) shapes; a request goes to the "
      "shortest length >= its T, rows of many requests share a batch. The longest must not exceed the "
      "model's max_position_embeddings (the default model, preset tiny, has 256).")
  max_wait_ms: float = Field(5.0, ge=0, description="Flush a partly filled batch after this long.")
  queue_size: int = Field(256, gt=0, description="Requests waiting for the batcher, over all streams. "
                          "When full, streams stop reading and unary calls get RESOURCE_EXHAUSTED.")
  max_inflight_batches: int = Field(2, gt=0, description="Batches handed to the engine but not yet answered.")
  stream_window: int = Field(64, gt=0, description="Requests one stream may have unanswered before the "
                             "server stops reading it.")
  stream_window_bytes: int = Field(
      64 << 20, gt=0, description="Estimated answer bytes one stream may hold (requested, being computed "
      "or waiting for a slow reader) before the server stops reading it; one request is always admitted.")

  @pydantic.field_validator("buckets")
  @classmethod
  def _check_buckets(cls, buckets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    if not buckets:
      raise ValueError("at least one bucket is required")
    for b, t in buckets:
      if b <= 0 or t <= 0:
        raise ValueError(f"bucket ({b}, {t}) must have positive batch and length")
    if len(set(buckets)) != len(buckets):
      raise ValueError(f"duplicate buckets in {buckets}")
    return sorted(buckets, key=lambda bt: (bt[1], bt[0]))


class SecurityConfig(ConfigBase):
  """TLS, mutual TLS and bearer-token authentication (all off by default)."""

  tls_cert: str | None = Field(None, description="PEM server certificate chain; enables TLS.")
  tls_key: str | None = Field(None, description="PEM private key of tls_cert.")
  client_ca: str | None = Field(None, description="PEM CA bundle that client certificates must chain to.")
  require_client_cert: bool = Field(False, description="Mutual TLS: refuse clients without a valid certificate.")
  auth_token: str | None = Field(None, description="Bearer token clients must send as "
                                 "'authorization: Bearer <token>' (prefer auth_token_file).")
  auth_token_file: str | None = Field(None, description="File holding the bearer token (one line).")
  parameters_token: str | None = Field(
      None, description="A second bearer token that alone may call GetParameters (the teacher's weights); "
      "it also works for every other call. Needs serve_parameters. Prefer parameters_token_file.")
  parameters_token_file: str | None = Field(None, description="File holding parameters_token (one line).")
  authenticate_health: bool = Field(False, description="Also require the token for grpc.health.v1 "
                                    "(off so orchestrator probes work without secrets).")

  @pydantic.model_validator(mode="after")
  def _check(self) -> "SecurityConfig":
    if bool(self.tls_cert) != bool(self.tls_key):
      raise ValueError("security.tls_cert and security.tls_key must be given together")
    if (self.client_ca or self.require_client_cert) and not self.tls_cert:
      raise ValueError("security.client_ca / require_client_cert need TLS (tls_cert and tls_key)")
    if self.require_client_cert and not self.client_ca:
      raise ValueError("security.require_client_cert needs security.client_ca")
    if self.auth_token and self.auth_token_file:
      raise ValueError("give security.auth_token or security.auth_token_file, not both")
    if self.parameters_token and self.parameters_token_file:
      raise ValueError("give security.parameters_token or security.parameters_token_file, not both")
    return self


class ServerConfig(ConfigBase):
  """The teacher server."""

  address: str = Field("127.0.0.1:50051", description="host:port to listen on (use 0.0.0.0:PORT or "
                       "[::]:PORT explicitly to accept remote clients).")
  model: ModelSourceConfig = Field(default_factory=ModelSourceConfig, description="Teacher weights.")
  tokenizer_path: str | None = Field(None, description="Tokenizer file hashed into the tokenizer "
                                     "fingerprint (default: tokenizer.json in an 'hf' model folder).")
  mesh: MeshConfig = Field(default_factory=MeshConfig, description="Devices of the teacher: data "
                           "parallel over `data`, parameters sharded over `fsdp`. Bucket batches must "
                           "divide by data * fsdp.")
  limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Per-request limits.")
  batcher: BatcherConfig = Field(default_factory=BatcherConfig, description="Batching and backpressure.")
  logits_chunk_size: int = Field(512, ge=0, description="Positions per block of the engine's lm_head, top-k, "
                                 "logsumexp and sample draws (docs/teacher_server.md, 'Engine chunking'): "
                                 "the logits temporaries are O(bucket batch x this x vocabulary) instead of "
                                 "O(bucket batch x length x vocabulary); answers do not change. 0: whole rows.")
  security: SecurityConfig = Field(default_factory=SecurityConfig, description="TLS and authentication.")
  max_message_bytes: int = Field(256 << 20, gt=0, description="Largest answer (gRPC message sent). The "
                                 "largest request accepted is derived from the limits (GetInfo "
                                 "limits.max_request_bytes).")
  max_concurrent_rpcs: int = Field(256, gt=0, description="Teacher calls (streams included) open at once; "
                                   "more get RESOURCE_EXHAUSTED. Health checks and reflection have 16 more.")
  max_streams_per_connection: int = Field(
      32, gt=0, description="Teacher calls (HTTP/2 streams) one client connection may have open at once; "
      "more get RESOURCE_EXHAUSTED.")
  serve_parameters: bool = Field(
      False, description="Answer GetParameters, which hands out the teacher's weights to every caller "
      "that passes authentication (see security.parameters_token to require a separate token). Off: "
      "GetParameters is UNIMPLEMENTED.")
  parameter_chunk_bytes: int = Field(4 << 20, ge=MIN_CHUNK_BYTES, description="Default chunk size of "
                                     f"GetParameters (requests may ask for 0 = this, or >= {MIN_CHUNK_BYTES}).")
  shutdown_grace_s: float = Field(30.0, ge=0, description="On SIGTERM, time given to open calls to finish.")
  replica_id: str | None = Field(
      None, max_length=128, description="Name of this server process in every answer and GetInfo (e.g. "
      "the pod name); null: host name, process id and a random suffix. Must be unique per process.")
  max_connection_age_s: float | None = Field(
      None, gt=0, description="Close client connections after this long (gRPC GOAWAY, after "
      "shutdown_grace_s for open calls), so clients of a dns:/// name re-resolve it and spread over "
      "replicas added since; null: never.")
  metrics_address: str | None = Field(None, description="host:port of the Prometheus /metrics endpoint; "
                                      "null disables it.")
  health_address: str | None = Field(
      None, description="host:port of a second, plaintext listener that serves only grpc.health.v1, for "
      "orchestrator probes when the main address uses TLS (Kubernetes' gRPC probe speaks no TLS); "
      "null: health is on the main address only.")
  log_format: Literal["text", "json"] = Field("text", description="Log lines as text or JSON objects.")
  log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")

  @pydantic.model_validator(mode="after")
  def _check(self) -> "ServerConfig":
    split_address(self.address, "address")
    if (self.security.parameters_token or self.security.parameters_token_file) and not self.serve_parameters:
      raise ValueError("security.parameters_token(_file) needs serve_parameters: true")
    if self.metrics_address is not None:
      split_address(self.metrics_address, "metrics_address")
    if self.health_address is not None and split_address(self.health_address, "health_address") == \
        split_address(self.address, "address"):
      raise ValueError(f"health_address {self.health_address} must differ from address")
    sec = self.security
    tokens = sec.auth_token or sec.auth_token_file or sec.parameters_token or sec.parameters_token_file
    if tokens and not sec.tls_cert and not is_loopback_host(split_address(self.address, "address")[0]):
      raise ValueError(f"address {self.address} with a token and no security.tls_cert: {PLAINTEXT_TOKEN_RULE}")
    return self


def split_address(address: str, field: str) -> tuple[str, int]:
  """``"127.0.0.1:50051"`` / ``"[::1]:50051"`` -> (host, port); a clear error otherwise."""
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
    raise ValueError(f"{field} {address!r} must be host:port with an explicit host, e.g. 127.0.0.1:50051")
  return host.strip("[]"), int(port)
