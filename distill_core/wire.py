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

import numpy as np

from distill_core.bitpack import WireError, bits_for, pack_uints, unpack_uints  # noqa: F401  (this module's API)
from distill_core.parts import BY_NAME, PARTS, Rows, by_part_name
from distill_core.proto import teacher_pb2 as pb
from distill_core.targets import TeacherTargets
from distill_core.tensor_codec import (  # noqa: F401  (part of this module's API)
    ECHO_CHARS, STATE_DTYPES, VALUE_DTYPES, decode_tensor, dtype_enum, dtype_name, echo, encode_tensor, le_bytes,
    numpy_dtype)


@by_part_name
@dataclasses.dataclass(frozen=True)
class OutputSpec:
  """What to return per position (see ``OutputSpec`` in teacher.proto); `parts`: the requests of the parts
  asked for, (part name, request) pairs (also given and read by the part's name: `OutputSpec(k=4, samples=...)`,
  `spec.samples`), each written into the proto by its part."""

  k: int
  temperatures: tuple[float, ...] = (1.0,)
  value_dtype: str = "float16"
  layers: tuple[int, ...] = ()
  states: tuple[str, ...] = ()
  state_dtype: str = "bfloat16"
  pack_ids: bool = False
  # Options of parts without fields of their own in the proto: ("<part>.<option>", array or scalar) pairs.
  part_options: tuple[tuple[str, object], ...] = ()
  parts: tuple[tuple[str, object], ...] = dataclasses.field(default=(), kw_only=True)

  def to_proto(self) -> pb.OutputSpec:
    spec = pb.OutputSpec(
        k=self.k, temperatures=list(self.temperatures), value_dtype=dtype_enum(self.value_dtype),
        layers=list(self.layers), states=list(self.states), state_dtype=dtype_enum(self.state_dtype),
        pack_ids=self.pack_ids)
    for name, request in self.parts:
      BY_NAME[name].write_request(request, spec)
    for key, value in self.part_options:
      spec.part_options[key].CopyFrom(encode_tensor(np.asarray(value)))
    return spec


def make_request(request_id: int, tokens: np.ndarray, spec: OutputSpec,
                 segment_ids: np.ndarray | None = None, positions: np.ndarray | None = None,
                 example_ids: np.ndarray | None = None,
                 part_inputs: dict[str, np.ndarray] | None = None) -> pb.ForwardRequest:
  """Builds a ``ForwardRequest``; arrays are sent as int32 [B, T], example ids as int64 [B], the inputs of parts
  without fields of their own as given (``"<part>.<input>"`` -> array)."""
  req = pb.ForwardRequest(request_id=request_id, spec=spec.to_proto())
  req.tokens.CopyFrom(encode_tensor(np.asarray(tokens, np.int32)))
  if segment_ids is not None:
    req.segment_ids.CopyFrom(encode_tensor(np.asarray(segment_ids, np.int32)))
  if positions is not None:
    req.positions.CopyFrom(encode_tensor(np.asarray(positions, np.int32)))
  if example_ids is not None:
    req.example_ids.CopyFrom(encode_tensor(np.asarray(example_ids, np.int64).reshape(-1)))
  for key, value in (part_inputs or {}).items():
    req.part_inputs[key].CopyFrom(encode_tensor(np.asarray(value)))
  for name, request in spec.parts:
    BY_NAME[name].check_request(request, example_ids=example_ids, part_inputs=part_inputs or {})
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
  """Encodes numpy ``TeacherTargets``, every part in turn (ids bit-packed when ``packed_id_bits`` > 0,
  top-k values delta-coded when ``sorted_delta_values``)."""
  resp = pb.ForwardResponse(request_id=request_id)
  for part in PARTS:
    value = targets.parts.get(part.name)
    if value is not None:
      part.encode(value, resp, packed_id_bits=packed_id_bits, sorted_delta_values=sorted_delta_values)
  return resp


def response_to_targets(resp: pb.ForwardResponse) -> TeacherTargets:
  """Decodes a successful response into numpy ``TeacherTargets`` (zero-copy, read-only arrays)."""
  topk, *others = PARTS
  fields = topk.decode(resp)
  ids = fields["topk_ids"]
  rows = Rows(batch_size=ids.shape[0], seq_len=ids.shape[1], k=ids.shape[2])
  for part in others:
    fields.update(part.decode(resp, rows))
  for key in resp.part_outputs:
    if key.split(".", 1)[0] not in BY_NAME:
      raise WireError(f"part_outputs[{echo(key)}]", "no registered target part of this name")
  return TeacherTargets(**fields)
