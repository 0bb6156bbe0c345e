"""Configuration of ``python -m teacher_server.dump`` (YAML + ``key=value`` overrides)."""

from __future__ import annotations

from typing import Any, Literal

import pydantic
from pydantic import Field

from distill_core import wire
from distill_core.config import ConfigBase
from distill_core.parts import PARTS, ordered
from distill_core.stream.config import StreamClientConfig
from distill_core.targets import STATE_NAMES
from teacher_server.config import ServerConfig


class RemoteConfig(StreamClientConfig):
  """Running teacher server replicas to ask instead of loading the teacher in this process, through the
  trainer's stream client: the same addresses, failover, reconnect and TLS/token options as teacher.remote."""

  address: str | list[str] | None = Field(
      None, description="host:port, a list of host:port replicas, or a gRPC name (dns:///name:port) of the "
      "teacher server; requests are spread over the replicas and fail over between them; null = run the "
      "teacher in this process (see `teacher`).")
  timeout_s: float = Field(120.0, gt=0, description="How long the dump waits without any answer (no replica "
                           "reachable yet, or every one down or silent) before it stops with the error.")

  @pydantic.model_validator(mode="after")
  def _check_dump(self) -> "RemoteConfig":
    if self.on_weights_change != "stop":
      raise ValueError(f"on_weights_change: {self.on_weights_change!r}; a dump stores one teacher's answers, "
                       "so a replica with other weights stops it ('stop')")
    return self


class _DumpConfig(ConfigBase):
  """Dump a teacher's answers for a prepared dataset into shards (docs/offline.md); the options of the other
  teacher-target parts stored are the parts' own fields (`Part.config_fields`)."""

  data: str = Field("data/stdlib", description="Prepared dataset directory (has manifest.json).")
  splits: list[str] = Field(["train", "eval"], min_length=1, description="Splits to answer (every example).")
  max_examples: int | None = Field(None, ge=1, description="Answer only the first N examples of each split "
                                   "(trials and benchmarks; null = all).")
  output: str = Field("runs/answers", description="Answers directory (local path or an etils.epath URL "
                      "such as gs://bucket/answers); an interrupted dump into it resumes.")
  k: int = Field(64, ge=1, description="Top-k entries stored per position (students may use any k up to it).")
  temperatures: list[float] = Field([1.0], min_length=1, description="Temperatures whose logsumexp is "
                                    "stored (students must train at one of them exactly).")
  value_dtype: Literal["float16", "bfloat16", "float32"] = Field(
      "float16", description="dtype of the top-k values (f16 recommended).")
  layers: list[int] = Field([], description="Teacher layers whose states are stored ([] = none).")
  states: list[Literal["attn_in", "attn_out"]] = Field(
      [], description=f"State names stored for `layers` ({', '.join(STATE_NAMES)}; [] with layers = attn_out).")
  state_dtype: Literal["float32", "bfloat16"] = Field("bfloat16", description="dtype of stored layer states "
                                                      "(float32 doubles their bytes).")
  pack_ids: bool = Field(True, description="Bit-pack the top-k ids in the fewest bits the vocabulary needs.")
  value_coding: Literal["sorted_delta", "raw"] = Field(
      "sorted_delta", description="'sorted_delta': code the sorted values as packed differences of their "
      "bit patterns (lossless, smaller); 'raw': plain little-endian values.")
  zstd_level: int = Field(0, ge=0, le=22, description="zstd level applied to every record (0 = off).")
  rows_per_request: int = Field(8, ge=1, description="Examples per teacher request.")
  window: int = Field(4, ge=1, description="Requests in flight to the teacher.")
  records_per_shard: int = Field(1024, ge=1, description="Examples per shard file (a multiple of "
                                 "rows_per_request keeps the batches identical when a dump resumes).")
  queue_size: int = Field(8, ge=1, description="Answers buffered between the teacher, the encoder thread "
                          "and the writer thread (bounds memory; the teacher waits only when both are full).")
  process_index: int | None = Field(None, ge=0, description="This writer's index (null = jax.process_index()).")
  process_count: int | None = Field(None, ge=1, description="Number of writers (null = jax.process_count()); "
                                    "writer i answers the i-th contiguous block of example ids.")
  verify_data: bool = Field(True, description="Check the prepared dataset's shard hashes first.")
  progress: bool = Field(True, description="Progress bar (timestamped log lines when not a terminal).")
  teacher: ServerConfig = Field(default_factory=ServerConfig, description="In-process teacher: model, "
                                "tokenizer_path, mesh, limits and batcher as for the server (buckets default "
                                "to [[rows_per_request, seq_len]]); ignored with remote.address.")
  remote: RemoteConfig = Field(default_factory=RemoteConfig, description="Ask a running teacher server.")

  @pydantic.model_validator(mode="after")
  def _check(self) -> "DumpConfig":
    if self.process_index is not None and self.process_count is not None and \
        self.process_index >= self.process_count:
      raise ValueError(f"process_index {self.process_index} must be < process_count {self.process_count}")
    if any(t <= 0 for t in self.temperatures) or len(set(self.temperatures)) != len(self.temperatures):
      raise ValueError(f"temperatures {self.temperatures} must be distinct and > 0")
    if self.states and not self.layers:
      raise ValueError("states given without layers")
    return self

  @property
  def parts(self) -> tuple[tuple[str, Any], ...]:
    """(part name, request) of the other parts stored (`Part.request_from_config`)."""
    return ordered((part.name, part.request_from_config(self, k=self.k)) for part in PARTS)

  def output_spec(self) -> wire.OutputSpec:
    """What every request asks for (and every record stores)."""
    return wire.OutputSpec(k=self.k, temperatures=tuple(self.temperatures), value_dtype=self.value_dtype,
                           layers=tuple(self.layers), states=tuple(self.states), state_dtype=self.state_dtype,
                           pack_ids=self.pack_ids, parts=self.parts)


DumpConfig = pydantic.create_model(
    "DumpConfig", __base__=_DumpConfig, __module__=__name__,
    **{name: field for part in PARTS for name, field in part.config_fields.items()})
