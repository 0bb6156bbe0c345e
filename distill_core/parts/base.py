"""What every teacher-target part provides (`Part`), and the helpers parts share.

A part is one kind of teacher answer: its arrays (a `flax.struct` dataclass, the
part's *value*, whose attribute names are the flat field names `TeacherTargets`
exposes), how it is computed on the device, how it travels on the wire and in
shards (a `ForwardResponse`), how its rows are sliced and joined, how it is
checked, and what it needs from a teacher. `distill_core.parts` registers the
parts; everything else iterates over them. docs/targets.md walks through one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax.numpy as jnp
import numpy as np

from distill_core.proto import teacher_pb2 as pb
from distill_core.tensor_codec import decode_tensor, encode_tensor

Array = Any  # jax.Array or np.ndarray (host side)

VALUE_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
FLOAT_DTYPES = tuple(np.dtype(d) for d in VALUE_DTYPES.values())
INT32 = (np.dtype(np.int32),)
FLOAT32 = (np.dtype(np.float32),)
WIRE_FLOATS = (pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT32)


def value_dtype_of(name: str | np.dtype) -> np.dtype:
  """`"float16"` / `"bfloat16"` / `"float32"` (or such a dtype) -> the dtype; else ValueError."""
  key = np.dtype(name).name if not isinstance(name, str) else name
  if key not in VALUE_DTYPES:
    raise ValueError(f"value_dtype: {name!r} not in {', '.join(VALUE_DTYPES)}")
  return np.dtype(VALUE_DTYPES[key])


def check_array(value: Array, field: str, ndim: int, dtypes: tuple[np.dtype, ...]) -> None:
  """Raises ValueError naming `field` unless `value` is an array of rank `ndim` and one of `dtypes`."""
  if value is None or not hasattr(value, "shape") or not hasattr(value, "dtype"):
    raise ValueError(f"{field}: expected an array, got {type(value).__name__}")
  if value.ndim != ndim:
    raise ValueError(f"{field}: expected rank {ndim}, got shape {tuple(value.shape)}")
  if np.dtype(value.dtype) not in dtypes:
    raise ValueError(f"{field}: dtype {np.dtype(value.dtype).name} not in "
                     f"{', '.join(d.name for d in dtypes)}")


class SpecError(ValueError):
  """A request option a part cannot serve; a server answers INVALID_ARGUMENT naming `field`."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field, self.message = field, message


@dataclasses.dataclass(frozen=True)
class Rows:
  """The answer's batch and positions, as the top-k part decoded or computed them (for the other parts)."""

  batch_size: int
  seq_len: int
  k: int


@dataclasses.dataclass(frozen=True)
class Block:
  """One block of positions a part computes its answer from, inside the teacher's jitted forward.

  `z`: (B, C, V) f32 logits shifted so each row max is exactly 0, padded ids at -inf; `topk`: the
  top-k part's value for the block; `start`: the position of column 0 (may be traced);
  `true_vocab_size`, `value_dtype`: as asked.
  """

  z: Any
  topk: Any
  start: Any
  true_vocab_size: int
  value_dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class Selection:
  """What one step reads of stored answers: k, the loss temperature, the layers and state names."""

  k: int
  temperature: float
  layers: tuple[int, ...] = ()
  states: tuple[str, ...] = ()


