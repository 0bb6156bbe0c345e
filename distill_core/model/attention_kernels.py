"""Vendor attention kernels behind the model's attention call: TPU splash, GPU cuDNN.

Both take q (B, T, H, D), k/v (B, T, K, D), segment_ids (B, T) and return
(B, T, H, D) with the mask of `attention.attention_mask` at every real row;
rows of segment 0 may hold anything finite (`attention.fill_padding_rows`
overwrites them).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from distill_core.sharding import batch_sharding

log = logging.getLogger(__name__)

SPLASH_LANES = 128  # splash blocks (and so the padded sequence) are multiples of the TPU lane width
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's fused attention has no float32 kernel
CUDNN_MAX_HEAD_DIM = 128


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *, block: int = 512,
                     interpret: bool | None = None) -> jax.Array:
  """Pallas splash attention: causal mask, segment ids, grouped-query heads.

  The sequence is padded with segment 0 to a multiple of the block (itself a
  multiple of 128). Under a mesh (`jax.set_mesh`) the kernel runs in
  `shard_map` over the batch axes of `distill_core.sharding.batch_sharding`;
  heads and sequence stay whole on each device. `interpret=None` picks by the
  platform the program is lowered for (`lax.platform_dependent`): the Mosaic
  kernel for TPU, even when compiling ahead of time on a CPU host, and the
  Pallas interpreter elsewhere; True/False force one.
  """
  # The TPU splash kernels (Pallas/Mosaic, about 0.1 s to import) load only when a model selects them.
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  b, t, h, d = q.shape
  blk = min(-(-block // SPLASH_LANES), -(-t // SPLASH_LANES)) * SPLASH_LANES
  tp = -(-t // blk) * blk
  pad = [(0, 0), (0, tp - t)]
  seg = jnp.pad(segment_ids.astype(jnp.int32), pad)  # (B, Tp)
  # Splash does not scale the scores; heads first: (B, H, Tp, D) and (B, K, Tp, D).
  q = jnp.pad((q.astype(jnp.float32) * d ** -0.5).astype(q.dtype), pad + [(0, 0)] * 2).transpose(0, 2, 1, 3)
  k = jnp.pad(k, pad + [(0, 0)] * 2).transpose(0, 2, 1, 3)
  v = jnp.pad(v, pad + [(0, 0)] * 2).transpose(0, 2, 1, 3)

  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((tp, tp)) for _ in range(h)])
  sizes = splash.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                            block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)

  def run(q, k, v, seg, interpret):
    kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    return jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(q=s, kv=s)))(q, k, v, seg)

  def per_device(q, k, v, seg):
    if interpret is not None:
      return run(q, k, v, seg, interpret)
    return jax.lax.platform_dependent(q, k, v, seg, tpu=lambda *a: run(*a, False),
                                      default=lambda *a: run(*a, True))

  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.axis_sizes) == 1:
    out = per_device(q, k, v, seg)
  else:
    batch = _batch_axes(mesh, b)
    spec4, spec2 = PartitionSpec(batch, None, None, None), PartitionSpec(batch, None)
    out = jax.shard_map(per_device, mesh=mesh, in_specs=(spec4, spec4, spec4, spec2), out_specs=spec4,
                        check_vma=False)(q, k, v, seg)
  return out.transpose(0, 2, 1, 3)[:, :t]  # (B, T, H, D)


def _batch_axes(mesh, batch: int):
  """The mesh axes the project shards a batch over (kept only when they divide it)."""
  axes = batch_sharding(mesh, 2).spec[0]
  flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
  flat = tuple(a for a in flat if a in mesh.axis_names)
  size = math.prod(mesh.shape[a] for a in flat)
  return flat if flat and batch % size == 0 else None


def single_sequence_rows(segment_ids: jax.Array) -> jax.Array:
  """Scalar bool: every row is one sequence from index 0, then only padding (what lengths express)."""
  real = segment_ids != 0
  one_id = jnp.all((segment_ids == segment_ids[:, :1]) | ~real)
  padding_last = jnp.all(real[:, :-1] | ~real[:, 1:])
  return one_id & padding_last & jnp.all(real[:, 0])


@functools.cache
def _log_fallback(why: str) -> None:
  log.info("attention 'cudnn' runs the chunked kernel: %s", why)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                    fallback: Callable[[], jax.Array], implementation: str = "cudnn",
                    force: bool = False) -> jax.Array:
  """cuDNN fused attention where it can express the mask, else `fallback()`.

  `jax.nn.dot_product_attention` expresses causal masking plus one valid
  length per row, not packed segments, so a batch runs on cuDNN only when
  every row holds one sequence followed by padding (checked on device with
  `lax.cond`); packed batches take `fallback`. Off GPU, or for dtypes and head
  sizes cuDNN lacks (float32, D > 128), the fallback always runs.
  `implementation`/`force` let tests drive the same branch with JAX's XLA kernel.
  """
  d = q.shape[-1]
  why = None
  if not force and jax.default_backend() != "gpu":
    why = f"backend is {jax.default_backend()}"
  elif implementation == "cudnn" and (q.dtype not in CUDNN_DTYPES or d > CUDNN_MAX_HEAD_DIM or d % 8):
    why = f"cuDNN has no kernel for {q.dtype} with head_dim {d}"
  if why:
    _log_fallback(why)
    return fallback()
  lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)  # (B,)

  def fused():
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=lengths,
                                        key_value_seq_lengths=lengths, implementation=implementation)

  return jax.lax.cond(single_sequence_rows(segment_ids), fused, fallback)

