"""Grouped-query self-attention over packed sequences.

The four projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`) are plain
attributes: any module with the same call signature can replace them, e.g. a
module whose kernel is computed from frozen teacher kernels (learn-to-init).

    q/k/v: x (B, T, E)       -> (B, T, heads, D)
    o:     y (B, T, H, D)    -> (B, T, E)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from distill_core.model.config import ModelConfig
from distill_core.model.layers import HeadProj, OutProj
from distill_core.model.rope import apply_rope

# Scores of masked pairs. Finite, so a row with nothing to attend to (padding)
# becomes a uniform average instead of NaN.
MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """Causal mask within equal non-zero segments: (B, T) -> bool (B, T, S) with S = T.

  Causality is by index in the packed row, so each packed sequence sees only its
  own earlier tokens; segment 0 marks padding and attends to nothing.
  """
  t = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))  # (T, S)
  same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, S)
  real = (segment_ids != 0)[:, :, None]
  return causal[None] & same & real


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax attention with kv-head sharing.

  q (B, T, H, D), k/v (B, S, K, D) with H a multiple of K (query head h reads kv
  head h // (H // K), as Hugging Face `repeat_kv`), mask (B, T, S).
  Scores and softmax in float32; returns (B, T, H, D) in q's dtype.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, d)  # (B, T, K, G, D)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (d ** -0.5)
  scores = jnp.where(mask[:, None, None], scores, MASKED_SCORE)  # (B, K, G, T, S)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # (B, T, K, G, D)
  return out.reshape(b, t, h, d)


class Attention(nnx.Module):
  """Self-attention block: projections, rotary embeddings, grouped-query attention."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    e, h, kv, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = HeadProj(e, h, d, "q_heads", use_bias=cfg.attention_bias, **kw)
    self.k_proj = HeadProj(e, kv, d, "kv_heads", use_bias=cfg.attention_bias, **kw)
    self.v_proj = HeadProj(e, kv, d, "kv_heads", use_bias=cfg.attention_bias, **kw)
    # Hugging Face Llama puts the bias on o_proj too; Qwen2 does not.
    o_bias = cfg.attention_bias and cfg.model_type == "llama"
    self.o_proj = OutProj(h, d, e, use_bias=o_bias, **kw)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array) -> jax.Array:
    """x (B, T, E), rope tables (B, T, D), mask (B, T, T) -> (B, T, E)."""
    q = apply_rope(self.q_proj(x), cos, sin)  # (B, T, H, D)
    k = apply_rope(self.k_proj(x), cos, sin)  # (B, T, K, D)
    v = self.v_proj(x)  # (B, T, K, D)
    return self.o_proj(dot_product_attention(q, k, v, mask))  # (B, T, E)
