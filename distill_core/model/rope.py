"""Rotary position embeddings with Hugging Face semantics (rotate-half layout).

The inverse frequencies follow `transformers.modeling_rope_utils`: the default
rule ``1 / theta^(2i/D)`` and the Llama-3 rule of `_compute_llama3_parameters`
(long wavelengths divided by ``factor``, short ones kept, a smooth blend in
between). Both produce an attention scaling of 1.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from distill_core.model.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Per-pair rotation frequencies, float32 of shape (head_dim // 2,)."""
  if head_dim % 2:
    raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
  if scaling is None or scaling.rope_type == "default":
    return inv_freq
  return _llama3_scaling(inv_freq, scaling)


def _llama3_scaling(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
  low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
  smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos and sin of shape (B, T, D) (the D/2 frequencies repeated twice), float32."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # (B, T, D/2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)  # (B, T, D)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x (B, T, heads, D) by the tables (B, T, D), in x's dtype as Hugging Face does."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin
