"""The scored part: the teacher's logits at ids the asker chose, per position, for the on-policy losses.

| field           | shape     | dtype | meaning                                                            |
|-----------------|-----------|-------|--------------------------------------------------------------------|
| `scored_ids`    | (B, T, n) | int32 | the ids asked (slot 0: the sampled next token; then e.g. the       |
|                 |           |       | student's top-k there), kept with the answer                       |
| `scored_logits` | (B, T, n) | f32   | the teacher's logits z at those ids minus the row max, the shift   |
|                 |           |       | of `topk_logits` and `logsumexp`: log p_T(v) = value / tau - lse   |

A request asks with the per-position input `part_inputs["scored.ids"]` ((B, T, n) int32, ids in
[0, vocab), n <= the server's `part_limits["scored.max_ids"]`); the top-k beside it may be as
small as the answer allows (k = 1, the usual "other parts alone" request). The answer carries
`part_outputs["scored.logits"]` only: the asker already holds the ids and re-attaches them
(`attach`), so a scored position costs n x 4 bytes up and n x 4 bytes back (`answer_bytes`,
`request_bytes`). A value that holds the ids (the trainer's targets, a shard record written from
them) encodes them too, as `part_outputs["scored.ids"]` (bit-packed like the top-k ids), so a
record decodes to both fields; a served answer holds the logits alone until `attach`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np

from distill_core.bitpack import WireError
from distill_core.parts import base
from distill_core.parts.base import Array, Block, Rows, SpecError
from distill_core.parts.topk import check_ids
from distill_core.proto import teacher_pb2 as pb
from distill_core.tensor_codec import decode_tensor

INPUT = "scored.ids"  # ForwardRequest.part_inputs key of the ids asked
LIMIT = "scored.max_ids"  # Limits.part_limits key: the most ids a server scores per position
CONFIG_LIMIT = "max_scored_ids"  # the server config's limits.max_scored_ids (the part's `limits` name)
INPUT_FIELD = f"part_inputs['{INPUT}']"  # how errors about the request's ids name them
ID_BYTES = np.dtype(np.int32).itemsize  # an id asked, raw on the wire
VALUE_BYTES = np.dtype(np.float32).itemsize  # a value answered


@dataclasses.dataclass(frozen=True)
class ScoredRequest:
  """The teacher's logits at `ids_per_position` given ids per position (the ids travel as `part_inputs`)."""

  ids_per_position: int

  def __post_init__(self):
    if self.ids_per_position < 1:
      raise ValueError(f"ids_per_position: {self.ids_per_position} must be >= 1")


@flax.struct.dataclass
class Scored:
  scored_ids: Array = None  # (B, T, n) int32, the ids asked (None in a served answer until `attach`)
  scored_logits: Array = None  # (B, T, n) f32, shifted teacher logits at scored_ids


def request_bytes(n: int) -> int:
  """Bytes per position a request's ids cost on the wire (raw int32)."""
  return n * ID_BYTES


def answer_bytes(n: int) -> int:
  """Bytes per position the answer's values cost on the wire (raw f32; the ids do not travel back)."""
  return n * VALUE_BYTES


def request_inputs(ids: np.ndarray) -> dict[str, np.ndarray]:
  """The `ForwardRequest.part_inputs` entries asking for the teacher's logits at `ids` ((B, T, n) int32)."""
  return {INPUT: np.ascontiguousarray(ids, np.int32)}


def _ids_shape(tensor: pb.Tensor, max_ids: int) -> tuple[int, ...]:
  """The declared shape of the request's ids, checked for dtype, rank and ids per position (bounded numbers
  only in the messages); SpecError naming `part_inputs['scored.ids']`."""
  if not max_ids:
    raise SpecError(INPUT_FIELD, f"this server scores no given ids (limits.{CONFIG_LIMIT} is 0)")
  if tensor.dtype != pb.DTYPE_INT32:
    raise SpecError(INPUT_FIELD, "dtype must be DTYPE_INT32")
  shape = tuple(int(d) for d in tensor.shape)
  if len(shape) != 3:
    raise SpecError(INPUT_FIELD, f"expected 3 dimensions [B, T, n], got {len(shape)}")
  if not 1 <= shape[2] <= max_ids:
    raise SpecError(INPUT_FIELD, f"{shape[2]} ids per position, must be in [1, {max_ids}] (limits.{CONFIG_LIMIT})")
  return shape


