"""Distillation losses: pure, jit-friendly array functions returning `(loss, metrics)`.

Every loss returns a `MaskedSum` (the masked sum over tokens and the token
count) plus a dict of `MaskedSum` metrics, so gradient accumulation can add
micro-batches and divide once: sum of losses / sum of tokens, never a mean of
means. `combine` forms total = alpha * kd + (1 - alpha) * ce + beta * feature.
Metric names are plain (`kd_loss`); the trainer adds `train/` or `eval/`.

Memory: the student's full-vocabulary log-probabilities are never stored. Each
loss reduces the logits to a per-position row max and log-partition (XLA fuses
the elementwise work into the reduction) and gathers the few logits it needs;
see docs/losses.md for the formulas. The train step goes further with
`fused_logit_losses`: the lm_head runs inside the loss per chunk of positions
(`chunked`), so the (B, T, V) logits and their gradient never exist whole.
"""

from __future__ import annotations

import fractions
import math
from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pydantic
from pydantic import Field

from distill_core.config import ConfigBase
from distill_core.parts.samples import SampleRequest
from distill_core.targets import TeacherTargets
from student_trainer.schedules import Schedule, constant

Array = jax.Array
_EPS = 1e-8  # smallest vector norm in the cosine distance
_TAIL_FLOOR = 1e-30  # floor of the student's tail sum (all-underflow rows stay finite)

KDMode = Literal["tail", "renormalize", "topk", "sampled", "reverse_kl", "gkd"]
# Modes whose loss reads the teacher's scores at given ids (the sampled token, the student's top-k) on the
# student's own samples (`losses_on_policy`): the train loop asks the source for them
# (`TeacherSource.submit(..., part_inputs=...)`) on on-policy steps; other steps use `off_policy_kd_mode`.
SCORED_KD_MODES = ("reverse_kl", "gkd")
OffPolicyKDMode = Literal["tail", "renormalize", "topk"]
ReverseKLEstimator = Literal["sampled", "union"]
FeatureKind = Literal["cosine", "l2"]
Phase = Literal["kd", "blockwise"]  # the objective of one optimizer step (LossConfig.phase_at)


@flax.struct.dataclass
class MaskedSum:
  """A token-masked sum and the number of tokens it covers (both f32 scalars)."""

  sum: Array
  count: Array

  def mean(self, count: Array | None = None) -> Array:
    """sum / count (or the given count, e.g. the whole accumulated batch's); 0 when empty."""
    denom = self.count if count is None else jnp.asarray(count, jnp.float32)
    return jnp.where(denom > 0, self.sum / jnp.where(denom > 0, denom, 1.0), 0.0)

  def __add__(self, other: "MaskedSum") -> "MaskedSum":
    return MaskedSum(self.sum + other.sum, self.count + other.count)


def masked_sum(per_token: Array, loss_mask: Array) -> MaskedSum:
  """Sums (B, T) values where `loss_mask` > 0 (weighted by it); other positions never leak NaN."""
  w = loss_mask.astype(jnp.float32)
  return MaskedSum(jnp.sum(jnp.where(w > 0, per_token * w, 0.0)), jnp.sum(w))


def means(metrics: dict[str, MaskedSum], count: Array | None = None) -> dict[str, Array]:
  """The token-weighted mean of every metric."""
  return {name: value.mean(count) for name, value in metrics.items()}


def _mask_padded(logits: Array, true_vocab_size: int | None) -> Array:
  """Logits with ids >= true_vocab_size at -inf (an added (V,) bias, which XLA fuses)."""
  vocab = logits.shape[-1]
  if true_vocab_size is None or true_vocab_size >= vocab:
    return logits
  return logits + jnp.where(jnp.arange(vocab) < true_vocab_size, 0.0, -jnp.inf)


def _normaliser(logits: Array, inv_t: Array) -> tuple[Array, Array]:
  """(m, lse): the row max (B, T, 1), without gradient, and log sum_v exp((s_v - m) / T) (B, T).

  log q_v = (s_v - m) / T - lse. One fused reduction: the (B, T, V) log-probs
  are never stored.
  """
  m = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  return m, jnp.log(jnp.sum(jnp.exp((logits - m) * inv_t), axis=-1))


def ce(student_logits: Array, labels: Array, loss_mask: Array, *,
       true_vocab_size: int | None = None) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """Next-token cross-entropy on hard labels (B, T); padded vocabulary ids are excluded."""
  s = _mask_padded(student_logits.astype(jnp.float32), true_vocab_size)
  m, lse = _normaliser(s, 1.0)
  safe = jnp.clip(jnp.where(loss_mask > 0, labels, 0), 0, s.shape[-1] - 1)
  s_label = jnp.take_along_axis(s, safe[..., None], axis=-1)[..., 0]  # (B, T)
  return masked_sum(lse - (s_label - m[..., 0]), loss_mask), {}


