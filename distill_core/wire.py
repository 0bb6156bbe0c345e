"""Wire codec: numpy arrays <-> ``Tensor`` messages, requests and responses <-> ``TeacherTargets``.

Tensors travel as raw little-endian bytes plus a dtype and a shape. Decoding is
zero-copy over the message's bytes (``np.frombuffer``), so decoded arrays are
read-only views. Every check names the field at fault, so a server can turn a
:class:`WireError` straight into an INVALID_ARGUMENT status. Integer tensors may
be bit-packed losslessly (``Tensor.packed_bits``; 17 bits per id for vocabularies
up to 131072), and sorted top-k values may be delta-coded losslessly
(``Tensor.coding = TENSOR_CODING_SORTED_DELTA``, see ``sorted_delta.py``). The
offline shards store the same messages, so one codec serves the wire and the disk.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import ml_dtypes
import numpy as np

from distill_core import sorted_delta
from distill_core.bitpack import WireError, bits_for, pack_uints, unpack_uints  # part of this module's API
from distill_core.proto import teacher_pb2 as pb
from distill_core.targets import SampleRequest, TeacherTargets

_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_UINT8: np.dtype("u1"),
}
_NAMES = {
    "int32": pb.DTYPE_INT32, "int64": pb.DTYPE_INT64, "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16, "uint8": pb.DTYPE_UINT8,
    "f32": pb.DTYPE_FLOAT32, "f16": pb.DTYPE_FLOAT16, "bf16": pb.DTYPE_BFLOAT16,
}
VALUE_DTYPES = ("float16", "bfloat16", "float32")
STATE_DTYPES = ("bfloat16", "float32")


# Longest rendering of a client-supplied value in an error message (see :func:`echo`).
ECHO_CHARS = 80


def echo(value, limit: int = ECHO_CHARS) -> str:
  """A client-supplied value for an error message: its repr, cut to ``limit`` characters.

  Error texts travel in gRPC trailers (16 KiB in total): a 30,000-character state name or
  ``layers=[0] * 6000`` echoed whole would replace the error with a transport failure.
  Lists and tuples are shown as lists; a cut value says how long it was.
  """
  seq = isinstance(value, (list, tuple))
  text = repr(list(value)) if seq else repr(value)
  if len(text) <= limit:
    return text
  size = f"{len(value)} items" if seq else f"{len(value)} characters" if isinstance(value, (str, bytes)) else \
      f"{len(text)} characters"
  return f"{text[:limit]}... ({size})"


def dtype_enum(dtype: str | np.dtype | type) -> int:
  """``"float16"``/``"f16"``/``np.float16``/``ml_dtypes.bfloat16`` -> the ``DType`` enum value."""
  if isinstance(dtype, str) and dtype in _NAMES:
    return _NAMES[dtype]
  try:
    name = np.dtype(dtype).name
  except TypeError:
    name = None
  if name not in _NAMES:
    raise ValueError(f"unsupported dtype {dtype!r} (supported: {', '.join(sorted(_NAMES))})")
  return _NAMES[name]


def dtype_name(enum: int) -> str:
  """The numpy name of a ``DType`` enum value (``DTYPE_FLOAT16`` -> ``"float16"``)."""
  if enum not in _DTYPES:
    raise ValueError(f"unknown DType enum value {enum}")
  return _DTYPES[enum].name


def numpy_dtype(enum: int, field: str = "dtype") -> np.dtype:
  if enum not in _DTYPES:
    raise WireError(field, f"unsupported dtype {pb.DType.Name(enum) if enum in pb.DType.values() else enum}")
  return _DTYPES[enum]


def le_bytes(array: np.ndarray) -> bytes:
  """The array's elements as contiguous little-endian bytes, C order."""
  array = np.asarray(array)
  return np.ascontiguousarray(array, dtype=_DTYPES[dtype_enum(array.dtype)]).tobytes()


