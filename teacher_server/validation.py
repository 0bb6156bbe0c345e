"""Checks a ``ForwardRequest`` against the model and the limits; every error names its field.

Status codes: sizes over the limits (rows, tokens, sequence length) are
RESOURCE_EXHAUSTED; everything else that is wrong with a request (missing or
malformed tensors, wrong dtypes or shapes, ids outside the vocabulary, k, the
temperatures, unknown layers or state names, the requests and inputs of the other
teacher-target parts, checked by each part) is INVALID_ARGUMENT.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import grpc
import numpy as np

from distill_core import wire
from distill_core.parts import BY_NAME, PARTS, limit_values, ordered
from distill_core.parts.base import SpecError
from distill_core.proto import teacher_pb2 as pb
from teacher_server.config import LimitsConfig
from teacher_server.engine_api import EngineInfo, Fetch

_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
_VALUE_DTYPES = (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT32)
_STATE_DTYPES = (pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT32)


class RequestError(Exception):
  """A request that cannot be served: a gRPC status code, the field at fault and why."""

  def __init__(self, code: grpc.StatusCode, field: str, message: str):
    super().__init__(f"{field}: {message}" if field else message)
    self.code = code
    self.field = field


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A validated request, ready for the batcher."""

  request_id: int
  tokens: np.ndarray  # (B, T) int32
  segment_ids: np.ndarray  # (B, T) int32
  positions: np.ndarray  # (B, T) int32
  k: int
  temperatures: tuple[float, ...]
  value_dtype: np.dtype
  layers: tuple[int, ...]
  states: tuple[str, ...]
  state_dtype: np.dtype
  pack_ids: bool
  # (part name, request) of every other part asked for (`Part.parse_request`), in registry order
  parts: tuple[tuple[str, Any], ...] = ()
  inputs: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)  # part -> prepare_inputs

  @property
  def rows(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def length(self) -> int:
    return int(self.tokens.shape[1])

  @property
  def with_states(self) -> bool:
    return bool(self.layers)

  @property
  def fetch(self) -> Fetch:
    """What the engine must copy to the host for this request alone."""
    states = dict(layers=self.layers, states=self.states, state_dtype=self.state_dtype) if self.with_states else {}
    return Fetch(k=self.k, value_dtype=self.value_dtype, **states,
                 parts={name: BY_NAME[name].fetch_slots(request) for name, request in self.parts})

  @property
  def part_names(self) -> tuple[str, ...]:
    """The other parts asked for (one engine program per set of them)."""
    return tuple(name for name, _ in self.parts)

  def answer_bytes(self) -> int:
    """Approximate bytes per position of the other parts' answers."""
    return sum(BY_NAME[name].answer_bytes(request, self.value_dtype.name) for name, request in self.parts)


def default_positions(segment_ids: np.ndarray) -> np.ndarray:
  """Positions counted from 0 at the start of every run of equal segment ids."""
  t = segment_ids.shape[1]
  idx = np.broadcast_to(np.arange(t, dtype=np.int32), segment_ids.shape)
  starts = np.ones(segment_ids.shape, bool)
  starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
  return (idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)).astype(np.int32)


def _decode_int_matrix(msg: pb.Tensor, field: str, max_elements: int) -> np.ndarray:
  try:
    return wire.decode_tensor(msg, field, dtypes=(pb.DTYPE_INT32,), ndim=2, max_elements=max_elements)
  except wire.WireError as e:
    raise RequestError(_INVALID, e.field, e.detail) from None


def _check_range(values: np.ndarray, field: str, low: int, high: int, what: str) -> None:
  bad = (values < low) | (values >= high)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise RequestError(_INVALID, field, f"{what} {int(values[where])} at {list(where)} is outside "
                                        f"[{low}, {high})")


def _check_sizes(shape: tuple[int, ...], info: EngineInfo, limits: LimitsConfig) -> None:
  if len(shape) != 2:
    raise RequestError(_INVALID, "tokens", f"expected shape [B, T], got {wire.echo(shape)}")
  b, t = shape
  if b < 1 or t < 1:
    raise RequestError(_INVALID, "tokens", f"empty batch, shape {list(shape)}")
  if b > limits.max_batch:
    raise RequestError(_TOO_BIG, "tokens", f"batch {b} exceeds max_batch {limits.max_batch}")
  if t > info.max_seq_len:
    raise RequestError(_TOO_BIG, "tokens", f"length {t} exceeds the longest bucket ({info.max_seq_len})")
  if b * t > limits.max_tokens_per_request:
    raise RequestError(_TOO_BIG, "tokens", f"{b * t} tokens exceed max_tokens_per_request "
                                           f"{limits.max_tokens_per_request}")