def kd_dense(student_logits: Array, teacher_logits: Array, loss_mask: Array, *, temperature: Any,
             true_vocab_size: int | None = None) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """T^2 * KL(softmax(z/T) || softmax(s/T)) over the real vocabulary (forward KL)."""
  inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)
  s = _mask_padded(student_logits.astype(jnp.float32), true_vocab_size)
  z = _mask_padded(jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)), true_vocab_size)
  (ms, lse_s), (mz, lse_z) = _normaliser(s, inv_t), _normaliser(z, inv_t)
  # log p_v - log q_v = d_v - lse_z + lse_s with d = ((z - m_z) - (s - m_s)) / T, and sum_v p_v = 1.
  d = jnp.where(jnp.isfinite(z), ((z - mz) - (s - ms)) * inv_t, 0.0)  # (B, T, V)
  p = jnp.exp((z - mz) * inv_t - lse_z[..., None])
  kl = jnp.sum(p * d, axis=-1) - lse_z + lse_s
  return masked_sum(kl / (inv_t * inv_t), loss_mask), {}


@flax.struct.dataclass
class _Sparse:
  """What the KD modes need; (B, T, k) fields are zero where not kept."""

  keep: Array  # bool: in the support S (valid, and inside the top-p prefix)
  log_p: Array  # teacher z_i / T - lse_t (exact log-probability)
  zt: Array  # teacher z_i / T (z shifted: entry 0 is the max, 0)
  lse_t: Array  # (B, T) teacher log sum_v exp(z_v / T)
  xs: Array  # student (s_i - m) / T
  lse_s: Array  # (B, T) student log sum_v exp((s_v - m) / T)
  logits: Array  # (B, T, V) student logits, padded ids at -inf
  m: Array  # (B, T, 1) student row max
  inv_t: Array  # () 1 / T
  ids: Array  # (B, T, k) teacher ids
  n_real: int = flax.struct.field(pytree_node=False)  # real vocabulary size (static)

  def student_log_tail(self) -> Array:
    """log sum_{v not in S} q_v, summed over the vocabulary (exact however close sum_S q is to 1)."""
    in_s = jnp.put_along_axis(jnp.zeros(self.logits.shape, bool), self.ids, self.keep, axis=-1, inplace=False)
    tail = jnp.sum(jnp.where(in_s, 0.0, jnp.exp((self.logits - self.m) * self.inv_t)), axis=-1)
    return jnp.log(jnp.maximum(tail, _TAIL_FLOOR)) - self.lse_s


def _teacher_tail(zt: Array, keep: Array, lse_t: Array) -> Array:
  """r = 1 - sum_S p_i = (expm1(lse_t) - expm1(zt_0) - sum_{S, i > 0} exp(zt_i)) * exp(-lse_t), >= 0.

  The top entry (zt_0 = 0) enters as expm1 so the difference keeps its
  precision when one token dominates.
  """
  first = jnp.arange(zt.shape[-1]) == 0
  mass_m1 = jnp.sum(jnp.where(keep, jnp.where(first, jnp.expm1(zt), jnp.exp(zt)), 0.0), axis=-1)
  return jnp.maximum(jnp.expm1(lse_t) - mass_m1, 0.0) * jnp.exp(-lse_t)


def _tail_kl(t: _Sparse) -> Array:
  """k+1 categories: the support plus one tail bucket, exact on both sides."""
  p = jnp.where(t.keep, jnp.exp(t.log_p), 0.0)
  top = jnp.sum(p * (t.log_p - (t.xs - t.lse_s[..., None])), axis=-1)
  # The bucket is empty when S covers the whole real vocabulary (then r is rounding noise).
  r = jnp.where(jnp.sum(t.keep, axis=-1) < t.n_real, _teacher_tail(t.zt, t.keep, t.lse_t), 0.0)
  log_r = jnp.log(jnp.where(r > 0, r, 1.0))
  return top + jnp.where(r > 0, r * (log_r - t.student_log_tail()), 0.0)


def _renormalized_kl(t: _Sparse) -> Array:
  """Teacher and student both renormalised over the support S."""
  def renorm(x):
    lse = jax.nn.logsumexp(jnp.where(t.keep, x, -jnp.inf), axis=-1, keepdims=True)
    return jnp.where(t.keep, x - lse, 0.0)
  log_p, log_q = renorm(t.zt), renorm(t.xs)
  return jnp.sum(jnp.where(t.keep, jnp.exp(log_p) * (log_p - log_q), 0.0), axis=-1)


def _topk_kl(t: _Sparse) -> Array:
  """sum_{i in S} p_i (log p_i - log q_i), exact p, full-vocabulary q, no tail term."""
  p = jnp.where(t.keep, jnp.exp(t.log_p), 0.0)
  return jnp.sum(p * (t.log_p - (t.xs - t.lse_s[..., None])), axis=-1)