class Part:
  """One kind of teacher answer. Subclasses set the class attributes and override what differs.

  Class attributes:
    name: the registry key (`TeacherTargets.parts[name]`).
    value_type: the `flax.struct` dataclass holding the part's arrays; its attribute names are the
      flat field names (unique over all parts).
    row_axes: field -> the axis of B in it (a dict-valued field: in each of its values).
    positional: the fields indexed (B, T, ...): what a block of positions holds.
    shared: array fields that hold one value for the whole batch (replicated on a mesh).
    absent: flat field -> what `TeacherTargets` reports for it when the part is absent.
    compute_args: keyword arguments of `compute_targets` this part takes (routed here by name).
    positional_args: those of them indexed (B, T, ...): split into blocks of positions with the logits.
    chunked: computed per block of positions (`compute`) rather than once per batch (`compute_whole`).
  """

  name: ClassVar[str]
  value_type: ClassVar[type]
  row_axes: ClassVar[Mapping[str, int]] = {}
  positional: ClassVar[tuple[str, ...]] = ()
  shared: ClassVar[tuple[str, ...]] = ()
  absent: ClassVar[Mapping[str, Any]] = {}
  compute_args: ClassVar[tuple[str, ...]] = ()
  positional_args: ClassVar[tuple[str, ...]] = ()
  chunked: ClassVar[bool] = True

  # -- structure -------------------------------------------------------------------------------

  @property
  def fields(self) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(self.value_type))

  def present(self, fields: Mapping[str, Any]) -> bool:
    """Whether flat `fields` (this part's, possibly some missing) describe an answer of this part."""
    return any(not _empty(fields.get(name)) for name in self.fields)

  def build(self, fields: Mapping[str, Any]):
    """The part's value from flat fields (None when they describe no answer of this part)."""
    if not self.present(fields):
      return None
    return self.value_type(**{name: fields[name] for name in self.fields if name in fields})

  def to_fields(self, value) -> dict[str, Any]:
    return {name: getattr(value, name) for name in self.fields}

  def map_rows(self, value, fn: Callable[[Array, int], Array]):
    """`fn(array, axis)` applied to every array indexed by the batch row."""
    changes = {}
    for name, axis in self.row_axes.items():
      x = getattr(value, name)
      if x is None:
        continue
      changes[name] = {key: fn(v, axis) for key, v in x.items()} if isinstance(x, dict) else fn(x, axis)
    return value.replace(**changes)

  def map_shared(self, value, fn: Callable[[Array], Array]):
    """`fn(array)` applied to every batch-wide array (`shared`)."""
    return value.replace(**{name: fn(getattr(value, name)) for name in self.shared
                            if getattr(value, name) is not None})

  def merge_blocks(self, stacked, merge: Callable[[Array], Array]):
    """The value of a whole row from `jax.lax.map` over blocks (every leaf has a leading block axis):
    `merge` joins the positional fields; other array fields are the same in every block (the first is kept)."""
    changes = {}
    for name in self.fields:
      x = getattr(stacked, name)
      if x is None or not hasattr(x, "shape"):
        continue
      changes[name] = merge(x) if name in self.positional else x[0]
    return stacked.replace(**changes)

  def concat_mismatch(self, first, other) -> str | None:
    """Why `other` cannot join `first` along B (either may be None: the part is absent there)."""
    if (first is None) != (other is None):
      return f"disagrees with part 0 on the {self.name} part"
    return None

  # -- device computation ----------------------------------------------------------------------

  def compute(self, block: Block, **args):
    """The part's value for one block of positions (jnp, inside jit); None when `args` ask for none."""
    return None

  def compute_whole(self, **args):
    """The part's value for the whole batch, for parts not computed from the logits (`chunked` False)."""
    return None

  # -- checks ----------------------------------------------------------------------------------

  def validate(self, value, rows: Rows, expect: Mapping[str, Any]) -> None:
    """Ranks, dtypes and shapes (and the sizes in `expect`, `TeacherTargets.validate`'s keywords)."""

  def validate_absent(self, expect: Mapping[str, Any]) -> None:
    """`TeacherTargets.validate` of an answer without this part (raise if `expect` asks for it)."""

  def check_values(self, value, *, vocab_size: int | None, temperatures) -> None:
    """Checks of an answer's values beyond its shapes (host arrays); raises ValueError naming the field."""

  # -- host arrays -----------------------------------------------------------------------------

  def to_numpy(self, value) -> dict[str, np.ndarray]:
    """Flat host arrays (keys: the field names)."""
    return {name: np.asarray(x) for name, x in self.to_fields(value).items() if x is not None}

  def owns_key(self, key: str) -> bool:
    return key in self.fields

  def from_numpy(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Flat fields from the keys of `arrays` this part owns (inverse of `to_numpy`)."""
    return {key: value for key, value in arrays.items() if key in self.fields}

  # -- wire and shards (a record is a ForwardResponse) -----------------------------------------

  def encode(self, value, resp: pb.ForwardResponse, *, packed_id_bits: int, sorted_delta_values: bool) -> None:
    """Writes the part into a response (also what a shard record stores)."""

  def decode(self, resp: pb.ForwardResponse, rows: Rows) -> dict[str, Any]:
    """Flat fields of the part from a response (empty when it holds none); raises WireError naming the field."""
    return {}

  # A part with no fields of its own in the proto keeps its tensors in the response's `part_outputs`
  # (its request options in `OutputSpec.part_options`, its inputs in `ForwardRequest.part_inputs`,
  # its limits in `Limits.part_limits`), keyed "<part>.<name>": these helpers read and write them.

  def key(self, name: str) -> str:
    return f"{self.name}.{name}"

  def put_output(self, resp: pb.ForwardResponse, name: str, array: np.ndarray, **encoding) -> None:
    """Stores `array` as `part_outputs["<part>.<name>"]` (`encoding`: packed_bits, sorted_delta_coding)."""
    resp.part_outputs[self.key(name)].CopyFrom(encode_tensor(array, **encoding))

  def get_output(self, resp: pb.ForwardResponse, name: str, **checks) -> np.ndarray | None:
    """`part_outputs["<part>.<name>"]` decoded (None when absent); `checks`: dtypes, ndim (WireError naming it)."""
    key = self.key(name)
    if key not in resp.part_outputs:
      return None
    return decode_tensor(resp.part_outputs[key], f"part_outputs[{key}]", **checks)

  def input_args(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """`compute_targets` keyword arguments of a batch's part inputs (`inputs`: "<part>.<input>" -> array, as in
    `ForwardRequest.part_inputs`) this part takes (an in-process teacher computing them; may be traced)."""
    return {}

  def check_inputs(self, inputs: Mapping[str, np.ndarray], batch: Any) -> None:
    """Checks a batch's part inputs (keyed as `input_args` reads them) against the batch they are for, before a
    source sends them (host arrays); ValueError naming the field."""

  def with_inputs(self, value, inputs: Mapping[str, np.ndarray]):
    """The part's value of a served answer completed with what the request sent (`inputs`: its
    `part_inputs`, this request's rows) and the asker kept rather than have it echoed; None: absent.
    Raises ValueError naming the field when the answer does not fit what was asked."""
    return value

  def select(self, value, need: "Selection", where: str):
    """Stored answers trimmed to what a step asks (None: drop the part); raises ValueError naming the field."""
    return value

  # -- requests, inputs and a teacher server's limits -------------------------------------------
  # A part asked for per request has a *request* (its options, a value of its own type): `wire.OutputSpec`,
  # a shard manifest, a run's `Needs` and a server's validated request hold it under the part's name.

  # Server limits the part declares: name -> (default, description). Each is a server config field
  # `limits.<name>`, an entry of `EngineInfo.part_limits` and of GetInfo's `Limits` (`write_limits`).
  limits: ClassVar[Mapping[str, tuple[int, str]]] = {}
  # Fields of a configuration that asks for the part (the dump's): name -> (type, pydantic Field); read back by
  # `request_from_config`.
  config_fields: ClassVar[Mapping[str, tuple[type, Any]]] = {}
  option_names: ClassVar[tuple[str, ...]] = ()  # `OutputSpec.part_options` keys "<part>.<name>" a server takes
  input_names: ClassVar[tuple[str, ...]] = ()  # `ForwardRequest.part_inputs` keys "<part>.<name>" a server takes
  # Engine output fields split along their last axis (slots; only those a batch asks for are copied to the
  # host, `fetch_slots`), and fields computed in float32 and copied in the batch's value dtype.
  engine_slots: ClassVar[tuple[str, ...]] = ()
  engine_values: ClassVar[tuple[str, ...]] = ()

  def read_request(self, spec: pb.OutputSpec) -> Any:
    """The request an OutputSpec makes of this part, unchecked (None: none)."""
    return None

  def write_request(self, request: Any, spec: pb.OutputSpec) -> None:
    """Writes `request` into an OutputSpec whose other fields are set; ValueError naming what cannot be sent."""
    raise ValueError(f"{self.name}: this part takes no request")

  def check_request(self, request: Any, *, example_ids, part_inputs: Mapping[str, Any]) -> None:
    """A client's check that a ForwardRequest carries what `request` needs; ValueError naming the field."""

  def answer_bytes(self, request: Any, value_dtype: str) -> int:
    """Approximate bytes per position of the part's answer to `request`."""
    return 0

  def parse_request(self, spec: pb.OutputSpec, *, vocab_size: int, limits: Mapping[str, int],
                    part_inputs: Mapping[str, pb.Tensor]) -> Any:
    """The request a server is asked for by a ForwardRequest's spec (and, for a part asked for by its inputs,
    `part_inputs`), None: none; checked against the server's `limits` (a part's by its names); raises SpecError
    naming the field."""
    return None

  def prepare_inputs(self, req: pb.ForwardRequest, request: Any, *, rows: int, length: int, vocab_size: int,
                     limits: Mapping[str, int]) -> dict[str, np.ndarray]:
    """A server's checked host inputs of `request` from the ForwardRequest (`example_ids`, `part_inputs`), each
    indexed by the request's rows; raises SpecError naming the field."""
    return {}

  def request_from_config(self, cfg: Any, *, k: int) -> Any:
    """The request a configuration with this part's `config_fields` makes (None: none); `k`: its top-k."""
    return None

  def compute_kwargs(self, request: Any, *, example_ids: Any) -> dict[str, Any]:
    """`compute_targets` keyword arguments that ask for `request` for a whole batch (an in-process teacher;
    `example_ids`: the batch's (B, 2) uint32 id words)."""
    return {}

  def limits_for(self, request: Any) -> dict[str, int]:
    """The limits (`limits`) a teacher needs to serve `request` (what an in-process teacher is started with)."""
    return {}

  def request_bytes(self, limits: Mapping[str, int], *, max_tokens: int, max_batch: int) -> int:
    """Most bytes of a ForwardRequest's inputs of this part (`part_inputs`) within the limits."""
    return 0

  def max_slots(self, limits: Mapping[str, int]) -> int:
    """Slots (last axis of `engine_slots`) an engine computes; 0: it does not run this part."""
    return 0

  def fetch_slots(self, request: Any) -> int:
    """Slots a request needs copied to the host (>= 1)."""
    return 1

  def offered(self, limits: Mapping[str, int]) -> bool:
    """Whether an engine with these limits computes this part."""
    return self.max_slots(limits) > 0

  def engine_inputs(self, rows: int, length: int, limits: Mapping[str, int]) -> Any:
    """The part's inputs of an engine batch of `rows` x `length` (a pytree of host arrays, each [rows, ...],
    fixed shapes from the limits, so no request recompiles), valid as they are for padding rows."""
    return {}

  def fill_inputs(self, inputs: Any, at: slice, request: Any, prepared: Mapping[str, np.ndarray], start: int,
                  stop: int) -> None:
    """Writes rows `[start, stop)` of a request (`request`, its `prepare_inputs`) into batch rows `at`."""

  def check_engine_inputs(self, inputs: Any, rows: int, length: int, slots: int, limits: Mapping[str, int]) -> None:
    """ValueError unless `inputs` fit a batch of `rows` x `length` asking for `slots`."""

  def engine_args(self, row: Any, limits: Mapping[str, int]) -> dict[str, Any]:
    """`compute_targets` keyword arguments of one engine row (its `engine_inputs`, leading axis removed; traced),
    for a batch of that one row."""
    return {}

  def write_limits(self, values: Mapping[str, int], msg: pb.Limits) -> None:
    """Writes the part's limits into GetInfo's `Limits` (by default `part_limits["<part>.<name>"]`)."""
    for name in self.limits:
      if values.get(name):
        msg.part_limits[self.key(name)] = int(values[name])

  def read_limits(self, msg: pb.Limits) -> dict[str, int]:
    """The part's limits a server's GetInfo offers (inverse of `write_limits`; 0 when absent)."""
    return {name: int(msg.part_limits.get(self.key(name), 0)) for name in self.limits}

  # -- the teacher server's engine output ----------------------------------------------------------

  def from_engine(self, out: Any, rows: slice, length: int, req: Any) -> dict[str, Any]:
    """Flat fields of this part for batch rows `rows` (their first `length` positions) of an engine output
    (`teacher_server.engine_api.EngineOutput`, this part's fields in `out.parts[name]`), trimmed and cast to
    what request `req` (a validated `Prepared`, this part's request in `req.parts`) asked; empty when it
    asked for none (host copies)."""
    return {}

  # -- needs and offers --------------------------------------------------------------------------

  def check(self, needs: Any, offer: Any) -> list[str]:
    """Problems (each naming the field and both values) serving `needs` from `offer` (`distill_core.needs`)."""
    return []


def _empty(x) -> bool:
  if x is None:
    return True
  if isinstance(x, (dict, tuple, list)):
    return len(x) == 0
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
    return int(x) == 0
  return False
