"""Memory-bounded attention in plain XLA: an online softmax over blocks of queries and keys.

The flash-attention algorithm written with `lax.map` (query blocks) around
`lax.fori_loop` (key blocks), so no temporary is larger than one block of
scores, (B, K, G, block_q, block_k) float32, whatever the sequence length.
Key blocks that lie wholly in a query block's future are never visited (the
loops' bounds depend on the block index), which halves the work of a causal
row. The backward pass is a `jax.custom_vjp` that keeps only the output and the
per-row log-sum-exp (B, K, G, T) and recomputes each block's scores, as
FlashAttention-2 does: one pass over blocks for dq, one for dk and dv.

Semantics of the core (`_flash`): query i attends to key j iff j <= i and both
carry the same non-zero segment id; a row with nothing to attend to (segment 0,
padding) returns zeros and passes no gradient. `attention.fill_padding_rows`
then gives those rows the reference's output.

    q (B, T, K, G, D), k/v (B, S, K, D), segment ids (B, T) / (B, S) -> (B, T, K, G, D)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Scores of masked pairs. Finite, so a block with nothing to attend to keeps a finite running max
# (and the dense reference turns a row with nothing to attend to into a uniform average, not NaN).
MASKED_SCORE = float(jnp.finfo(jnp.float32).min)
_F32 = jnp.float32


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                      block_q: int = 512, block_k: int = 512) -> jax.Array:
  """Causal grouped-query attention within segments, in blocks.

  q (B, T, H, D), k/v (B, T, K, D), segment_ids (B, T) -> (B, T, H, D) in q's dtype.
  Rows of segment 0 come out as zeros (see module docstring). T need not be a
  multiple of the blocks: queries and keys are padded with segment 0, which
  nothing attends to.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  bq, bk = min(block_q, t), min(block_k, t)
  tq, tk = -(-t // bq) * bq, -(-t // bk) * bk
  qg = _pad(q.reshape(b, t, kv, h // kv, d), tq)  # (B, Tq, K, G, D)
  out = _flash(qg, _pad(k, tk), _pad(v, tk), _pad(segment_ids, tq), _pad(segment_ids, tk), bq, bk)
  return out[:, :t].reshape(b, t, h, d)


def _pad(x: jax.Array, length: int) -> jax.Array:
  extra = length - x.shape[1]
  return x if not extra else jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))


def _block(x: jax.Array, i, size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


def _n_key_blocks(i, bq: int, bk: int, nk: int):
  """Key blocks 0 .. n-1 hold every key at or before query block i's last query."""
  return jnp.minimum(nk, ((i + 1) * bq - 1) // bk + 1)


def _first_query_block(j, bq: int, bk: int):
  """Query blocks before this one lie wholly before key block j's first key."""
  return (j * bk) // bq


def _scores(qi, kj, sq, sk, i, j, bq: int, bk: int):
  """Scaled scores (B, K, G, bq, bk) float32 and the mask (B, 1, 1, bq, bk) of one block pair."""
  scale = qi.shape[-1] ** -0.5
  s = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=_F32) * scale
  q_idx = i * bq + jnp.arange(bq)
  k_idx = j * bk + jnp.arange(bk)
  causal = q_idx[:, None] >= k_idx[None, :]  # (bq, bk)
  same = (sq[:, :, None] == sk[:, None, :]) & (sq != 0)[:, :, None]  # (B, bq, bk)
  return s, (causal[None] & same)[:, None, None]


def _forward(q, k, v, seg_q, seg_k, bq: int, bk: int):
  """Returns out (B, Tq, K, G, D) in q's dtype and lse (B, K, G, Tq) float32."""
  b, tq, kv, g, d = q.shape
  nq, nk = tq // bq, k.shape[1] // bk

  def query_block(i):
    qi, sq = _block(q, i, bq), _block(seg_q, i, bq)

    def key_block(j, carry):
      m, l, acc = carry  # (B, K, G, bq), (B, K, G, bq), (B, K, G, bq, D)
      kj, vj = _block(k, j, bk), _block(v, j, bk)
      s, mask = _scores(qi, kj, sq, _block(seg_k, j, bk), i, j, bq, bk)
      m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASKED_SCORE), axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vj, preferred_element_type=_F32)
      return m_new, l, acc * corr[..., None] + pv

    init = (jnp.full((b, kv, g, bq), MASKED_SCORE, _F32), jnp.zeros((b, kv, g, bq), _F32),
            jnp.zeros((b, kv, g, bq, d), _F32))
    m, l, acc = jax.lax.fori_loop(0, _n_key_blocks(i, bq, bk, nk), key_block, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return jnp.moveaxis(out, 3, 1).astype(q.dtype), lse  # (B, bq, K, G, D), (B, K, G, bq)

  out, lse = jax.lax.map(query_block, jnp.arange(nq))  # (nq, B, bq, K, G, D), (nq, B, K, G, bq)
  out = jnp.moveaxis(out, 0, 1).reshape(b, tq, kv, g, d)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv, g, tq)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, seg_q, seg_k, bq: int, bk: int):
  return _forward(q, k, v, seg_q, seg_k, bq, bk)[0]