SPARSE_MODES: dict[str, Callable[[_Sparse], Array]] = {
    "tail": _tail_kl, "renormalize": _renormalized_kl, "topk": _topk_kl}


def _column(targets: TeacherTargets, temperature: Any) -> tuple[Array, Array]:
  """(index, gap): the logsumexp column nearest `temperature` (column 0 when None)."""
  temps = jnp.asarray(targets.temperatures, jnp.float32)
  if temperature is None:
    return jnp.asarray(0), jnp.asarray(0.0, jnp.float32)
  try:  # concrete on both sides: refuse a temperature the teacher did not compute
    targets.temperature_index(float(np.asarray(temperature)))
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError):
    pass
  gaps = jnp.abs(temps - jnp.asarray(temperature, jnp.float32))
  idx = jnp.argmin(gaps)
  return idx, gaps[idx]


def kd_sampled(student_logits: Array, targets: TeacherTargets, loss_mask: Array, *,
               temperature: Any = None, k: int | None = None, true_vocab_size: int | None = None,
               ) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """T^2 * an unbiased estimate of KL(teacher || student) from exact top-k ids plus teacher samples.

  The exact set E is the first `k` top-k ids (all `targets.sample_skip` of them when the
  samples were drawn outside the top-k; None: the same, or none). Every other id enters
  through the samples, each weighted by p / pi, the teacher's probability at the loss
  temperature over the proposal's (see docs/losses.md, "Sampled KD"):

    kl = sum_{i in E} p_i (log p_i - log q_i)
         + (1 / N) sum_j c_j [u_j not in E] (p_j / pi_j) (log p_j - log q_j)

  Returns:
    (loss, metrics): `teacher_tail_mass` (exact 1 - sum_E p), `sampled_tail_mass` (its
    estimate from the samples, (1/N) sum_j c_j [u_j not in E] p_j / pi_j), `kd_support`
    (exact ids plus distinct samples used) and `temperature_gap`.
  """
  if not targets.has_samples:
    raise ValueError("sample_ids: kd_mode 'sampled' needs sampled teacher targets (loss.num_samples > 0)")
  skip = targets.sample_skip
  if skip and k is not None and k != skip:
    raise ValueError(f"k: the samples were drawn outside the first {skip} top-k ids, so the loss must treat "
                     f"exactly those {skip} ids exactly (got k={k})")
  n_exact = skip or (k or 0)
  if n_exact > targets.k:
    raise ValueError(f"k: {n_exact} exact ids wanted, the teacher sent {targets.k}")
  col, gap = _column(targets, temperature)
  temp = jnp.asarray(targets.temperatures, jnp.float32)[col]
  inv_t = 1.0 / temp
  inv_tau = 1.0 / jnp.asarray(targets.sample_temperature, jnp.float32)
  stop = jax.lax.stop_gradient
  counted = loss_mask > 0
  lse_t = jnp.where(counted, stop(jnp.take(targets.logsumexp, col, axis=-1)), 0.0)  # (B, T)
  s = _mask_padded(student_logits.astype(jnp.float32), true_vocab_size)
  m, lse_s = _normaliser(s, inv_t)

  def log_q(ids):
    return (jnp.take_along_axis(s, ids, axis=-1) - m) * inv_t - lse_s[..., None]

  # Exact part over E (like `topk`), neutralised at masked positions.
  ids_e = jnp.where(counted[..., None], targets.topk_ids[..., :n_exact], 0)
  z_e = stop(targets.topk_logits[..., :n_exact].astype(jnp.float32))
  valid_e = jnp.isfinite(z_e) & counted[..., None]
  log_p_e = jnp.where(valid_e, z_e * inv_t - lse_t[..., None], 0.0)
  p_e = jnp.where(valid_e, jnp.exp(log_p_e), 0.0)
  exact = jnp.sum(jnp.where(valid_e, p_e * (log_p_e - log_q(ids_e)), 0.0), axis=-1)
  # Sampled part: distinct ids u_j drawn c_j times out of N.
  counts = jnp.where(counted[..., None], stop(targets.sample_counts), 0).astype(jnp.float32)
  ids_s = jnp.where(counts > 0, targets.sample_ids, 0)
  if n_exact > skip:  # a proposal over the whole vocabulary: drop the draws that landed in E
    in_e = jnp.any((ids_s[..., :, None] == ids_e[..., None, :]) & valid_e[..., None, :], axis=-1)
    counts = jnp.where(in_e, 0.0, counts)
  used = counts > 0
  n = jnp.sum(jnp.where(counted[..., None], stop(targets.sample_counts), 0), axis=-1).astype(jnp.float32)
  z_s = jnp.where(used, stop(targets.sample_logits.astype(jnp.float32)), 0.0)
  lse_pi = jnp.where(counted, stop(targets.sample_logsumexp), 0.0)
  log_p_s = z_s * inv_t - lse_t[..., None]
  log_w = log_p_s - (z_s * inv_tau - lse_pi[..., None])  # log p / pi
  frac = jnp.where(used, counts * jnp.exp(log_w), 0.0) / jnp.maximum(n, 1.0)[..., None]  # (B, T, S)
  sampled = jnp.sum(jnp.where(used, frac * (log_p_s - log_q(ids_s)), 0.0), axis=-1)
  kl = exact + sampled
  if n_exact:
    tail = _teacher_tail(jnp.where(valid_e, z_e * inv_t, 0.0), valid_e, lse_t)
  else:
    tail = jnp.ones_like(kl)
  metrics = {"teacher_tail_mass": masked_sum(tail, loss_mask),
             "sampled_tail_mass": masked_sum(jnp.sum(frac, axis=-1), loss_mask),
             "kd_support": masked_sum((jnp.sum(valid_e, axis=-1) + jnp.sum(used, axis=-1)).astype(jnp.float32),
                                      loss_mask),
             "temperature_gap": masked_sum(jnp.broadcast_to(gap, kl.shape), loss_mask)}
  return masked_sum(kl * (temp * temp), loss_mask), metrics