def encode_tensor(array: np.ndarray, *, packed_bits: int = 0, sorted_delta_coding: bool = False) -> pb.Tensor:
  """A numpy array as a ``Tensor`` (little-endian bytes; integers bit-packed if asked).

  ``sorted_delta_coding``: delta-code the rows of a float tensor whose rows are sorted
  descending and <= 0 (``sorted_delta.py``); any other tensor is stored raw.
  """
  array = np.asarray(array)
  enum = dtype_enum(array.dtype)
  msg = pb.Tensor(dtype=enum, shape=array.shape)
  if sorted_delta_coding and sorted_delta.applicable(array):
    msg.coding = pb.TENSOR_CODING_SORTED_DELTA
    msg.data = sorted_delta.encode(array)
  elif packed_bits:
    if array.dtype.kind not in "iu":
      raise ValueError(f"only integer tensors can be packed, got {array.dtype}")
    if array.size and int(array.min()) < 0:
      raise ValueError("packed tensors must be non-negative")
    msg.packed_bits = packed_bits
    msg.data = pack_uints(array, packed_bits)
  else:
    msg.data = le_bytes(array)
  return msg


def decode_tensor(msg: pb.Tensor, field: str, *, dtypes: Sequence[int] | None = None,
                  ndim: int | None = None, max_elements: int | None = None) -> np.ndarray:
  """A ``Tensor`` as a read-only numpy view of its bytes, after checking dtype, shape and size.

  Args:
    msg: the message.
    field: the request/response field name used in error messages.
    dtypes: allowed ``DType`` values (None = any supported).
    ndim: required rank (None = any).
    max_elements: refuse tensors with more elements (checked before touching the bytes).
  """
  if dtypes is not None and msg.dtype not in dtypes:
    allowed = ", ".join(dtype_name(d) for d in dtypes)
    got = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else str(msg.dtype)
    raise WireError(field, f"dtype {got} not allowed (expected {allowed})")
  dtype = numpy_dtype(msg.dtype, f"{field}.dtype")
  shape = tuple(int(d) for d in msg.shape)
  if ndim is not None and len(shape) != ndim:
    raise WireError(field, f"expected {ndim} dimensions, got shape {echo(shape)}")
  if any(d < 0 for d in shape):
    raise WireError(field, f"negative dimension in shape {echo(shape)}")
  count = math.prod(shape)
  if max_elements is not None and count > max_elements:
    raise WireError(field, f"{count} elements exceed the limit of {max_elements}")
  if msg.coding == pb.TENSOR_CODING_SORTED_DELTA:
    if msg.packed_bits:
      raise WireError(f"{field}.packed_bits", "not allowed with sorted-delta coding")
    return sorted_delta.decode(msg.data, dtype, shape, field)
  if msg.coding != pb.TENSOR_CODING_RAW:
    raise WireError(f"{field}.coding", f"unknown tensor coding {msg.coding}")
  if msg.packed_bits:
    if dtype.kind not in "iu":
      raise WireError(f"{field}.packed_bits", f"only integer tensors can be packed, not {dtype.name}")
    return unpack_uints(msg.data, msg.packed_bits, count, field).astype(dtype, copy=False).reshape(shape)
  want = count * dtype.itemsize
  if len(msg.data) != want:
    raise WireError(field, f"{len(msg.data)} bytes do not match shape {echo(shape)} of "
                           f"{dtype.name} ({want} bytes)")
  return np.frombuffer(msg.data, dtype=dtype, count=count).reshape(shape)


@dataclasses.dataclass(frozen=True)
class OutputSpec:
  """What to return per position (see ``OutputSpec`` in teacher.proto)."""

  k: int
  temperatures: tuple[float, ...] = (1.0,)
  value_dtype: str = "float16"
  layers: tuple[int, ...] = ()
  states: tuple[str, ...] = ()
  state_dtype: str = "bfloat16"
  pack_ids: bool = False
  samples: SampleRequest | None = None  # sampled targets; `exclude` > 0 asks for sample_tail (= k)

  def to_proto(self) -> pb.OutputSpec:
    spec = pb.OutputSpec(
        k=self.k, temperatures=list(self.temperatures), value_dtype=dtype_enum(self.value_dtype),
        layers=list(self.layers), states=list(self.states), state_dtype=dtype_enum(self.state_dtype),
        pack_ids=self.pack_ids)
    if self.samples is not None:
      if self.samples.exclude not in (0, self.k):
        raise ValueError(f"samples.exclude: {self.samples.exclude} must be 0 or k={self.k} on the wire")
      spec.num_samples = self.samples.num_samples
      spec.sample_temperature = self.samples.temperature
      spec.sample_seed = self.samples.seed
      spec.sample_tail = self.samples.exclude > 0
    return spec