def _flash_fwd(q, k, v, seg_q, seg_k, bq, bk):
  out, lse = _forward(q, k, v, seg_q, seg_k, bq, bk)
  return out, (q, k, v, seg_q, seg_k, out, lse)


def _flash_bwd(bq, bk, res, dout):
  q, k, v, seg_q, seg_k, out, lse = res
  b, tq, kv, g, d = q.shape
  nq, nk = tq // bq, k.shape[1] // bk
  scale = d ** -0.5
  delta = jnp.einsum("bqkgd,bqkgd->bkgq", dout.astype(_F32), out.astype(_F32))  # (B, K, G, Tq)

  def probs(i, j):
    """This block pair's probabilities p and score gradients ds, (B, K, G, bq, bk) float32."""
    qi, doi = _block(q, i, bq), _block(dout, i, bq)
    kj, vj = _block(k, j, bk), _block(v, j, bk)
    s, mask = _scores(qi, kj, _block(seg_q, i, bq), _block(seg_k, j, bk), i, j, bq, bk)
    lse_i = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
    delta_i = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
    p = jnp.where(mask, jnp.exp(s - lse_i[..., None]), 0.0)
    dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=_F32)
    return p, p * (dp - delta_i[..., None]), qi, doi, kj

  def dq_block(i):
    def key_block(j, dq):
      _, ds, _, _, kj = probs(i, j)
      return dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=_F32)

    dq = jax.lax.fori_loop(0, _n_key_blocks(i, bq, bk, nk), key_block, jnp.zeros((b, bq, kv, g, d), _F32))
    return dq * scale

  def dkv_block(j):
    def query_block(i, carry):
      dk, dv = carry
      p, ds, qi, doi, _ = probs(i, j)
      dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(v.dtype), doi, preferred_element_type=_F32)
      dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=_F32)
      return dk, dv

    zeros = jnp.zeros((b, bk, kv, d), _F32)
    dk, dv = jax.lax.fori_loop(_first_query_block(j, bq, bk), nq, query_block, (zeros, zeros))
    return dk * scale, dv

  dq = jax.lax.map(dq_block, jnp.arange(nq))  # (nq, B, bq, K, G, D)
  dk, dv = jax.lax.map(dkv_block, jnp.arange(nk))  # (nk, B, bk, K, D) each
  dq = jnp.moveaxis(dq, 0, 1).reshape(q.shape).astype(q.dtype)
  dk = jnp.moveaxis(dk, 0, 1).reshape(k.shape).astype(k.dtype)
  dv = jnp.moveaxis(dv, 0, 1).reshape(v.shape).astype(v.dtype)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