def kd_sparse(student_logits: Array, targets: TeacherTargets, loss_mask: Array, *,
              mode: KDMode = "tail", temperature: Any = None, top_p: float | None = None,
              k: int | None = None, true_vocab_size: int | None = None,
              ) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """T^2 * KL(teacher || student) from sparse teacher targets (see docs/losses.md).

  Args:
    student_logits: (B, T, V) student logits.
    targets: the teacher's top-k ids, shifted logits and logsumexp.
    loss_mask: (B, T); positions with 0 are ignored.
    mode: `tail`, `renormalize`, `topk` or `sampled` (`kd_sampled`; top_p is not used).
    temperature: the temperature in use; the loss takes the logsumexp column
      whose temperature is nearest and uses that column's temperature on both
      sides (`temperature_gap` reports the distance; concrete values that match
      no column raise ValueError). None: column 0.
    top_p: keep the shortest prefix of the top-k whose exact cumulative teacher
      probability reaches top_p (at least one id); None, 0 or 1 disables.
    k: use only the first k teacher ids (static; default all).
    true_vocab_size: student logits of ids >= this are excluded.

  Returns:
    (loss, metrics) with metrics `teacher_tail_mass` (1 - sum of the teacher's
    top-k probabilities), `kd_support` (ids kept per position) and
    `temperature_gap`.
  """
  if mode == "sampled":
    return kd_sampled(student_logits, targets, loss_mask, temperature=temperature, k=k,
                      true_vocab_size=true_vocab_size)
  if mode not in SPARSE_MODES:
    raise ValueError(f"mode: {mode!r} not in {', '.join(SPARSE_MODES)}, sampled")
  if top_p is not None and not 0.0 <= top_p <= 1.0:
    raise ValueError(f"top_p: {top_p} not in [0, 1]")
  if k is not None and not 0 < k <= targets.k:
    raise ValueError(f"k: {k} not in [1, {targets.k}] (the teacher sent {targets.k} ids)")
  col, gap = _column(targets, temperature)
  temp = jnp.asarray(targets.temperatures, jnp.float32)[col]
  inv_t = 1.0 / temp
  ids = targets.topk_ids[..., :k] if k else targets.topk_ids  # (B, T, k)
  z = jax.lax.stop_gradient(targets.topk_logits[..., :ids.shape[-1]].astype(jnp.float32))
  lse_t = jax.lax.stop_gradient(jnp.take(targets.logsumexp, col, axis=-1))  # (B, T)
  # Masked positions may hold anything (NaN, ids outside the vocabulary): neutralise them.
  counted = loss_mask > 0
  ids = jnp.where(counted[..., None], ids, jnp.arange(ids.shape[-1], dtype=ids.dtype))
  lse_t = jnp.where(counted, lse_t, 0.0)
  valid = jnp.isfinite(z) & counted[..., None]
  zt = jnp.where(valid, z * inv_t, 0.0)
  log_p = jnp.where(valid, zt - lse_t[..., None], 0.0)
  p = jnp.where(valid, jnp.exp(log_p), 0.0)
  keep = valid
  if top_p is not None and 0.0 < top_p < 1.0:
    keep = valid & (jnp.cumsum(p, axis=-1) - p < top_p)
  s = _mask_padded(student_logits.astype(jnp.float32), true_vocab_size)
  m, lse_s = _normaliser(s, inv_t)
  xs = jnp.where(keep, (jnp.take_along_axis(s, ids, axis=-1) - m) * inv_t, 0.0)  # (B, T, k)
  terms = _Sparse(keep=keep, log_p=jnp.where(keep, log_p, 0.0), zt=jnp.where(keep, zt, 0.0), lse_t=lse_t,
                  xs=xs, lse_s=lse_s, logits=s, m=m, inv_t=inv_t, ids=ids,
                  n_real=min(true_vocab_size or s.shape[-1], s.shape[-1]))
  kl = SPARSE_MODES[mode](terms)  # (B, T)
  metrics = {"teacher_tail_mass": masked_sum(_teacher_tail(zt, valid, lse_t), loss_mask),
             "kd_support": masked_sum(jnp.sum(keep, axis=-1).astype(jnp.float32), loss_mask),
             "temperature_gap": masked_sum(jnp.broadcast_to(gap, kl.shape), loss_mask)}
  return masked_sum(kl * (temp * temp), loss_mask), metrics


