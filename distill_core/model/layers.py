"""Small building blocks of the decoder: parameters with logical axes, norms, projections.

Every parameter carries logical axis names in its ``out_sharding`` metadata,
drawn only from :data:`LOGICAL_AXES` (plus ``layers`` for the stacked axis of
scanned layers). A rules table elsewhere maps them onto mesh axes. Eager
sharding is off: creating a model never needs a mesh.

Kernels are stored in ``param_dtype`` and cast to the compute ``dtype`` at use.
Attention projections are DenseGeneral-style: q/k/v map ``x (B, T, E)`` to
``(B, T, heads, D)``; the output projection maps ``(B, T, H, D)`` back to
``(B, T, E)``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

LOGICAL_AXES = ("vocab", "embed", "mlp", "q_heads", "kv_heads", "head_dim", "norm")
LAYERS_AXIS = "layers"
INIT_STDDEV = 0.02  # Hugging Face `initializer_range` default for Llama/Qwen2


def param(value: jax.Array, axes: Sequence[str]) -> nnx.Param:
  """An `nnx.Param` annotated with logical axis names (one per dimension)."""
  axes = tuple(axes)
  if len(axes) != value.ndim:
    raise ValueError(f"{len(axes)} axis names {axes} for a parameter of shape {value.shape}")
  unknown = [a for a in axes if a not in LOGICAL_AXES]
  if unknown:
    raise ValueError(f"unknown logical axis names {unknown}; allowed: {LOGICAL_AXES}")
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _normal(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
  return (INIT_STDDEV * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class RMSNorm(nnx.Module):
  """Root-mean-square norm, computed in float32 like Hugging Face `LlamaRMSNorm`."""

  def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(jnp.ones((dim,), param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


class Embed(nnx.Module):
  """Token embedding table (V, E); `attend` is the tied output head."""

  def __init__(self, vocab: int, dim: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.embedding = param(_normal(rngs, (vocab, dim), param_dtype), ("vocab", "embed"))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)  # (B, T, E)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits x @ embedding^T in float32. x: (B, T, E) -> (B, T, V)."""
    table = self.embedding[...].astype(self.dtype)
    return jnp.einsum("bte,ve->btv", x, table, preferred_element_type=jnp.float32)


class Linear(nnx.Module):
  """Bias-free dense layer, kernel (in, out); used by the MLP and the untied lm_head."""

  def __init__(self, in_dim: int, out_dim: int, axes: tuple[str, str], *, dtype: jnp.dtype,
               param_dtype: jnp.dtype, rngs: nnx.Rngs, out_dtype: jnp.dtype | None = None):
    self.dtype = dtype
    self.out_dtype = out_dtype
    self.kernel = param(_normal(rngs, (in_dim, out_dim), param_dtype), axes)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(self.dtype),
                   preferred_element_type=self.out_dtype)
    return y if self.out_dtype is not None else y.astype(self.dtype)


class HeadProj(nnx.Module):
  """q/k/v projection: kernel (E, heads, D), optional bias (heads, D). x (B, T, E) -> (B, T, heads, D)."""

  def __init__(self, dim: int, heads: int, head_dim: int, heads_axis: str, *, use_bias: bool,
               dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(_normal(rngs, (dim, heads, head_dim), param_dtype),
                        ("embed", heads_axis, "head_dim"))
    self.bias = (param(jnp.zeros((heads, head_dim), param_dtype), (heads_axis, "head_dim"))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.einsum("bte,ehd->bthd", x, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class OutProj(nnx.Module):
  """Attention output projection: kernel (H, D, E), optional bias (E,). (B, T, H, D) -> (B, T, E)."""

  def __init__(self, heads: int, head_dim: int, dim: int, *, use_bias: bool, dtype: jnp.dtype,
               param_dtype: jnp.dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = param(_normal(rngs, (heads, head_dim, dim), param_dtype),
                        ("q_heads", "head_dim", "embed"))
    self.bias = param(jnp.zeros((dim,), param_dtype), ("embed",)) if use_bias else None

  def __call__(self, y: jax.Array) -> jax.Array:
    out = jnp.einsum("bthd,hde->bte", y, self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      out = out + self.bias[...].astype(self.dtype)
    return out


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(dim, hidden, ("embed", "mlp"), **kw)
    self.up_proj = Linear(dim, hidden, ("embed", "mlp"), **kw)
    self.down_proj = Linear(hidden, dim, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, E)