def parse_ids(req: pb.ForwardRequest, *, vocab_size: int, max_ids: int, batch_size: int,
              seq_len: int) -> np.ndarray | None:
  """The (B, T, n) int32 ids a request asks a server to score (None: none); raises SpecError naming
  `part_inputs['scored.ids']` (a server answers INVALID_ARGUMENT with that field).

  `batch_size`, `seq_len`: the request's tokens' [B, T]; `max_ids`: the server's limit (0: it scores none).
  Messages carry only bounded numbers (shapes are checked for rank first, the first bad id is one int).
  """
  if INPUT not in req.part_inputs:
    return None
  tensor = req.part_inputs[INPUT]
  _ids_shape(tensor, max_ids)
  try:
    ids = decode_tensor(tensor, INPUT_FIELD, dtypes=(pb.DTYPE_INT32,), ndim=3,
                        max_elements=batch_size * seq_len * max_ids)
  except WireError as e:
    raise SpecError(INPUT_FIELD, e.detail) from None
  b, t, n = ids.shape
  if (b, t) != (batch_size, seq_len):
    raise SpecError(INPUT_FIELD, f"shape [{b}, {t}, {n}] does not match the tokens' [B, T] = "
                                 f"[{batch_size}, {seq_len}]")
  try:
    check_ids(ids, "ids", vocab_size)
  except ValueError as e:
    raise SpecError(INPUT_FIELD, str(e).removeprefix("ids: ")) from None
  return np.ascontiguousarray(ids)


def attach(fields: dict[str, Any], ids: np.ndarray | None) -> dict[str, Any]:
  """Flat fields of a served answer with the ids that were asked put back (`scored_ids`); the answer must hold
  values for exactly those ids (ValueError naming `scored_logits`). No ids asked: an answer must hold none."""
  logits = fields.get("scored_logits")
  if ids is None:
    if logits is not None:
      raise ValueError("scored_logits: the answer scores given ids, none were asked")
    return fields
  if logits is None:
    raise ValueError(f"scored_logits: missing, {np.shape(ids)[-1]} ids per position were asked")
  if tuple(np.shape(logits)) != tuple(np.shape(ids)):
    raise ValueError(f"scored_logits: shape {list(np.shape(logits))} != the ids asked {list(np.shape(ids))}")
  return {**fields, "scored_ids": np.asarray(ids, np.int32)}


def check_sampled_column(ids: np.ndarray, labels: np.ndarray, loss_mask: np.ndarray) -> None:
  """Slot 0 of the scored ids must be the batch's next token (`labels`) wherever `loss_mask` counts
  (the sampled-token losses read it as the sampled token); ValueError naming `scored_ids` otherwise."""
  ids = np.asarray(ids)
  off = (np.asarray(loss_mask) > 0) & (ids[..., 0] != np.asarray(labels))
  if off.any():
    where = tuple(int(i) for i in np.argwhere(off)[0])
    raise ValueError(f"scored_ids: slot 0 at {list(where)} is {int(ids[where + (0,)])}, the batch's next token "
                     f"there is {int(np.asarray(labels)[where])} ({int(off.sum())} such counted positions)")