def _cosine_distance(s: Array, t: Array) -> Array:
  norm = lambda x: jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), _EPS * _EPS))
  return 1.0 - jnp.sum(s * t, axis=-1) / (norm(s) * norm(t))


def _l2_distance(s: Array, t: Array) -> Array:
  return jnp.mean(jnp.square(s - t), axis=-1)


FEATURE_KINDS: dict[str, Callable[[Array, Array], Array]] = {"cosine": _cosine_distance, "l2": _l2_distance}


def feature_loss(student_states: Array, teacher_states: Array, loss_mask: Array, *,
                 kind: FeatureKind = "cosine") -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """Distance between (L, B, T, E) student and teacher states, averaged over layers, per token.

  `cosine`: 1 - cos(s, t); `l2`: mean over E of (s - t)^2.
  """
  if kind not in FEATURE_KINDS:
    raise ValueError(f"kind: {kind!r} not in {', '.join(FEATURE_KINDS)}")
  if student_states.shape != teacher_states.shape:
    raise ValueError(f"feature_loss: student states {tuple(student_states.shape)} != "
                     f"teacher states {tuple(teacher_states.shape)}")
  s = student_states.astype(jnp.float32)
  t = jnp.where(loss_mask[..., None] > 0, jax.lax.stop_gradient(teacher_states.astype(jnp.float32)), 0.0)
  per_token = jnp.mean(FEATURE_KINDS[kind](s, t), axis=0)  # (B, T)
  return masked_sum(per_token, loss_mask), {}


def select_teacher_states(targets: TeacherTargets, teacher_layers: tuple[int, ...],
                          name: str = "attn_out") -> Array:
  """(len(teacher_layers), B, T, E): the teacher's `name` states at those layers, in order."""
  if name not in targets.layer_states:
    raise ValueError(f"layer_states: no {name!r} states (have {sorted(targets.layer_states)})")
  missing = [layer for layer in teacher_layers if layer not in targets.state_layers]
  if missing:
    raise ValueError(f"state_layers: teacher layers {missing} not sent (have {list(targets.state_layers)})")
  rows = [targets.state_layers.index(layer) for layer in teacher_layers]
  return jnp.take(targets.layer_states[name], jnp.asarray(rows), axis=0)


