"""Sampled teacher targets: N draws per position from softmax(z / tau), made on the device.

Top-k targets tell the student nothing about which tail tokens the teacher
would put mass on. Sampled targets do: for every position, N ids drawn from a
proposal distribution pi = softmax(z / tau) over the real vocabulary (or over
its tail beyond the answer's top-k, `exclude` > 0), and the loss weighs each by
p / pi, an unbiased estimate of the dense KD loss and gradient (see
docs/losses.md, "Sampled KD").

The draws are a pure function of (seed, example id, position, draw index) and
the logits: two uniforms per draw from a threefry-2x32 hash of those integers
(fixed, whatever JAX's default PRNG), mapped through the proposal's CDF. The same example therefore gets the same
samples from a local teacher, a remote server (whatever bucket or row it lands
in) and an offline dump, and a resumed run sees the same draws again.

Output per position (fixed shapes; `M` = the draw slots, >= N):

| field              | shape     | dtype | meaning                                                 |
|--------------------|-----------|-------|---------------------------------------------------------|
| `sample_ids`       | (B, T, M) | int32 | the distinct drawn ids, ascending, then padding (id 0)  |
| `sample_counts`    | (B, T, M) | int32 | how often each was drawn; 0 marks a padding slot        |
| `sample_logits`    | (B, T, M) | f32   | the shifted teacher logit z at each id (0 at padding)   |
| `sample_logsumexp` | (B, T)    | f32   | log sum_{v in support} exp(z_v / tau), pi's normaliser  |

Everything here is `jax.numpy` and runs inside the teacher's jitted forward.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.random as jax_random
import jax.numpy as jnp
import numpy as np

Array = Any

_BLOCK = 128  # ids per block of the two-level inverse CDF


def split_u64(values: Array) -> np.ndarray:
  """Non-negative integers < 2**64 (any shape) -> uint32 pairs [..., (low, high)] (host side)."""
  v = np.asarray(values)
  if v.dtype.kind == "i" and v.size and int(v.min()) < 0:
    raise ValueError(f"expected non-negative integers, got {int(v.min())}")
  v = v.astype(np.uint64)
  return np.stack([(v & np.uint64(0xFFFFFFFF)).astype(np.uint32), (v >> np.uint64(32)).astype(np.uint32)], -1)


def _hash(key: jax.Array, x0: jax.Array, x1: jax.Array) -> jax.Array:
  """Threefry-2x32 of the word pairs (x0[i], x1[i]) under `key` (2,) -> (..., 2) uint32, pair by pair."""
  shape = x0.shape
  out = jax_random.threefry_2x32(key, jnp.concatenate([x0.reshape(-1), x1.reshape(-1)]))
  return jnp.stack([out[:x0.size], out[x0.size:]], axis=-1).reshape(shape + (2,))


def uniforms(seeds: Array, example_ids: Array, seq_len: int, num_draws: int, start: Array = 0) -> jax.Array:
  """(B, T, num_draws, 2) float32 uniforms in [0, 1), from one threefry hash per (seed, example id, t, draw).

  The row key is threefry(seed, example id); draw n at position t takes the two words of
  threefry(row key, (t, n)). Every draw is hashed on its own, so draw n does not depend on
  num_draws, the batch, or the row's place in it.

  Args:
    seeds: (B, 2) uint32 (low, high) words of each row's 64-bit request seed (the threefry key).
    example_ids: (B, 2) uint32 words of each row's example id.
    seq_len: T; position t is start + the column index in the row.
    num_draws: draws per position.
    start: the position of column 0 (a block of positions further along the row; may be traced).
  """
  cols = jnp.asarray(start, jnp.uint32) + jnp.arange(seq_len, dtype=jnp.uint32)
  t = jnp.broadcast_to(cols[:, None], (seq_len, num_draws))
  n = jnp.broadcast_to(jnp.arange(num_draws, dtype=jnp.uint32)[None, :], (seq_len, num_draws))

  def row(seed, eid):
    key = _hash(seed, eid[:1], eid[1:])[0]  # (2,)
    return _hash(key, t, n)  # (T, M, 2)

  bits = jax.vmap(row)(jnp.asarray(seeds, jnp.uint32), jnp.asarray(example_ids, jnp.uint32))
  # 23 random mantissa bits under the exponent of 1.0: a float in [1, 2), minus 1.
  return jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0


def _inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
  """Inverse-CDF picks: weights (R..., C) >= 0 with a positive sum, u (R..., M) in [0, 1) -> (R..., M) int32.

  Index i is picked with probability weights_i / sum(weights); an index of zero weight never
  (a target rounded up to the sum gets the last index of positive weight).
  """
  c = weights.shape[-1]
  cdf = jnp.cumsum(weights, axis=-1)
  target = u * cdf[..., -1:]  # (R..., M)
  # searchsorted(side="right") as one fused compare-and-count: no loop, no (M, C) buffer kept.
  idx = jnp.sum(cdf[..., None, :] <= target[..., :, None], axis=-1, dtype=jnp.int32)
  last = c - 1 - jnp.argmax((weights > 0)[..., ::-1], axis=-1)  # (R...,)
  return jnp.minimum(idx, last[..., None].astype(jnp.int32))


def _per_row(value: Array, batch: int, dtype) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(value, dtype).reshape(-1), (batch,))


def draw_samples(z: jax.Array, topk_ids: jax.Array, *, num_draws: int, num_samples: Array,
                 temperature: Array, exclude: Array, seeds: Array, example_ids: Array, start: Array = 0,
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Distinct sampled ids, their counts, their logits and the proposal's log-normaliser.

  Args:
    z: (B, T, V) teacher logits shifted by the row max, padded ids at -inf.
    topk_ids: (B, T, K) the sorted top-k ids of z (for `exclude`).
    num_draws: M, the draw slots (static; the output's last axis).
    num_samples: N <= M per row (scalar or (B,)); draws beyond it are not made.
    temperature: tau > 0 per row (scalar or (B,)).
    exclude: per row, how many leading top-k ids the proposal leaves out (0: the
      whole real vocabulary; scalar or (B,), each <= K and < the real vocabulary).
    seeds: (B, 2) or (2,) uint32 seed words; example_ids: (B, 2) uint32 id words.
    start: the position of column 0 of z in its rows (z may be one block of positions).

  Returns:
    ids (B, T, M) int32, counts (B, T, M) int32, logits (B, T, M) f32, lse (B, T) f32.
  """
  b, t, v = z.shape
  k = topk_ids.shape[-1]
  n = _per_row(num_samples, b, jnp.int32)[:, None, None]
  inv_tau = 1.0 / _per_row(temperature, b, jnp.float32)[:, None, None]
  skip = _per_row(exclude, b, jnp.int32)[:, None, None]
  seeds = jnp.broadcast_to(jnp.asarray(seeds, jnp.uint32), (b, 2))
  x = z * inv_tau  # (B, T, V), -inf at padded ids
  excluded = jnp.put_along_axis(jnp.zeros(z.shape, bool), topk_ids,
                                jnp.broadcast_to(jnp.arange(k) < skip, topk_ids.shape), axis=-1, inplace=False)
  x = jnp.where(excluded, -jnp.inf, x)
  m = jnp.max(x, axis=-1, keepdims=True)  # finite: the support is never empty
  w = jnp.exp(x - m)  # (B, T, V), exactly 0 outside the support
  # Two levels (a block of _BLOCK ids, then an id in it), each with its own uniform: the float32
  # CDFs are then exact to ~1e-7 of a block's mass rather than of the whole row's.
  nb = -(-v // _BLOCK)
  wb = jnp.pad(w, ((0, 0), (0, 0), (0, nb * _BLOCK - v))).reshape(b, t, nb, _BLOCK)
  block_mass = jnp.sum(wb, axis=-1)  # (B, T, nb)
  total = jnp.sum(block_mass, axis=-1)
  lse = m[..., 0] + jnp.log(total)  # (B, T)
  u = uniforms(seeds, example_ids, t, num_draws, start)  # (B, T, M, 2)
  block = _inverse_cdf(block_mass, u[..., 0])  # (B, T, M)
  in_block = jnp.take_along_axis(wb, block[..., None], axis=2)  # (B, T, M, _BLOCK)
  idx = block * _BLOCK + _inverse_cdf(in_block, u[..., 1:])[..., 0]  # (B, T, M)
  slot = jnp.arange(num_draws, dtype=jnp.int32)
  drawn = jnp.sort(jnp.where(slot < n, idx, v), axis=-1)  # unmade draws (id v) sort last
  is_first = (drawn < v) & jnp.concatenate(
      [jnp.ones((b, t, 1), bool), drawn[..., 1:] != drawn[..., :-1]], axis=-1)
  # A run of equal ids ends where the next run starts (or at the N-th draw).
  starts = jnp.where(is_first, slot, num_draws)
  after = jnp.concatenate([starts[..., 1:], jnp.full((b, t, 1), num_draws, jnp.int32)], axis=-1)
  next_start = jax.lax.cummin(after, axis=2, reverse=True)
  counts = jnp.where(is_first, jnp.minimum(next_start, n) - slot, 0)
  order = jnp.where(is_first, 0, 1)
  _, ids, counts = jax.lax.sort((order, drawn, counts), dimension=2, num_keys=2)
  valid = counts > 0
  ids = jnp.where(valid, ids, 0)
  logits = jnp.where(valid, jnp.take_along_axis(z, ids, axis=-1), 0.0)
  return ids, counts.astype(jnp.int32), logits, lse
