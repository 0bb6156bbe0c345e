"""Grouped-query self-attention over packed sequences.

Masking comes from segment ids (B, T): query i attends to key j iff j <= i
(by index in the packed row) and both carry the same non-zero segment id.
Segment 0 is padding; such a row attends to nothing and, in every kernel,
returns the uniform average of all values (what a softmax over equal masked
scores gives). `attend` chooses the kernel (`ModelConfig.attention`):

    xla      dense reference, float32 scores (B, K, G, T, S): O(T^2) memory
    chunked  online softmax over blocks (attention_chunked.py): O(T) memory
    splash   TPU Pallas splash attention (attention_kernels.py)
    cudnn    GPU cuDNN fused attention where the rows allow it, else chunked
    auto     splash on TPU, cudnn on GPU, elsewhere xla up to DENSE_MAX_LEN tokens, chunked above

The four projections (`q_proj`, `k_proj`, `v_proj`, `o_proj`) are plain
attributes: any module with the same call signature can replace them, e.g. a
module whose kernel is computed from frozen teacher kernels (learn-to-init).

    q/k/v: x (B, T, E)       -> (B, T, heads, D)
    o:     y (B, T, H, D)    -> (B, T, E)
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from distill_core.model.attention_chunked import MASKED_SCORE, chunked_attention
from distill_core.model.attention_kernels import cudnn_attention, splash_attention
from distill_core.model.config import AttentionImpl, ModelConfig
from distill_core.model.layers import HeadProj, OutProj
from distill_core.model.rope import apply_rope

log = logging.getLogger(__name__)



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


def fill_padding_rows(out: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Gives rows of segment 0 the reference's output, the mean of all values.

  out (B, T, H, D), v (B, S, K, D), segment_ids (B, T). The kernels may return
  anything finite at padding rows; their outputs are replaced here, so the
  gradient reaching the kernel at those rows is zero.
  """
  h, kv = out.shape[2], v.shape[2]
  mean = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), h // kv, axis=1)  # (B, H, D)
  return jnp.where((segment_ids == 0)[:, :, None, None], mean[:, None].astype(out.dtype), out)


# With `auto` off TPU and GPU, sequences up to this length run the dense `xla` kernel. On a CPU host
# a tiny model's forward + backward step is about as fast with either kernel at 128 tokens, faster
# with `xla` below (the test and demo lengths) and faster with `chunked` above (its backward
# recomputes blocks instead of reading saved T x T probabilities, and skips future key blocks).
DENSE_MAX_LEN = 128


def target_platform() -> str:
  """The platform a program is being built for: the devices of the mesh set with `jax.set_mesh` (so
  ahead-of-time compilation for a TPU topology on a CPU host counts as TPU), else JAX's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def resolve_attention(impl: AttentionImpl, seq_len: int, platform: str | None = None) -> str:
  """The kernel `auto` stands for on `platform` (default: `target_platform()`) at this length."""
  if impl != "auto":
    return impl
  platform = platform or target_platform()
  if platform == "tpu":
    return "splash"
  if platform in ("gpu", "cuda"):
    return "cudnn"
  return "xla" if seq_len <= DENSE_MAX_LEN else "chunked"


@functools.cache
def _log_choice(impl: str, name: str, seq_len: int) -> None:
  log.debug("attention %r runs the %r kernel (T=%d)", impl, name, seq_len)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, impl: AttentionImpl = "xla",
           chunk: int = 512) -> jax.Array:
  """Causal grouped-query attention within segments with the chosen kernel.

  q (B, T, H, D), k/v (B, T, K, D), segment_ids (B, T) -> (B, T, H, D). Every
  kernel gives the reference's result (float32: within rounding).
  """
  t = q.shape[1]
  name = resolve_attention(impl, t)
  _log_choice(impl, name, t)  # once per choice and length, at trace time
  if name == "xla":
    return dot_product_attention(q, k, v, attention_mask(segment_ids))
  if name == "chunked":
    out = chunked_attention(q, k, v, segment_ids, block_q=chunk, block_k=chunk)
  elif name == "splash":
    out = splash_attention(q, k, v, segment_ids, block=chunk)
  elif name == "cudnn":
    out = cudnn_attention(q, k, v, segment_ids, fallback=lambda: chunked_attention(
        q, k, v, segment_ids, block_q=chunk, block_k=chunk))
  else:
    raise ValueError(f"unknown attention implementation {name!r}")
  return fill_padding_rows(out, v, segment_ids)


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
    self.impl, self.chunk = cfg.attention, cfg.attention_chunk

  def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, T, E), rope tables (B, T, D) -> rotated q (B, T, H, D), rotated k and v (B, T, K, D).

    What a KV cache stores (`distill_core.model.generate`) is this k and v.
    """
    q = checkpoint_name(apply_rope(self.q_proj(x), cos, sin), "query_proj")  # (B, T, H, D)
    k = checkpoint_name(apply_rope(self.k_proj(x), cos, sin), "key_proj")  # (B, T, K, D)
    v = checkpoint_name(self.v_proj(x), "value_proj")  # (B, T, K, D)
    return q, k, v

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """x (B, T, E), rope tables (B, T, D), segment_ids (B, T) -> (B, T, E)."""
    q, k, v = self.qkv(x, cos, sin)
    y = attend(q, k, v, segment_ids, impl=self.impl, chunk=self.chunk)
    return self.o_proj(y)  # (B, T, E)