def make_request(request_id: int, tokens: np.ndarray, spec: OutputSpec,
                 segment_ids: np.ndarray | None = None, positions: np.ndarray | None = None,
                 example_ids: np.ndarray | None = None) -> pb.ForwardRequest:
  """Builds a ``ForwardRequest``; arrays are sent as int32 [B, T], example ids as int64 [B]."""
  req = pb.ForwardRequest(request_id=request_id, spec=spec.to_proto())
  req.tokens.CopyFrom(encode_tensor(np.asarray(tokens, np.int32)))
  if segment_ids is not None:
    req.segment_ids.CopyFrom(encode_tensor(np.asarray(segment_ids, np.int32)))
  if positions is not None:
    req.positions.CopyFrom(encode_tensor(np.asarray(positions, np.int32)))
  if example_ids is not None:
    req.example_ids.CopyFrom(encode_tensor(np.asarray(example_ids, np.int64).reshape(-1)))
  if spec.samples is not None and example_ids is None:
    raise ValueError("example_ids: required with sampled targets (they key the draws)")
  return req


# Initial metadata of every Stream call (see GetInfoResponse in the proto).
INFO_METADATA_KEY = "x-teacher-info-bin"
READY_METADATA_KEY = "x-teacher-ready"


def stream_info(metadata) -> tuple[pb.GetInfoResponse | None, bool]:
  """(GetInfo of the replica serving a stream, whether it is warm) from the stream's initial metadata."""
  info, ready = None, False
  for key, value in metadata or ():
    if key == INFO_METADATA_KEY:
      info = pb.GetInfoResponse.FromString(value)
    elif key == READY_METADATA_KEY:
      ready = value == "1"
  return info, ready


def error_response(request_id: int, code: int, message: str, field: str = "") -> pb.ForwardResponse:
  return pb.ForwardResponse(request_id=request_id,
                            error=pb.Error(code=int(code), message=message, field=field))


def targets_to_response(request_id: int, targets: TeacherTargets, *, packed_id_bits: int = 0,
                        sorted_delta_values: bool = False) -> pb.ForwardResponse:
  """Encodes numpy ``TeacherTargets`` (ids bit-packed when ``packed_id_bits`` > 0, top-k values
  delta-coded when ``sorted_delta_values``)."""
  resp = pb.ForwardResponse(request_id=request_id, temperatures=list(targets.temperatures),
                            state_layers=list(targets.state_layers))
  resp.topk_ids.CopyFrom(encode_tensor(np.asarray(targets.topk_ids, np.int32), packed_bits=packed_id_bits))
  resp.topk_logits.CopyFrom(encode_tensor(targets.topk_logits, sorted_delta_coding=sorted_delta_values))
  resp.logsumexp.CopyFrom(encode_tensor(np.asarray(targets.logsumexp, np.float32)))
  for name, value in targets.layer_states.items():
    resp.layer_states[name].CopyFrom(encode_tensor(value))
  if targets.has_samples:
    _encode_samples(resp, targets, packed_id_bits)
  return resp


def _encode_samples(resp: pb.ForwardResponse, targets: TeacherTargets, packed_id_bits: int) -> None:
  """Counts as [B, T, S]; ids and logits of the non-empty slots only, flat (see teacher.proto)."""
  counts = np.asarray(targets.sample_counts, np.int32)
  used = counts > 0
  count_bits = bits_for(int(counts.max()) + 1) if packed_id_bits and counts.size else 0
  resp.sample_counts.CopyFrom(encode_tensor(counts, packed_bits=count_bits))
  resp.sample_ids.CopyFrom(encode_tensor(np.asarray(targets.sample_ids, np.int32)[used],
                                         packed_bits=packed_id_bits))
  resp.sample_logits.CopyFrom(encode_tensor(np.asarray(targets.sample_logits)[used]))
  resp.sample_logsumexp.CopyFrom(encode_tensor(np.asarray(targets.sample_logsumexp, np.float32)))
  resp.sample_temperature = float(np.asarray(targets.sample_temperature))
  resp.sample_skip = int(targets.sample_skip)