def combine(*, kd: MaskedSum | None = None, ce: MaskedSum | None = None,
            feature: MaskedSum | None = None, alpha: Any = 0.0, beta: Any = 0.0,
            num_tokens: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """total = alpha * kd + (1 - alpha) * ce + beta * feature on token-weighted means.

  A part given as None is left out; without `kd`, `ce` gets weight 1 (CE-only
  fallback). `num_tokens` replaces every part's own count: pass the token count
  of the whole accumulated batch in each micro-batch and the summed micro-batch
  totals (and gradients) equal the full-batch ones.
  """
  alpha = jnp.asarray(alpha, jnp.float32)
  parts = {"kd_loss": (kd, alpha),
           "ce_loss": (ce, 1.0 - alpha if kd is not None else jnp.asarray(1.0, jnp.float32)),
           "feature_loss": (feature, jnp.asarray(beta, jnp.float32))}
  total = jnp.asarray(0.0, jnp.float32)
  metrics = {}
  for name, (part, weight) in parts.items():
    if part is not None:
      metrics[name] = part.mean(num_tokens)
      total = total + weight * metrics[name]
  metrics["total_loss"] = total
  return total, metrics


class LossConfig(ConfigBase):
  """Which losses, their weights and the sparse-KD variant."""

  kd_mode: KDMode = Field("tail", description="Sparse KD variant: tail (top-k + exact tail bucket), "
                                              "renormalize (both sides over the top-k), topk (no tail term), "
                                              "sampled (exact top_k + importance-weighted teacher samples, unbiased); "
                                              "on the student's own samples (needs on_policy_fraction > 0; "
                                              "docs/on_policy.md): reverse_kl (KL(student || teacher), see "
                                              "reverse_kl_estimator) or gkd (generalised JSD, see gkd_beta).")
  reverse_kl_estimator: ReverseKLEstimator = Field(
      "sampled", description="kd_mode reverse_kl: sampled (the per-token advantage log p_T(x) - log p_S(x) at the "
      "sampled token through the student's log-probability, importance-weighted by the sampler's log mu; one "
      "teacher value per position) or union (the exact reverse KL over the teacher's top_k and the scored ids, "
      "tails lumped as kd_mode tail does).")
  gkd_beta: float = Field(0.5, ge=0, le=1, description="kd_mode gkd: beta of the generalised Jensen-Shannon "
                          "divergence beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q (0: forward "
                          "KL, 1: reverse KL over the same categories).")
  off_policy_kd_mode: OffPolicyKDMode = Field(
      "tail", description="With kd_mode reverse_kl or gkd: the sparse KD mode of the corpus (off-policy) steps "
                          "of a run with on_policy_fraction < 1.")
  top_k: int = Field(64, ge=0, description="Teacher ids per position (requested from the teacher; "
                                           "targets with more use the first top_k). With kd_mode sampled: "
                                           "the ids treated exactly; 0 = samples only.")
  num_samples: int = Field(0, ge=0, description="kd_mode sampled: draws per position from the teacher's "
                                                "softmax(z / sample_temperature) (N); required > 0 there.")
  sample_temperature: float = Field(1.0, gt=0, allow_inf_nan=False,
                                    description="kd_mode sampled: tau of the proposal softmax(z / tau); "
                                                "tau = temperature gives every draw weight 1.")
  sample_seed: int = Field(0, ge=0, lt=2**64, description="kd_mode sampled: the request seed; the draws are "
                                                         "fixed by (seed, example id, position).")
  sample_tail: bool = Field(True, description="kd_mode sampled: draw only outside the exact top_k (every draw "
                                              "informs the tail); false: from the whole vocabulary (draws that "
                                              "land in the top_k are dropped; samples reusable for any top_k).")
  top_p: float | None = Field(None, ge=0.0, le=1.0, description="Nucleus cut of the top-k by exact teacher "
                                                               "probability; None or 0 disables.")
  use_dense: bool = Field(False, description="Use kd_dense on full teacher logits when an in-process teacher "
                                             "provides them.")
  temperature: Schedule = Field(default_factory=lambda: constant(1.0),
                                description="KD temperature T (a number or a schedule).")
  alpha: Schedule = Field(default_factory=lambda: constant(0.5),
                          description="Weight of the KD loss; CE gets 1 - alpha (a number or a schedule).")
  beta: Schedule = Field(default_factory=lambda: constant(0.0),
                         description="Weight of the feature loss (a number or a schedule).")
  feature_kind: FeatureKind = Field("cosine", description="Feature distance on attn_out: cosine or l2 (MSE).")
  layer_map: list[int] | None = Field(None, description="Teacher layer of each student layer j; "
                                                       "None = identity.")
  feature_layers: list[int] | None = Field(None, description="Student layers with a feature loss; "
                                                            "None = all.")
  blockwise: bool = Field(False, description="Blockwise parallel distillation (docs/blockwise.md): the "
                          "student's attention at layer j reads the teacher's attn_in[layer_map[j]] instead "
                          "of its own input, and the optimised loss is the feature loss on attn_out at the "
                          "mapped layers alone (CE and KD are logged, not optimised). Needs equal widths.")
  blockwise_steps: int | None = Field(None, ge=0, description="With blockwise: train blockwise for the first "
                                      "N optimizer steps, then ordinary KD in the same run (0 = never, "
                                      "null = the whole run).")
  on_policy_fraction: float = Field(
      0.0, ge=0, le=1, description="Share of optimizer steps trained on the student's own samples "
      "(generation.*) scored by the teacher, the rest on corpus batches with the usual KD: step m is "
      "on-policy iff floor((m + 1) f) > floor(m f), spread evenly and fixed by the step (0 = corpus only, "
      "1 = every step; docs/on_policy.md, 'The pipeline').")
  chunk_size: int | None = Field(512, ge=0, description="Positions per chunk of the fused lm_head + CE + KD "
                                 "(docs/losses.md, 'Chunked (fused) losses'): the student's (B, T, V) logits "
                                 "and their gradient never exist whole, only (B, chunk_size, V) at a time, "
                                 "recomputed in the backward pass. 0 or null: one chunk (the reference path).")

  @pydantic.model_validator(mode="after")
  def _check(self) -> "LossConfig":
    (t_lo, _), (a_lo, a_hi), (b_lo, _) = self.temperature.bounds(), self.alpha.bounds(), self.beta.bounds()
    checks = [("temperature", t_lo > 0, "must stay > 0"),
              ("alpha", 0.0 <= a_lo and a_hi <= 1.0, "must stay in [0, 1]"),
              ("beta", b_lo >= 0.0, "must stay >= 0")]
    for name, ok, what in checks:
      if not ok:
        raise ValueError(f"{name} {what} (schedule goes from {getattr(self, name).start} "
                         f"to {getattr(self, name).final})")
    if self.kd_mode == "sampled" and self.num_samples < 1:
      raise ValueError("num_samples: kd_mode sampled needs num_samples >= 1 draws per position")
    if self.kd_mode in SCORED_KD_MODES and self.on_policy_fraction == 0:
      raise ValueError(f"kd_mode {self.kd_mode} trains on the student's own samples: set on_policy_fraction > 0 "
                       "(or another kd_mode for corpus batches)")
    if self.kd_mode != "sampled" and self.top_k < 1:
      raise ValueError(f"top_k must be >= 1 for kd_mode {self.kd_mode} (0 is only for kd_mode sampled)")
    if self.layer_map is not None and min(self.layer_map, default=0) < 0:
      raise ValueError(f"layer_map entries must be >= 0, got {self.layer_map}")
    if self.blockwise_steps is not None and not self.blockwise:
      raise ValueError(f"loss.blockwise_steps is {self.blockwise_steps} but loss.blockwise is false; "
                       "set loss.blockwise=true to schedule blockwise steps")
    return self

  def phase_at(self, step: int) -> Phase:
    """The objective of optimizer `step`: `blockwise` for the first blockwise_steps steps, else `kd`."""
    if self.blockwise and (self.blockwise_steps is None or step < self.blockwise_steps):
      return "blockwise"
    return "kd"

  def on_policy_at(self, step: int) -> bool:
    """Whether optimizer `step` trains on a generated batch: floor((step + 1) f) > floor(step f), in exact
    rational arithmetic on f as written (0.7 is 7/10: its binary rounding would drop a step now and then)."""
    f = fractions.Fraction(repr(float(self.on_policy_fraction)))
    return math.floor((step + 1) * f) > math.floor(step * f)

  @property
  def scores_given_ids(self) -> bool:
    """Whether the loss reads the teacher's scores at given ids (`SCORED_KD_MODES`)."""
    return self.kd_mode in SCORED_KD_MODES

  @property
  def sparse_kd_mode(self) -> str:
    """The KD mode of a batch with an ordinary teacher answer: kd_mode, or off_policy_kd_mode for the corpus
    steps of an on-policy mode."""
    return self.off_policy_kd_mode if self.kd_mode in SCORED_KD_MODES else self.kd_mode

  @property
  def ever_blockwise(self) -> bool:
    return self.blockwise and self.blockwise_steps != 0

  @property
  def top_p_cut(self) -> float | None:
    return self.top_p if self.top_p else None

  @property
  def request_k(self) -> int:
    """Top-k ids to ask the teacher for (at least 1: every answer carries a top-k)."""
    return max(self.top_k, 1)

  @property
  def sampling(self) -> "SampleRequest | None":
    """The samples to ask the teacher for (None unless kd_mode is sampled)."""
    if self.kd_mode != "sampled":
      return None
    return SampleRequest(num_samples=self.num_samples, temperature=self.sample_temperature,
                         seed=self.sample_seed, exclude=self.top_k if self.sample_tail else 0)

  def layer_pairs(self, num_student_layers: int,
                  num_teacher_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(student layers, their teacher layers) for the feature loss; ValueError when inconsistent."""
    if self.layer_map is None:
      if num_student_layers != num_teacher_layers:
        raise ValueError(f"layer_map: required when depths differ (student {num_student_layers}, "
                         f"teacher {num_teacher_layers} layers)")
      mapping = list(range(num_student_layers))
    else:
      mapping = self.layer_map
      if len(mapping) != num_student_layers:
        raise ValueError(f"layer_map: {len(mapping)} entries for {num_student_layers} student layers")
      if max(mapping) >= num_teacher_layers:
        raise ValueError(f"layer_map: teacher layer {max(mapping)} >= teacher depth {num_teacher_layers}")
    student = tuple(range(num_student_layers)) if self.feature_layers is None else tuple(self.feature_layers)
    bad = [j for j in student if not 0 <= j < num_student_layers]
    if bad:
      raise ValueError(f"feature_layers: {bad} outside [0, {num_student_layers})")
    return student, tuple(mapping[j] for j in student)


def soft_loss(student_logits: Array, targets: TeacherTargets, loss_mask: Array, cfg: LossConfig, *,
              temperature: Any = None, true_vocab_size: int | None = None,
              ) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """The KD term `cfg` selects: kd_dense on dense teacher logits when enabled and present, else kd_sparse."""
  if cfg.use_dense and targets.has_dense:
    temp = targets.temperatures[0] if temperature is None else temperature
    return kd_dense(student_logits, targets.dense(), loss_mask, temperature=temp,
                    true_vocab_size=true_vocab_size)
  if cfg.kd_mode == "sampled":
    return kd_sampled(student_logits, targets, loss_mask, temperature=temperature, k=cfg.top_k,
                      true_vocab_size=true_vocab_size)
  if targets.k < cfg.top_k:
    raise ValueError(f"top_k: loss wants {cfg.top_k} teacher ids, the targets carry {targets.k}")
  return kd_sparse(student_logits, targets, loss_mask, mode=cfg.sparse_kd_mode, temperature=temperature,
                   top_p=cfg.top_p_cut, k=cfg.top_k, true_vocab_size=true_vocab_size)


def logit_losses(student_logits: Array, labels: Array, targets: TeacherTargets | None, loss_mask: Array,
                 cfg: LossConfig, *, temperature: Any = None, true_vocab_size: int | None = None,
                 ) -> tuple[MaskedSum, MaskedSum | None, dict[str, MaskedSum]]:
  """(ce, kd, kd metrics) on (B, T, V) student logits; kd is None (metrics empty) without targets."""
  ce_sum, _ = ce(student_logits, labels, loss_mask, true_vocab_size=true_vocab_size)
  if targets is None:
    return ce_sum, None, {}
  kd, metrics = soft_loss(student_logits, targets, loss_mask, cfg, temperature=temperature,
                          true_vocab_size=true_vocab_size)
  return ce_sum, kd, metrics


def chunked(fn: Callable[..., Any], hidden: Array, head: Callable[[Array], Array], *per_position: Any,
            chunk_size: int | None) -> Any:
  """fn(head(hidden), *per_position), a pytree of sums, computed per chunk of positions and added up.

  The fused linear loss: `hidden` (B, T, E) is split along T into chunks of `chunk_size`
  positions (T padded up to a multiple; padded positions must carry a zero loss mask, which the
  zero padding of every per-position input gives), and each chunk computes its (B, C, V) logits
  with `head`, then `fn` on them. The chunk body is rematerialised (`jax.checkpoint`), so the
  backward pass recomputes each chunk's logits instead of storing them: neither the logits nor
  their gradient ever exist whole. Gradients reach `hidden` and whatever `head` closes over.

  Args:
    fn: (logits (B, C, V), *per_position chunks) -> a pytree of sums (e.g. MaskedSums); every
      leaf must be additive over positions.
    hidden: (B, T, E) final hidden states.
    head: (B, C, E) -> (B, C, V) float32 logits (the lm_head).
    per_position: arrays (B, T, ...), TeacherTargets (their per-position fields are chunked,
      layer states dropped) or None.
    chunk_size: positions per chunk; 0 or None (or >= T): one chunk, i.e. fn(head(hidden), ...).
  """
  b, t = hidden.shape[:2]
  if not chunk_size or chunk_size >= t:
    return fn(head(hidden), *per_position)
  n = -(-t // chunk_size)

  def split(x):  # (B, T, ...) -> (n, B, C, ...), zero-padded along T
    x = jnp.pad(x, [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n, chunk_size) + x.shape[2:]), 1, 0)

  rests, xs = [], []
  for arg in per_position:
    if isinstance(arg, TeacherTargets):
      fields = arg.positional()
      rests.append(arg.replace(layer_states={}, state_layers=(), **{name: None for name in fields}))
      xs.append(fields)
    else:
      rests.append(None)
      xs.append(arg)

  @jax.checkpoint
  def chunk_sums(h, chunk_args):  # h (B, C, E)
    args = [x if rest is None else rest.replace(**x) for rest, x in zip(rests, chunk_args)]
    return fn(head(h), *args)

  def body(acc, chunk):
    return jax.tree.map(jnp.add, acc, chunk_sums(*chunk)), None

  chunks = jax.tree.map(split, (hidden, xs))
  shapes = jax.eval_shape(chunk_sums, *jax.tree.map(lambda x: x[0], chunks))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  sums, _ = jax.lax.scan(body, zeros, chunks)
  return sums


def fused_logit_losses(hidden: Array, head: Callable[[Array], Array], labels: Array,
                       targets: TeacherTargets | None, loss_mask: Array, cfg: LossConfig, *,
                       temperature: Any = None, true_vocab_size: int | None = None,
                       ) -> tuple[MaskedSum, MaskedSum | None, dict[str, MaskedSum]]:
  """`logit_losses` on head(hidden), fused per chunk of `cfg.chunk_size` positions (`chunked`).

  Equals `logit_losses(head(hidden), ...)` up to the order of the float32 sums, and so do its
  gradients with respect to `hidden` and the lm_head weights.
  """
  def fn(logits, labels, targets, loss_mask):
    return logit_losses(logits, labels, targets, loss_mask, cfg, temperature=temperature,
                        true_vocab_size=true_vocab_size)

  return chunked(fn, hidden, head, labels, targets, loss_mask, chunk_size=cfg.chunk_size)