class ScoredPart(base.Part):
  name = "scored"
  value_type = Scored
  row_axes = {"scored_ids": 0, "scored_logits": 0}
  positional = ("scored_ids", "scored_logits")
  absent = {"scored_ids": None, "scored_logits": None}
  compute_args = ("scored_ids",)
  positional_args = ("scored_ids",)
  limits = {CONFIG_LIMIT: (0, "Most ids per position a request may ask the teacher's logits at "
                              "(ForwardRequest.part_inputs['scored.ids'], on-policy distillation: the sampled token "
                              "and the student's top-k); > 0 compiles a scoring program per bucket at warm-up; 0 "
                              "(default) scores none.")}
  input_names = ("ids",)
  engine_slots = ("scored_ids", "scored_logits")

  def compute(self, block: Block, scored_ids=None):
    """The block's shifted logits `block.z` (f32, row max 0) at `scored_ids` ((B, C, n), the block's positions).

    Ids outside the array are clipped to it (a server refuses them before; the losses drop ids outside the
    real vocabulary, whose values are -inf here anyway)."""
    if scored_ids is None:
      return None
    ids = jnp.clip(jnp.asarray(scored_ids, jnp.int32), 0, block.z.shape[-1] - 1)
    return Scored(scored_ids=jnp.asarray(scored_ids, jnp.int32),
                  scored_logits=jnp.take_along_axis(block.z, ids, axis=-1).astype(jnp.float32))

  def validate(self, value: Scored, rows: Rows, expect) -> None:
    base.check_array(value.scored_logits, "scored_logits", 3, base.FLOAT32)
    b, t, n = value.scored_logits.shape
    if (b, t) != (rows.batch_size, rows.seq_len) or n < 1:
      raise ValueError(f"scored_logits: shape {(b, t, n)} does not match [B, T, n >= 1] with [B, T] = "
                       f"{[rows.batch_size, rows.seq_len]}")
    if value.scored_ids is not None:
      base.check_array(value.scored_ids, "scored_ids", 3, base.INT32)
      if tuple(value.scored_ids.shape) != (b, t, n):
        raise ValueError(f"scored_ids: shape {tuple(value.scored_ids.shape)} != scored_logits shape {(b, t, n)}")

  def check_values(self, value: Scored, *, vocab_size, temperatures) -> None:
    check_ids(value.scored_ids, "scored_ids", vocab_size)

  def concat_mismatch(self, first, other) -> str | None:
    if (first is None) != (other is None) or (first is not None and (
        (first.scored_ids is None) != (other.scored_ids is None)
        or first.scored_logits.shape[-1] != other.scored_logits.shape[-1])):
      return "disagrees with part 0 on the scored ids (present, or how many per position)"
    return None

  def encode(self, value: Scored, resp, *, packed_id_bits, sorted_delta_values) -> None:
    """`scored.logits` raw f32; `scored.ids` only when the value holds them (not in a served answer)."""
    self.put_output(resp, "logits", np.asarray(value.scored_logits, np.float32))
    if value.scored_ids is not None:
      self.put_output(resp, "ids", np.asarray(value.scored_ids, np.int32), packed_bits=packed_id_bits)

  def decode(self, resp, rows: Rows) -> dict[str, Any]:
    logits = self.get_output(resp, "logits", dtypes=(pb.DTYPE_FLOAT32,), ndim=3)
    ids = self.get_output(resp, "ids", dtypes=(pb.DTYPE_INT32,), ndim=3)
    if logits is None:
      if ids is not None:
        raise WireError(f"part_outputs[{self.key('ids')}]", f"given without part_outputs[{self.key('logits')}]")
      return {}
    if logits.shape[:2] != (rows.batch_size, rows.seq_len):
      raise WireError(f"part_outputs[{self.key('logits')}]",
                      f"shape {list(logits.shape)} does not match [B, T, n] with [B, T] = "
                      f"{[rows.batch_size, rows.seq_len]}")
    if ids is not None and ids.shape != logits.shape:
      raise WireError(f"part_outputs[{self.key('ids')}]",
                      f"shape {list(ids.shape)} != part_outputs[{self.key('logits')}] shape {list(logits.shape)}")
    return {"scored_logits": logits} if ids is None else {"scored_logits": logits, "scored_ids": ids}

  def input_args(self, inputs) -> dict[str, Any]:
    return {} if INPUT not in inputs else {"scored_ids": inputs[INPUT]}

  def check_inputs(self, inputs, batch) -> None:
    """The ids must be (B, T, n >= 1) for the batch's rows and slot 0 its next token at every counted position."""
    ids = inputs.get(INPUT)
    if ids is None:
      return
    bt = list(np.shape(batch.targets))
    if np.ndim(ids) != 3 or list(np.shape(ids)[:2]) != bt or np.shape(ids)[2] < 1:
      raise ValueError(f"{INPUT_FIELD}: shape {list(np.shape(ids))} does not match the batch's [B, T] = {bt} with "
                       "n >= 1 ids per position")
    check_sampled_column(ids, batch.targets, batch.loss_mask)

  def with_inputs(self, value, inputs):
    """A served answer with the ids asked put back (`attach`)."""
    return self.build(attach({} if value is None else self.to_fields(value), inputs.get(INPUT)))

  # -- requests, inputs and a teacher server's limits ---------------------------------------------
  # Asked for by its inputs alone: nothing in the OutputSpec; a `ScoredRequest` in a spec's or a run's parts
  # only sizes answers and is checked against a server's limit (a batch without ids asks for none).

  def write_request(self, request: ScoredRequest, spec: pb.OutputSpec) -> None:
    del request, spec  # the ids are the request (part_inputs)

  def check_request(self, request: ScoredRequest, *, example_ids, part_inputs) -> None:
    ids = part_inputs.get(INPUT)
    if ids is not None and (np.ndim(ids) != 3 or np.shape(ids)[2] > request.ids_per_position):
      raise ValueError(f"{INPUT_FIELD}: shape {list(np.shape(ids))}, expected [B, T, n <= "
                       f"{request.ids_per_position}]")

  def answer_bytes(self, request: ScoredRequest, value_dtype: str) -> int:
    return answer_bytes(request.ids_per_position)

  def parse_request(self, spec, *, vocab_size, limits, part_inputs=None) -> ScoredRequest | None:
    if not part_inputs or INPUT not in part_inputs:
      return None
    return ScoredRequest(_ids_shape(part_inputs[INPUT], int(limits.get(CONFIG_LIMIT, 0)))[2])

  def prepare_inputs(self, req, request, *, rows, length, vocab_size, limits) -> dict[str, np.ndarray]:
    return {"ids": parse_ids(req, vocab_size=vocab_size, max_ids=int(limits.get(CONFIG_LIMIT, 0)), batch_size=rows,
                             seq_len=length)}

  def limits_for(self, request: ScoredRequest) -> dict[str, int]:
    return {CONFIG_LIMIT: request.ids_per_position}

  def request_bytes(self, limits, *, max_tokens: int, max_batch: int) -> int:
    return max_tokens * request_bytes(int(limits.get(CONFIG_LIMIT, 0)))

  def max_slots(self, limits) -> int:
    return int(limits.get(CONFIG_LIMIT, 0))

  def fetch_slots(self, request: ScoredRequest) -> int:
    return request.ids_per_position

  def engine_inputs(self, rows: int, length: int, limits) -> np.ndarray:
    """(rows, length, max_scored_ids) int32 ids; id 0 where a row asks for fewer positions or ids (padding)."""
    return np.zeros((rows, length, self.max_slots(limits)), np.int32)

  def fill_inputs(self, inputs: np.ndarray, at: slice, request: ScoredRequest, prepared, start: int,
                  stop: int) -> None:
    """Rows [start, stop) of the request's ids, padded to the bucket's length and slots like its tokens."""
    ids = prepared["ids"][start:stop]
    inputs[at, :ids.shape[1], :ids.shape[2]] = ids

  def check_engine_inputs(self, inputs: np.ndarray, rows: int, length: int, slots: int, limits) -> None:
    max_ids = self.max_slots(limits)
    if not 1 <= slots <= max_ids:
      raise ValueError(f"fetch.scored {slots} not in [1, {CONFIG_LIMIT} {max_ids}]")
    if np.shape(inputs) != (rows, length, max_ids):
      raise ValueError(f"scored: ids of shape {list(np.shape(inputs))} do not match [{rows}, {length}, {max_ids}]")

  def engine_args(self, row, limits) -> dict[str, Any]:
    return {"scored_ids": row[None]}

  def write_limits(self, values, msg: pb.Limits) -> None:
    if values.get(CONFIG_LIMIT):
      msg.part_limits[LIMIT] = int(values[CONFIG_LIMIT])

  def read_limits(self, msg: pb.Limits) -> dict[str, int]:
    return {CONFIG_LIMIT: int(msg.part_limits.get(LIMIT, 0))}

  def from_engine(self, out, rows, length, req) -> dict[str, Any]:
    """The logits of a request's rows, their first n slots (the ids stay with the asker)."""
    request = dict(req.parts).get(self.name)
    if request is None:
      return {}
    n = request.ids_per_position
    got = out.parts[self.name]
    return {"scored_logits": np.ascontiguousarray(got["scored_logits"][rows, :length, :n], np.float32)}

  def check(self, needs, offer) -> list[str]:
    want = dict(needs.parts).get(self.name)
    if want is None:
      return []
    n = want.ids_per_position
    if offer.stored:
      return [f"{INPUT}: the loss scores {n} ids per position chosen at training time; stored answers cannot hold "
              "them (use a teacher that scores new text)"]
    offered = int(offer.part_limits.get(CONFIG_LIMIT, 0))
    if n > offered:
      what = f"at most {offered}" if offered else "no given ids"
      return [f"part_limits['{LIMIT}']: the loss needs the teacher's logits at {n} ids per position, the teacher "
              f"scores {what} (start it with limits.{CONFIG_LIMIT} >= {n})"]
    return []


PART = ScoredPart()