def _check_spec(spec: pb.OutputSpec, info: EngineInfo) -> dict:
  max_k = min(info.max_k, info.vocab_size)
  if not 1 <= spec.k <= max_k:
    raise RequestError(_INVALID, "spec.k", f"k = {spec.k} must be in [1, {max_k}]")
  temps = tuple(float(x) for x in spec.temperatures) or (1.0,)
  if len(temps) > info.max_temperatures:
    raise RequestError(_INVALID, "spec.temperatures",
                       f"{len(temps)} temperatures exceed max_temperatures {info.max_temperatures}")
  for t in temps:
    if not (math.isfinite(t) and t > 0):
      raise RequestError(_INVALID, "spec.temperatures", f"temperature {t} must be finite and > 0")
  value_dtype = spec.value_dtype or pb.DTYPE_FLOAT16
  if value_dtype not in _VALUE_DTYPES:
    raise RequestError(_INVALID, "spec.value_dtype", f"{_enum_name(value_dtype)} is not one of "
                                                     "FLOAT16, BFLOAT16, FLOAT32")
  state_dtype = spec.state_dtype or pb.DTYPE_BFLOAT16
  if state_dtype not in _STATE_DTYPES:
    raise RequestError(_INVALID, "spec.state_dtype", f"{_enum_name(state_dtype)} is not one of "
                                                     "BFLOAT16, FLOAT32")
  layers = tuple(int(x) for x in spec.layers)
  states = tuple(spec.states)
  _check_choices(layers, info.selectable_layers, "spec.layers", "layer {} is not selectable")
  _check_choices(states, info.state_names, "spec.states", "unknown state {}")
  if states and not layers:
    raise RequestError(_INVALID, "spec.layers", "states requested without any layers")
  if layers and not states:
    if "attn_out" not in info.state_names:
      raise RequestError(_INVALID, "spec.states", "no states named and attn_out is not offered")
    states = ("attn_out",)
  return dict(k=int(spec.k), temperatures=temps, value_dtype=wire.numpy_dtype(value_dtype),
              layers=layers, states=states, state_dtype=wire.numpy_dtype(state_dtype),
              pack_ids=bool(spec.pack_ids))


def _check_parts(req: pb.ForwardRequest, info: EngineInfo, rows: int, length: int) -> dict:
  """Every other part's request (`Part.parse_request`) and inputs (`Part.prepare_inputs`); `part_options` and
  `part_inputs` keys that no part asked for takes are refused."""
  parts = []
  try:
    for part in PARTS:
      request = part.parse_request(req.spec, vocab_size=info.vocab_size, limits=info.part_limits,
                                   part_inputs=req.part_inputs)
      if request is not None:
        parts.append((part.name, request))
    asked = [BY_NAME[name] for name, _ in parts]
    _check_part_keys(req.spec.part_options, "spec.part_options", {p.key(n) for p in asked for n in p.option_names})
    _check_part_keys(req.part_inputs, "part_inputs", {p.key(n) for p in asked for n in p.input_names})
    inputs = {name: BY_NAME[name].prepare_inputs(req, request, rows=rows, length=length,
                                                 vocab_size=info.vocab_size, limits=info.part_limits)
              for name, request in parts}
  except SpecError as e:
    raise RequestError(_INVALID, e.field, e.message) from None
  return dict(parts=ordered(parts), inputs=inputs)


def _check_part_keys(entries, field: str, taken: set[str]) -> None:
  """Options and inputs of target parts without fields of their own: only those a part asked for takes."""
  for key in entries:
    if key not in taken:
      raise RequestError(_INVALID, f"{field}[{wire.echo(key)}]", "no target part this server runs takes it")


def _check_choices(values: tuple, allowed: tuple, field: str, unknown: str) -> None:
  for value in values:
    if value not in allowed:
      raise RequestError(_INVALID, field, f"{unknown.format(wire.echo(value))} (offered: {list(allowed)})")
  if len(set(values)) != len(values):
    raise RequestError(_INVALID, field, f"duplicate entries in {wire.echo(values)}")


def _enum_name(value: int) -> str:
  return pb.DType.Name(value).removeprefix("DTYPE_") if value in pb.DType.values() else str(value)


# Room in a request for everything but the three [B, T] tensors: spec, shapes, field tags, and
# wrong values (a long state name, many layers) that must still parse to be named in an error.
REQUEST_SLACK_BYTES = 64 << 10


def max_request_bytes(limits: LimitsConfig) -> int:
  """The largest request message accepted: tokens, segment_ids and positions (int32) at
  max_tokens_per_request, example_ids (int64) at max_batch, each part's inputs at the limits
  (`Part.request_bytes`), plus :data:`REQUEST_SLACK_BYTES`."""
  values = limit_values(limits)
  parts = sum(part.request_bytes(values, max_tokens=limits.max_tokens_per_request, max_batch=limits.max_batch)
              for part in PARTS if part.offered(values))
  return 3 * 4 * limits.max_tokens_per_request + 8 * limits.max_batch + parts + REQUEST_SLACK_BYTES


def prepare(req: pb.ForwardRequest, info: EngineInfo, limits: LimitsConfig) -> Prepared:
  """Validates ``req``; raises :class:`RequestError` naming the first field at fault."""
  if not req.HasField("tokens"):
    raise RequestError(_INVALID, "tokens", "required")
  _check_sizes(tuple(int(d) for d in req.tokens.shape), info, limits)
  cap = limits.max_tokens_per_request
  tokens = _decode_int_matrix(req.tokens, "tokens", cap)
  _check_range(tokens, "tokens", 0, info.vocab_size, "id")
  if req.HasField("segment_ids"):
    segment_ids = _decode_int_matrix(req.segment_ids, "segment_ids", cap)
    if segment_ids.shape != tokens.shape:
      raise RequestError(_INVALID, "segment_ids", f"shape {list(segment_ids.shape)} != tokens shape "
                                                  f"{list(tokens.shape)}")
    _check_range(segment_ids, "segment_ids", 0, 2**31 - 1, "segment id")
  else:
    segment_ids = np.ones(tokens.shape, np.int32)
  if req.HasField("positions"):
    positions = _decode_int_matrix(req.positions, "positions", cap)
    if positions.shape != tokens.shape:
      raise RequestError(_INVALID, "positions", f"shape {list(positions.shape)} != tokens shape "
                                                f"{list(tokens.shape)}")
    _check_range(positions, "positions", 0, info.max_position_embeddings, "position")
  else:
    positions = default_positions(segment_ids)
  spec = _check_spec(req.spec, info)
  parts = _check_parts(req, info, *tokens.shape)
  return Prepared(request_id=int(req.request_id), tokens=tokens, segment_ids=segment_ids,
                  positions=positions, **spec, **parts)
