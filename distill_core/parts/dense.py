"""The dense part: the full teacher logits, only from an in-process teacher (never sent or stored).

| field          | shape           | dtype         | meaning                                        |
|----------------|-----------------|---------------|------------------------------------------------|
| `dense_logits` | (B, T, V)       | f32           | full logits                                    |
| `dense_hidden` | (B, T, E)       | teacher dtype | or instead: the final hidden states            |
| `dense_head`   | DenseHead       |               | with them: the teacher's lm_head               |
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from distill_core.parts import base
from distill_core.parts.base import Array, Rows


@flax.struct.dataclass
class DenseHead:
  """An in-process teacher's lm_head, so dense teacher logits can be formed per chunk of positions.

  logits = hidden @ weight in `dtype` with float32 accumulation: weight (E, V), or the tied
  embedding (V, E) when `tied`; the arithmetic of `Transformer.logits_from_hidden`.
  """

  weight: Array
  tied: bool = flax.struct.field(pytree_node=False, default=False)
  dtype: str = flax.struct.field(pytree_node=False, default="float32")

  def __call__(self, hidden: Array) -> jax.Array:
    """hidden (B, T, E) -> logits (B, T, V) float32."""
    spec = "bte,ve->btv" if self.tied else "bte,ev->btv"
    return jnp.einsum(spec, hidden, self.weight.astype(self.dtype), preferred_element_type=jnp.float32)


@flax.struct.dataclass
class Dense:
  dense_logits: Array | None = None  # (B, T, V) f32
  dense_hidden: Array | None = None  # (B, T, E) teacher final hidden states
  dense_head: DenseHead | None = None  # dense logits = dense_head(dense_hidden)

  def logits(self) -> Array:
    return self.dense_logits if self.dense_logits is not None else self.dense_head(self.dense_hidden)


class DensePart(base.Part):
  name = "dense"
  value_type = Dense
  row_axes = {"dense_logits": 0, "dense_hidden": 0}
  positional = ("dense_logits", "dense_hidden")
  absent = {"dense_logits": None, "dense_hidden": None, "dense_head": None}

  def validate(self, value: Dense, rows: Rows, expect) -> None:
    bt = (rows.batch_size, rows.seq_len)
    if value.dense_logits is not None:
      base.check_array(value.dense_logits, "dense_logits", 3, base.FLOAT32)
      if tuple(value.dense_logits.shape[:2]) != bt:
        raise ValueError(f"dense_logits: shape {tuple(value.dense_logits.shape)} does not start with {bt}")
    if (value.dense_hidden is None) != (value.dense_head is None):
      raise ValueError("dense_hidden: given without dense_head (or the reverse); they come together")
    if value.dense_hidden is not None:
      base.check_array(value.dense_hidden, "dense_hidden", 3, base.FLOAT_DTYPES)
      if tuple(value.dense_hidden.shape[:2]) != bt:
        raise ValueError(f"dense_hidden: shape {tuple(value.dense_hidden.shape)} does not start with {bt}")

  def concat_mismatch(self, first, other) -> str | None:
    a, b = first or Dense(), other or Dense()
    if (a.dense_logits is None) != (b.dense_logits is None) or (a.dense_hidden is None) != (b.dense_hidden is None):
      return "disagrees with part 0 on dense_logits / dense_hidden"
    return None

  def to_numpy(self, value: Dense) -> dict[str, np.ndarray]:
    if value.dense_hidden is not None:
      raise ValueError("dense_hidden: an in-process teacher's hidden states and lm_head are not stored or sent")
    return {} if value.dense_logits is None else {"dense_logits": np.asarray(value.dense_logits)}

  def owns_key(self, key: str) -> bool:
    return key == "dense_logits"

  def from_numpy(self, arrays) -> dict[str, Any]:
    return {"dense_logits": arrays["dense_logits"]} if "dense_logits" in arrays else {}

  # encode / decode: nothing; dense logits stay in the process that computed them.


PART = DensePart()