def _decode_samples(resp: pb.ForwardResponse, bt: tuple[int, int]) -> dict:
  if not resp.HasField("sample_counts"):
    return {}
  counts = decode_tensor(resp.sample_counts, "sample_counts", dtypes=(pb.DTYPE_INT32,), ndim=3)
  if counts.shape[:2] != bt:
    raise WireError("sample_counts", f"shape {list(counts.shape)} does not match [B, T, slots] with "
                                     f"[B, T] = {list(bt)}")
  if counts.size and int(counts.min()) < 0:
    raise WireError("sample_counts", "negative count")
  used = counts > 0
  n = int(used.sum())
  flat_ids = decode_tensor(resp.sample_ids, "sample_ids", dtypes=(pb.DTYPE_INT32,), ndim=1)
  flat_logits = decode_tensor(resp.sample_logits, "sample_logits",
                              dtypes=(pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT32), ndim=1)
  for field, flat in (("sample_ids", flat_ids), ("sample_logits", flat_logits)):
    if flat.shape[0] != n:
      raise WireError(field, f"{flat.shape[0]} entries for {n} non-empty sample slots")
  ids = np.zeros(counts.shape, np.int32)
  ids[used] = flat_ids
  logits = np.zeros(counts.shape, flat_logits.dtype)
  logits[used] = flat_logits
  lse = decode_tensor(resp.sample_logsumexp, "sample_logsumexp", dtypes=(pb.DTYPE_FLOAT32,), ndim=2)
  if lse.shape != bt:
    raise WireError("sample_logsumexp", f"shape {list(lse.shape)} != [B, T] = {list(bt)}")
  if not (math.isfinite(resp.sample_temperature) and resp.sample_temperature > 0):
    raise WireError("sample_temperature", f"{resp.sample_temperature} must be finite and > 0")
  return dict(sample_ids=ids, sample_counts=np.asarray(counts, np.int32), sample_logits=logits,
              sample_logsumexp=lse, sample_temperature=resp.sample_temperature, sample_skip=resp.sample_skip)


def response_to_targets(resp: pb.ForwardResponse) -> TeacherTargets:
  """Decodes a successful response into numpy ``TeacherTargets`` (zero-copy, read-only arrays)."""
  ints = (pb.DTYPE_INT32,)
  floats = (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT32)
  ids = decode_tensor(resp.topk_ids, "topk_ids", dtypes=ints, ndim=3)
  logits = decode_tensor(resp.topk_logits, "topk_logits", dtypes=floats, ndim=3)
  if logits.shape != ids.shape:
    raise WireError("topk_logits", f"shape {list(logits.shape)} != topk_ids shape {list(ids.shape)}")
  lse = decode_tensor(resp.logsumexp, "logsumexp", dtypes=(pb.DTYPE_FLOAT32,), ndim=3)
  temps = tuple(float(t) for t in resp.temperatures)
  if lse.shape != ids.shape[:2] + (len(temps),):
    raise WireError("logsumexp", f"shape {list(lse.shape)} does not match [B, T, {len(temps)} temperatures]")
  layers = tuple(int(layer) for layer in resp.state_layers)
  states = {}
  for name in sorted(resp.layer_states):
    value = decode_tensor(resp.layer_states[name], f"layer_states[{name}]", dtypes=floats, ndim=4)
    if value.shape[:3] != (len(layers),) + ids.shape[:2]:
      raise WireError(f"layer_states[{name}]", f"shape {list(value.shape)} does not match "
                                               f"[{len(layers)} layers, B, T, E]")
    states[name] = value
  if layers and not states:
    raise WireError("layer_states", f"state_layers {list(layers)} given without any states")
  samples = _decode_samples(resp, ids.shape[:2])
  if samples and not 0 <= samples["sample_skip"] <= ids.shape[2]:
    raise WireError("sample_skip", f"{samples['sample_skip']} not in [0, k={ids.shape[2]}]")
  return TeacherTargets(topk_ids=ids, topk_logits=logits, logsumexp=lse, temperatures=temps,
                        layer_states=states, state_layers=layers if states else (), **samples)

