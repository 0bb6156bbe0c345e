"""The top-k part: the k highest teacher logits per position, shifted by the row max, and the exact
logsumexp of the whole real vocabulary at each asked temperature. Every answer has it.

| field          | shape           | dtype            | meaning                                      |
|----------------|-----------------|------------------|----------------------------------------------|
| `topk_ids`     | (B, T, k)       | int32            | the k highest logits, sorted descending      |
| `topk_logits`  | (B, T, k)       | f16 / bf16 / f32 | those logits minus the row max (top entry 0) |
| `logsumexp`    | (B, T, n_temps) | f32              | log sum_v exp(z_v / T_j) over the real vocab |
| `temperatures` | (n_temps,)      | f32              | the T_j of the logsumexp columns (a leaf)    |
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from distill_core.bitpack import WireError
from distill_core.parts import base
from distill_core.parts.base import Array, Rows
from distill_core.proto import teacher_pb2 as pb
from distill_core.tensor_codec import decode_tensor, encode_tensor


@flax.struct.dataclass
class TopK:
  topk_ids: Array  # (B, T, k) int32
  topk_logits: Array  # (B, T, k) f16/bf16/f32, shifted so the row max is 0
  logsumexp: Array  # (B, T, n_temps) f32, over the full real vocabulary
  temperatures: Array  # (n_temps,) f32

  def __post_init__(self):
    temps = self.temperatures
    host = isinstance(temps, (list, tuple, float, int))
    if host or (isinstance(temps, np.ndarray) and temps.dtype != np.float32):
      object.__setattr__(self, "temperatures", np.asarray(temps, np.float32).reshape(-1))


def shifted_logsumexp(z: jax.Array, top_id: jax.Array, temperature: jax.Array) -> jax.Array:
  """log sum_v exp(z_v / T) for (B, T, V) logits whose entry `top_id` is the row max, exactly 0.

  Computed as log1p(sum_{v != top} exp(z_v / T)): full relative precision when
  one token dominates, so the tail mass 1 - sum_i p_i derived from it is exact.
  """
  x = z / temperature
  is_top = jnp.arange(z.shape[-1]) == top_id[..., None]
  return jnp.log1p(jnp.sum(jnp.where(is_top, 0.0, jnp.exp(x)), axis=-1))


class TopKPart(base.Part):
  name = "topk"
  value_type = TopK
  row_axes = {"topk_ids": 0, "topk_logits": 0, "logsumexp": 0}
  positional = ("topk_ids", "topk_logits", "logsumexp")
  shared = ("temperatures",)

  def present(self, fields: Mapping[str, Any]) -> bool:
    return True  # every answer has top-k (k may be 0 for an answer of other parts only)

  def build(self, fields):
    return TopK(**{name: fields.get(name) for name in self.fields})

  def compute_topk(self, z: jax.Array, *, k: int, temperatures: jax.Array, value_dtype: np.dtype) -> TopK:
    """Top-k and logsumexp per temperature of shifted logits z (row max exactly 0, padding -inf)."""
    vals, ids = jax.lax.top_k(z, k)  # (B, T, k)
    # The row's first maximum, as ids[..., 0] is; taken with argmax rather than from top_k's output,
    # which on CPU keeps XLA from fusing the sort into every logsumexp pass (about 20x slower).
    top = jnp.argmax(z, axis=-1)  # (B, T)
    lse = jnp.stack([shifted_logsumexp(z, top, temperatures[j]) for j in range(temperatures.shape[0])], axis=-1)
    return TopK(topk_ids=ids.astype(jnp.int32), topk_logits=vals.astype(value_dtype), logsumexp=lse,
                temperatures=temperatures)

  def validate(self, value: TopK, rows: Rows, expect) -> None:
    base.check_array(value.topk_ids, "topk_ids", 3, base.INT32)
    base.check_array(value.topk_logits, "topk_logits", 3, base.FLOAT_DTYPES)
    base.check_array(value.logsumexp, "logsumexp", 3, base.FLOAT32)
    base.check_array(value.temperatures, "temperatures", 1, base.FLOAT32)
    b, t, kk = value.topk_ids.shape
    sizes = {"batch_size": b, "seq_len": t, "k": kk, "n_temps": value.logsumexp.shape[2]}
    for name, got in sizes.items():
      want = expect.get(name)
      if want is not None and want != got:
        raise ValueError(f"teacher targets: {name} is {got}, expected {want}")
    if tuple(value.topk_logits.shape) != (b, t, kk):
      raise ValueError(f"topk_logits: shape {tuple(value.topk_logits.shape)} != topk_ids shape {(b, t, kk)}")
    if tuple(value.logsumexp.shape[:2]) != (b, t):
      raise ValueError(f"logsumexp: shape {tuple(value.logsumexp.shape)} does not start with {(b, t)}")
    if value.temperatures.shape[0] != value.logsumexp.shape[2]:
      raise ValueError(f"temperatures: {value.temperatures.shape[0]} values for "
                       f"{value.logsumexp.shape[2]} logsumexp columns")

  def check_values(self, value: TopK, *, vocab_size, temperatures) -> None:
    check_ids(value.topk_ids, "topk_ids", vocab_size)
    if temperatures is not None:
      want = np.asarray(temperatures, np.float32).reshape(-1)
      got = np.asarray(value.temperatures, np.float32).reshape(-1)
      if want.shape != got.shape or not np.array_equal(want, got):
        raise ValueError(f"temperatures: the answer is for {got.tolist()}, the request asked for {want.tolist()}")
    if value.topk_logits.shape[-1] == 0:  # other parts alone: no top-k values to check
      return
    first = np.asarray(value.topk_logits[..., 0], np.float32)
    off = first != 0.0  # NaN included
    if off.any():
      where = tuple(int(i) for i in np.argwhere(off)[0])
      raise ValueError(f"topk_logits: the first value at {list(where)} is {float(first[where])}, not 0 (values "
                       f"are shifted by the row max; {int(off.sum())} such positions)")

  def concat_mismatch(self, first: TopK, other: TopK) -> str | None:
    if not np.array_equal(np.asarray(other.temperatures), np.asarray(first.temperatures)):
      return "temperatures differ from part 0"
    return None

  def from_numpy(self, arrays):
    missing = [key for key in self.fields if key not in arrays]
    if missing:
      raise ValueError(f"teacher targets: missing {', '.join(missing)}")
    return super().from_numpy(arrays)

  def encode(self, value: TopK, resp, *, packed_id_bits, sorted_delta_values) -> None:
    resp.temperatures.extend(list(value.temperatures))
    resp.topk_ids.CopyFrom(encode_tensor(np.asarray(value.topk_ids, np.int32), packed_bits=packed_id_bits))
    resp.topk_logits.CopyFrom(encode_tensor(value.topk_logits, sorted_delta_coding=sorted_delta_values))
    resp.logsumexp.CopyFrom(encode_tensor(np.asarray(value.logsumexp, np.float32)))

  def decode(self, resp, rows=None) -> dict[str, Any]:
    ids = decode_tensor(resp.topk_ids, "topk_ids", dtypes=(pb.DTYPE_INT32,), ndim=3)
    logits = decode_tensor(resp.topk_logits, "topk_logits", dtypes=base.WIRE_FLOATS, ndim=3)
    if logits.shape != ids.shape:
      raise WireError("topk_logits", f"shape {list(logits.shape)} != topk_ids shape {list(ids.shape)}")
    lse = decode_tensor(resp.logsumexp, "logsumexp", dtypes=(pb.DTYPE_FLOAT32,), ndim=3)
    temps = tuple(float(t) for t in resp.temperatures)
    if lse.shape != ids.shape[:2] + (len(temps),):
      raise WireError("logsumexp", f"shape {list(lse.shape)} does not match [B, T, {len(temps)} temperatures]")
    return dict(topk_ids=ids, topk_logits=logits, logsumexp=lse, temperatures=temps)

  def select(self, value: TopK, need, where: str) -> TopK:
    temps = np.asarray(value.temperatures, np.float32)
    hits = np.flatnonzero(temps == np.float32(need.temperature))
    if hits.size == 0:
      raise ValueError(f"{where}: temperature: {float(np.float32(need.temperature))} is not stored "
                       f"(stored: {[float(t) for t in temps]})")
    k = value.topk_ids.shape[-1]
    if need.k > k:
      raise ValueError(f"{where}: k: {need.k} needed, {k} stored")
    column = int(hits[0])
    return value.replace(topk_ids=value.topk_ids[..., :need.k], topk_logits=value.topk_logits[..., :need.k],
                         logsumexp=value.logsumexp[..., column:column + 1], temperatures=temps[column:column + 1])

  def from_engine(self, out, rows, length, req) -> dict[str, Any]:
    return dict(topk_ids=np.ascontiguousarray(out.topk_ids[rows, :length, :req.k]),
                topk_logits=np.ascontiguousarray(out.topk_logits[rows, :length, :req.k], dtype=req.value_dtype),
                logsumexp=np.ascontiguousarray(out.logsumexp[rows, :length, :len(req.temperatures)]),
                temperatures=req.temperatures)

  def check(self, needs, offer) -> list[str]:
    problems = []
    if offer.stored:
      if offer.max_k < needs.k:
        problems.append(f"spec.k: stored {offer.max_k}, loss.top_k needs {needs.k}")
      if needs.value_dtype not in offer.value_dtypes:
        problems.append(f"spec.value_dtype: stored {offer.value_dtypes[0]!r}, teacher.value_dtype is "
                        f"{needs.value_dtype!r}")
      stored = [float(np.float32(t)) for t in offer.temperatures or ()]
      for t in needs.temperatures:
        if float(np.float32(t)) not in stored:
          problems.append(f"temperatures: stored {stored}, loss.temperature needs {float(np.float32(t))} "
                          "(an exact match)")
      return problems
    if needs.k > offer.max_k:
      problems.append(f"top_k: the loss needs k={needs.k}, the teacher serves at most {offer.max_k}")
    if needs.value_dtype not in offer.value_dtypes:
      problems.append(f"value_dtype: {needs.value_dtype} not offered (offered: {list(offer.value_dtypes)})")
    return problems

def check_ids(ids, field: str, vocab_size: int | None) -> None:
  """Raises ValueError naming `field` and the first position of an id outside [0, vocab_size)."""
  if ids is None or vocab_size is None:
    return
  ids = np.asarray(ids)
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{field}: id {int(ids[where])} at {list(where)} is outside the vocabulary "
                     f"[0, {vocab_size}) ({int(bad.sum())} such ids)")


PART = TopKPart()
