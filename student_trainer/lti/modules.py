"""LTI projections: drop-in replacements for the attention's q/k/v/o projections.

The kernel is recomputed from the frozen teacher kernel ``C`` and the learnable
maps on every call (:func:`~student_trainer.lti.kernels.effective_kernel`), so
gradients reach only A and B (or W) and the bias. ``C`` is a
:class:`TeacherKernel`, not an ``nnx.Param``: the optimizer (``wrt`` a Param
filter) never sees it, the train step takes no gradient of it, and the trainer
leaves it out of its checkpoints (they record where C came from instead).

Inside ``nnx.scan`` every variable is one layer's slice, so ``__call__`` never
sees the layer axis; the stacked form matters only when the module is built
and when it is collapsed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from student_trainer.lti.kernels import Kind, effective_kernel


class TeacherKernel(nnx.Variable):
  """A frozen teacher tensor (LTI's C): never trained, never saved with the student."""


def _axes(names, layered: bool):
  return (("layers",) if layered else ()) + tuple(names)


class LTIProj(nnx.Module):
  """A q/k/v projection ``x (B, T, E) -> (B, T, Hs, Ds)`` or output ``(B, T, Hs, Ds) -> (B, T, E)``.

  Args:
    kind: "q", "k", "v" or "o".
    c: teacher kernel, (E, Ht, Dt) for q/k/v, (Ht, Dt, E) for o (with a leading L when `layered`).
    a, b: factorised maps, or w: the general map (see kernels.py for shapes).
    bias: initial bias (Hs, Ds) for q/k/v, (E,) for o; None = no bias.
    layered: the arrays carry the leading layer axis of scanned layers.
  """

  def __init__(self, kind: Kind, c, *, a=None, b=None, w=None, bias=None, layered: bool = False,
               dtype=jnp.float32, param_dtype=jnp.float32):
    if (w is None) == (a is None or b is None):
      raise ValueError("give either a and b (factorised) or w (general map)")
    self.kind = kind
    self.dtype = dtype
    heads = "q_heads" if kind in ("q", "o") else "kv_heads"
    c_axes = ("embed", heads, "head_dim") if kind != "o" else (heads, "head_dim", "embed")
    self.c = TeacherKernel(jnp.asarray(c), out_sharding=_axes(c_axes, layered), eager_sharding=False)

    def param(x, names):
      return nnx.Param(jnp.asarray(x, param_dtype), out_sharding=_axes(names, layered), eager_sharding=False)

    general = w is not None
    self.w = param(w, (None, None, None, None)) if general else None
    self.a = None if general else param(a, (None, None))
    self.b = None if general else param(b, (None, None))
    bias_axes = (heads, "head_dim") if kind != "o" else ("embed",)
    self.bias = None if bias is None else param(bias, bias_axes)

  def kernel(self, layered: bool = False) -> jax.Array:
    """The effective kernel in float32 (`layered`: the module holds stacked layers)."""
    get = lambda v: None if v is None else v[...]  # noqa: E731
    return effective_kernel(self.kind, self.c[...], get(self.a), get(self.b), get(self.w), layered=layered)

  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel().astype(self.dtype)
    if self.kind == "o":
      y = jnp.einsum("bthd,hde->bte", x, k)  # (B, T, E)
    else:
      y = jnp.einsum("bte,ehd->bthd", x, k)  # (B, T, Hs, Ds)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def locate(root: nnx.Module, path: str) -> tuple[object, str]:
  """(the object holding the last path element, that element) for a dotted parameter path."""
  node, parts = root, path.split(".")
  for part in parts[:-1]:
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node, parts[-1]
