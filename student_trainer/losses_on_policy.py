"""On-policy distillation losses: the student's own samples, scored by the teacher.

The student generates a continuation; the teacher scores it. At each position t of
a generated token, the teacher answers with its logits at a short list of ids (the
`scored` ids: slot 0 is the token the student sampled next, the others are
usually the student's own top-k ids there) and, optionally, its usual top-k,
together with the exact full-vocabulary logsumexp. Three losses read that answer
(docs/losses.md, "On-policy losses"):

- `sampled_reverse_kl`: the per-token REINFORCE estimate of the reverse KL
  gradient at the sampled token (on-policy distillation as Thinking Machines and
  TRL describe it);
- `union_reverse_kl`: the exact reverse KL over the union U of the teacher's
  top-k and the scored ids, with the rest of the vocabulary lumped into one tail
  bucket on each side (as kd_mode `tail` does);
- `gkd`: the generalised Jensen-Shannon divergence of GKD over the same
  categories.

All are pure, jit-friendly functions of (B, T, V) student logits (or one chunk of
positions of them: every input is per position, so `losses.chunked` fuses them
with the lm_head, see `fused_on_policy_kd`), returning `(MaskedSum, metrics)`
like the losses in `losses.py`, and scaled by tau^2 like every KD term there.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import flax.struct
import jax
import jax.numpy as jnp

from distill_core.targets import TeacherTargets
from student_trainer.losses import (_TAIL_FLOOR, LossConfig, MaskedSum, _column, _mask_padded, _normaliser,
                                    _teacher_tail, chunked, masked_sum)

Array = jax.Array

OnPolicyMode = Literal["reverse_kl_sampled", "reverse_kl_union", "gkd"]
_NO_ID = jnp.iinfo(jnp.int32).max  # sort key of an invalid slot: after every real id


@flax.struct.dataclass
class TeacherScores:
  """The teacher's answer that the on-policy losses read, at one loss temperature tau.

  Every leaf is per position, (B, T, ...), so `losses.chunked` splits it along T like
  any other per-position input. Values are the teacher's logits z minus one shift per
  position (the row max, as for the top-k targets), the same shift `lse` was computed
  with, so the teacher's exact log-probability of an id v with value z_v is
  z_v / tau - lse.

  Slots are invalid (left out, on the teacher and the student side alike) where the
  value is not finite or the id is outside [0, true_vocab_size); anything may sit at
  positions the loss mask leaves out (it is neutralised before any arithmetic).
  """

  scored_ids: Array  # (B, T, n) int32: slot 0 the sampled next token, then e.g. the student's top-k ids
  scored_logits: Array  # (B, T, n) f16/bf16/f32: shifted teacher logits at scored_ids
  lse: Array  # (B, T) f32: log sum_v exp(z_v / tau) over the real vocabulary (the logsumexp column of tau)
  topk_ids: Array | None = None  # (B, T, k) int32: the teacher's top-k ids, sorted descending
  topk_logits: Array | None = None  # (B, T, k): their shifted logits (entry 0 is the row max, 0)

  def check(self, student_logits: Array) -> None:
    """Raises ValueError naming the field whose shape or dtype does not fit (B, T, V) student logits."""
    bt = tuple(student_logits.shape[:2])
    if student_logits.ndim != 3:
      raise ValueError(f"student_logits: expected (B, T, V), got shape {tuple(student_logits.shape)}")
    fields = [("scored_ids", self.scored_ids, self.scored_logits, "scored_logits")]
    if (self.topk_ids is None) != (self.topk_logits is None):
      raise ValueError("topk_ids: topk_ids and topk_logits must be given together")
    if self.topk_ids is not None:
      fields.append(("topk_ids", self.topk_ids, self.topk_logits, "topk_logits"))
    for name, ids, values, values_name in fields:
      if ids.ndim != 3 or tuple(ids.shape[:2]) != bt or ids.shape[-1] < 1:
        raise ValueError(f"{name}: expected shape {bt + ('n >= 1',)}, got {tuple(ids.shape)}")
      if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"{name}: expected integer ids, got {ids.dtype}")
      if tuple(values.shape) != tuple(ids.shape):
        raise ValueError(f"{values_name}: shape {tuple(values.shape)} != {name} shape {tuple(ids.shape)}")
      if not jnp.issubdtype(values.dtype, jnp.floating):
        raise ValueError(f"{values_name}: expected floating values, got {values.dtype}")
    if tuple(self.lse.shape) != bt:
      raise ValueError(f"lse: expected shape {bt} (one logsumexp column), got {tuple(self.lse.shape)}")


def first_occurrences(ids: Array, valid: Array) -> Array:
  """keep[..., j] = valid[..., j] and no valid slot i < j holds the same id (fixed shapes, no loop).

  The de-duplication of the union: slots are ranked in the order given (the teacher's
  top-k first, then the scored ids), so an id present in both keeps its top-k slot.
  A stable sort by id puts each id's slots next to each other in slot order; the
  first of each run is the kept one, scattered back to slot order (the sort's
  permutation has no repeated index). O(K log K) per position, where comparing all
  pairs would hold a (B, T, K, K) array.
  """
  slot = jnp.broadcast_to(jnp.arange(ids.shape[-1], dtype=jnp.int32), ids.shape)
  key = jnp.where(valid, ids.astype(jnp.int32), _NO_ID)
  sorted_key, order = jax.lax.sort((key, slot), dimension=ids.ndim - 1, num_keys=1, is_stable=True)
  head = jnp.concatenate([jnp.ones_like(sorted_key[..., :1], bool), sorted_key[..., 1:] != sorted_key[..., :-1]],
                         axis=-1)
  return valid & jnp.put_along_axis(jnp.zeros(ids.shape, bool), order, head, axis=-1, inplace=False)


@flax.struct.dataclass
class _Categories:
  """The union U (kept slots) plus one tail bucket, with both sides' exact log-probabilities."""

  keep: Array  # (B, T, K) bool: slot in U (valid, first occurrence of its id)
  log_q: Array  # (B, T, K) student log-probabilities on U (0 where not kept)
  log_p: Array  # (B, T, K) teacher log-probabilities on U (0 where not kept)
  has_tail: Array  # (B, T) bool: U does not cover the real vocabulary (else both tails are exactly 0)
  log_q_tail: Array  # (B, T) log sum_{v not in U} q_v, summed over the vocabulary
  log_p_tail: Array  # (B, T) log(1 - sum_U p), floored
  q_tail: Array  # (B, T) exp(log_q_tail) where has_tail, else 0
  p_tail: Array  # (B, T) 1 - sum_U p where has_tail, else 0 (unfloored)


def _categories(student_logits: Array, teacher: TeacherScores, counted: Array, inv_t: Array,
                true_vocab_size: int | None) -> _Categories:
  """Builds U = teacher top-k union scored ids, de-duplicated, and the tail bucket of both sides."""
  stop = jax.lax.stop_gradient
  parts = [(teacher.topk_ids, teacher.topk_logits)] if teacher.topk_ids is not None else []
  parts.append((teacher.scored_ids, teacher.scored_logits))
  ids = jnp.concatenate([i.astype(jnp.int32) for i, _ in parts], axis=-1)  # (B, T, K)
  z = stop(jnp.concatenate([v.astype(jnp.float32) for _, v in parts], axis=-1))
  s = _mask_padded(student_logits.astype(jnp.float32), true_vocab_size)
  n_real = min(true_vocab_size or s.shape[-1], s.shape[-1])
  valid = counted[..., None] & jnp.isfinite(z) & (ids >= 0) & (ids < n_real)
  keep = first_occurrences(ids, valid)
  ids = jnp.where(valid, ids, 0)
  lse_t = jnp.where(counted, stop(teacher.lse.astype(jnp.float32)), 0.0)
  zt = jnp.where(keep, z * inv_t, 0.0)
  log_p = jnp.where(keep, zt - lse_t[..., None], 0.0)
  m, lse_s = _normaliser(s, inv_t)
  log_q = jnp.where(keep, (jnp.take_along_axis(s, ids, axis=-1) - m) * inv_t - lse_s[..., None], 0.0)
  # Student tail: summed directly over the ids outside U (exact however close sum_U q is to 1).
  b, t = ids.shape[:2]
  out = jnp.where(keep, ids, s.shape[-1])  # slots not in U scatter out of bounds (dropped); kept ids are distinct
  in_u = jnp.zeros(s.shape, bool).at[jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None], out].set(
      True, mode="drop")
  tail_sum = jnp.sum(jnp.where(in_u, 0.0, jnp.exp((s - m) * inv_t)), axis=-1)
  log_q_tail = jnp.log(jnp.maximum(tail_sum, _TAIL_FLOOR)) - lse_s
  # Teacher tail from its exact logsumexp (kd_mode tail's formula; slot 0 is its top entry when top-k is given).
  has_tail = counted & (jnp.sum(keep, axis=-1) < n_real)
  r = jnp.where(has_tail, _teacher_tail(zt, keep, lse_t), 0.0)
  return _Categories(keep=keep, log_q=log_q, log_p=log_p, has_tail=has_tail, log_q_tail=log_q_tail,
                     log_p_tail=jnp.log(jnp.maximum(r, _TAIL_FLOOR)),
                     q_tail=jnp.where(has_tail, jnp.exp(log_q_tail), 0.0), p_tail=r)


def _kl(log_a: Array, log_b: Array, keep: Array, a_tail: Array, log_a_tail: Array, log_b_tail: Array,
        has_tail: Array) -> Array:
  """sum_{c in U + tail} a_c (log a_c - log b_c) over the kept slots and the tail bucket (B, T)."""
  body = jnp.sum(jnp.where(keep, jnp.exp(log_a) * (log_a - log_b), 0.0), axis=-1)
  return body + jnp.where(has_tail, a_tail * (log_a_tail - log_b_tail), 0.0)


def _reverse(c: _Categories) -> Array:
  """KL(q || p) over U and the tail bucket."""
  return _kl(c.log_q, c.log_p, c.keep, c.q_tail, c.log_q_tail, c.log_p_tail, c.has_tail)


def _forward(c: _Categories) -> Array:
  """KL(p || q) over U and the tail bucket."""
  return _kl(c.log_p, c.log_q, c.keep, c.p_tail, c.log_p_tail, c.log_q_tail, c.has_tail)


def _jsd(c: _Categories, beta: float) -> Array:
  """beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q, for 0 < beta < 1 (log space)."""
  log_b, log_1mb = jnp.log(jnp.float32(beta)), jnp.log1p(jnp.float32(-beta))
  log_m = jnp.logaddexp(log_b + c.log_p, log_1mb + c.log_q)
  log_m_tail = jnp.logaddexp(log_b + c.log_p_tail, log_1mb + c.log_q_tail)
  kl_p = _kl(c.log_p, log_m, c.keep, c.p_tail, c.log_p_tail, log_m_tail, c.has_tail)
  kl_q = _kl(c.log_q, log_m, c.keep, c.q_tail, c.log_q_tail, log_m_tail, c.has_tail)
  return beta * kl_p + (1.0 - beta) * kl_q


def _union_metrics(c: _Categories, reverse_kl: Array, loss_mask: Array) -> dict[str, MaskedSum]:
  return {"reverse_kl": masked_sum(reverse_kl, loss_mask),
          "union_support": masked_sum(jnp.sum(c.keep, axis=-1).astype(jnp.float32), loss_mask),
          "teacher_tail_mass": masked_sum(c.p_tail, loss_mask),
          "student_tail_mass": masked_sum(c.q_tail, loss_mask)}


def sampled_reverse_kl(student_logits: Array, teacher: TeacherScores, loss_mask: Array, *, temperature: Any = 1.0,
                       sampler_logprobs: Array | None = None, true_vocab_size: int | None = None,
                       ) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """tau^2 * the sampled-token on-policy loss: a REINFORCE estimate of the reverse KL gradient.

  At each counted position t the student sampled x_t = scored_ids[..., 0]; with
  log q = the student's log-probability at tau (full real vocabulary) and log p the
  teacher's (z_x / tau - lse), the advantage A_t = log p(x_t) - log q(x_t) is held
  constant (stop-gradient) and

    loss = -tau^2 * mean_t A_t * log q(x_t),    grad = tau^2 * mean_t (log q(x_t) - log p(x_t)) grad log q(x_t).

  When x_t ~ q, E[(log q(x) - log p(x)) grad log q(x)] = grad KL(q || p) (the term
  sum_x q grad log q vanishes), so the gradient is unbiased for the per-token
  reverse KL; the loss value itself is a surrogate, not a divergence. A position
  whose scored slot 0 is invalid (non-finite value, id outside the real
  vocabulary) counts with value and gradient 0.

  Args:
    sampler_logprobs: (B, T) log mu(x_t), the probability the sampler actually drew
      x_t with (its own parameters, temperature and top-p), or None when mu is q at
      tau (fresh parameters, no truncation). Given, each position is weighted by the
      importance ratio w_t = q(x_t) / mu(x_t) (stop-gradient): loss = -tau^2 * mean_t
      w_t A_t log q(x_t), unbiased again for samples drawn from mu wherever mu > 0.

  Returns:
    (loss, metrics): `reverse_kl`, mean_t w_t (log q(x_t) - log p(x_t)) (no tau^2), an
    unbiased estimate of KL(q || p) at tau; with sampler_logprobs also
    `importance_weight`, mean_t w_t (1 in expectation: a check of the weights).
  """
  teacher.check(student_logits)
  if sampler_logprobs is not None and tuple(sampler_logprobs.shape) != tuple(student_logits.shape[:2]):
    raise ValueError(f"sampler_logprobs: expected shape {tuple(student_logits.shape[:2])}, "
                     f"got {tuple(sampler_logprobs.shape)}")
  inv_t = 1.0 / jnp.asarray(temperature, jnp.float32)
  stop = jax.lax.stop_gradient
  counted = loss_mask > 0
  s = _mask_padded(student_logits.astype(jnp.float32), true_vocab_size)
  n_real = min(true_vocab_size or s.shape[-1], s.shape[-1])
  x = teacher.scored_ids[..., 0].astype(jnp.int32)
  z = stop(teacher.scored_logits[..., 0].astype(jnp.float32))
  valid = counted & jnp.isfinite(z) & (x >= 0) & (x < n_real)
  x = jnp.where(valid, x, 0)
  log_p = jnp.where(valid, z * inv_t - stop(teacher.lse.astype(jnp.float32)), 0.0)
  m, lse_s = _normaliser(s, inv_t)
  log_q = jnp.where(valid, (jnp.take_along_axis(s, x[..., None], axis=-1)[..., 0] - m[..., 0]) * inv_t - lse_s, 0.0)
  log_ratio = stop(log_q - log_p)  # one-sample reverse KL; -A_t
  metrics = {}
  if sampler_logprobs is not None:
    log_mu = jnp.where(valid, stop(sampler_logprobs.astype(jnp.float32)), 0.0)
    weight = jnp.where(valid, jnp.exp(stop(log_q) - log_mu), 0.0)
    log_ratio = weight * log_ratio
    metrics["importance_weight"] = masked_sum(weight, loss_mask)
  metrics["reverse_kl"] = masked_sum(log_ratio, loss_mask)
  surrogate = log_ratio * log_q  # = -w_t A_t log q(x_t)
  return masked_sum(surrogate / (inv_t * inv_t), loss_mask), metrics


def union_reverse_kl(student_logits: Array, teacher: TeacherScores, loss_mask: Array, *, temperature: Any = 1.0,
                     true_vocab_size: int | None = None) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """tau^2 * KL(q || p) over the union U of the teacher's top-k and the scored ids, plus one tail bucket.

    kl = sum_{u in U} q_u (log q_u - log p_u) + q_tail (log q_tail - log p_tail),
    q_tail = sum_{v not in U} q_v (summed over the vocabulary),  p_tail = 1 - sum_U p (from lse).

  Both sides are exact on U (the student from its logits, the teacher from its value
  and lse at every id of U); the tail bucket lumps the rest of each distribution, so
  the value is the reverse KL between the two distributions coarsened to |U| + 1
  categories: 0 <= kl <= KL(q || p), with equality when U covers the real vocabulary
  (then the bucket is empty). U: the valid slots of [topk_ids, scored_ids], each id
  once (`first_occurrences`). p_tail is floored at 1e-30 inside the log, so a teacher
  that puts all its mass on U yields a large but finite term.

  Returns:
    (loss, metrics): `reverse_kl` (kl without tau^2), `union_support` (|U|),
    `teacher_tail_mass` (p_tail) and `student_tail_mass` (q_tail).
  """
  teacher.check(student_logits)
  temp = jnp.asarray(temperature, jnp.float32)
  c = _categories(student_logits, teacher, loss_mask > 0, 1.0 / temp, true_vocab_size)
  kl = _reverse(c)
  return masked_sum(kl * (temp * temp), loss_mask), _union_metrics(c, jax.lax.stop_gradient(kl), loss_mask)


def gkd(student_logits: Array, teacher: TeacherScores, loss_mask: Array, *, beta: float = 0.5,
        temperature: Any = 1.0, true_vocab_size: int | None = None) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """tau^2 * the generalised Jensen-Shannon divergence of GKD over U and the tail bucket.

  With p the teacher and q the student (on the categories of `union_reverse_kl`):

    JSD_beta = beta KL(p || M) + (1 - beta) KL(q || M),   M = beta p + (1 - beta) q,

  the convention of Agarwal et al., "On-Policy Distillation of Language Models:
  Learning from Self-Generated Mistakes" (2024), eq. 1 with P = teacher and
  Q = student, and of TRL's `GKDTrainer.generalized_jsd_loss`. As beta -> 0,
  JSD_beta / beta -> KL(p || q) (forward KL); as beta -> 1, JSD_beta / (1 - beta) ->
  KL(q || p) (reverse KL). Like TRL, beta = 0 and beta = 1 are not the (vanishing)
  divergence itself but exactly those limits: beta = 0 gives KL(p || q) and beta = 1
  gives KL(q || p) over the same categories.

  Args:
    beta: a Python float in [0, 1] (static).

  Returns:
    (loss, metrics): those of `union_reverse_kl` (`reverse_kl` is the bucketed
    KL(q || p) whatever beta is).
  """
  beta = float(beta)
  if not 0.0 <= beta <= 1.0:
    raise ValueError(f"beta: {beta} not in [0, 1]")
  teacher.check(student_logits)
  temp = jnp.asarray(temperature, jnp.float32)
  c = _categories(student_logits, teacher, loss_mask > 0, 1.0 / temp, true_vocab_size)
  if beta == 0.0:
    div = _forward(c)
  elif beta == 1.0:
    div = _reverse(c)
  else:
    div = _jsd(c, beta)
  metrics = _union_metrics(c, jax.lax.stop_gradient(_reverse(c)), loss_mask)
  return masked_sum(div * (temp * temp), loss_mask), metrics


ON_POLICY_LOSSES: dict[str, Callable[..., tuple[MaskedSum, dict[str, MaskedSum]]]] = {
    "reverse_kl_sampled": sampled_reverse_kl, "reverse_kl_union": union_reverse_kl, "gkd": gkd}


def on_policy_kd(student_logits: Array, teacher: TeacherScores, loss_mask: Array, *, mode: OnPolicyMode,
                 temperature: Any = 1.0, beta: float = 0.5, sampler_logprobs: Array | None = None,
                 true_vocab_size: int | None = None) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """The on-policy KD term `mode` names (`ON_POLICY_LOSSES`).

  `beta` is read by `gkd` only, `sampler_logprobs` by `sampled_reverse_kl` only (the
  exact divergences do not depend on how the positions were sampled).
  """
  if mode not in ON_POLICY_LOSSES:
    raise ValueError(f"mode: {mode!r} not in {', '.join(ON_POLICY_LOSSES)}")
  extra = {"gkd": {"beta": beta}, "reverse_kl_sampled": {"sampler_logprobs": sampler_logprobs}}.get(mode, {})
  return ON_POLICY_LOSSES[mode](student_logits, teacher, loss_mask, temperature=temperature,
                                true_vocab_size=true_vocab_size, **extra)


def fused_on_policy_kd(hidden: Array, head: Callable[[Array], Array], teacher: TeacherScores, loss_mask: Array, *,
                       mode: OnPolicyMode, temperature: Any = 1.0, beta: float = 0.5,
                       sampler_logprobs: Array | None = None, true_vocab_size: int | None = None,
                       chunk_size: int | None = None) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """`on_policy_kd` on head(hidden), per chunk of `chunk_size` positions (`losses.chunked`).

  The (B, T, V) student logits and their gradient never exist whole; the result equals
  the unchunked one up to the order of the float32 sums.
  """
  def fn(logits, teacher, loss_mask, sampler_logprobs):
    return on_policy_kd(logits, teacher, loss_mask, mode=mode, temperature=temperature, beta=beta,
                        sampler_logprobs=sampler_logprobs, true_vocab_size=true_vocab_size)

  return chunked(fn, hidden, head, teacher, loss_mask, sampler_logprobs, chunk_size=chunk_size)


def mode_of(cfg: LossConfig) -> OnPolicyMode:
  """The on-policy loss of a run's kd_mode (reverse_kl with its estimator, or gkd)."""
  if cfg.kd_mode == "gkd":
    return "gkd"
  if cfg.kd_mode == "reverse_kl":
    return "reverse_kl_union" if cfg.reverse_kl_estimator == "union" else "reverse_kl_sampled"
  raise ValueError(f"kd_mode: {cfg.kd_mode!r} is not an on-policy mode (reverse_kl, gkd)")


def teacher_scores(targets: TeacherTargets, temperature: Any, k: int) -> tuple[TeacherScores, Array]:
  """(TeacherScores, tau) from a teacher's answer with scores at given ids: the logsumexp column nearest
  `temperature` (`losses._column`, whose temperature both sides then use) and the first `k` top-k ids (none
  when k is 0)."""
  if not targets.has_scored or targets.scored_ids is None:
    raise ValueError("scored_ids: the on-policy losses need the teacher's scores at the sampled ids (the "
                     "teacher's answer has none)")
  idx, _ = _column(targets, temperature)
  tau = jnp.take(jnp.asarray(targets.temperatures, jnp.float32), idx)
  top = dict(topk_ids=targets.topk_ids[..., :k], topk_logits=targets.topk_logits[..., :k]) if k else {}
  return TeacherScores(scored_ids=targets.scored_ids, scored_logits=targets.scored_logits,
                       lse=jnp.take(targets.logsumexp, idx, axis=-1), **top), tau


def fused_run_loss(hidden: Array, head: Callable[[Array], Array], targets: TeacherTargets, loss_mask: Array,
                   cfg: LossConfig, *, temperature: Any, sampler_logprobs: Array | None,
                   true_vocab_size: int | None) -> tuple[MaskedSum, dict[str, MaskedSum]]:
  """The KD term of an on-policy step of a run (`cfg.kd_mode` reverse_kl or gkd), fused per chunk of
  `cfg.chunk_size` positions: the teacher's answer at the run's temperature (`teacher_scores`, its top_k ids
  for the union estimator and gkd), and for the sampled estimator the sampler's log mu of each token."""
  mode = mode_of(cfg)
  scores, tau = teacher_scores(targets, temperature, 0 if mode == "reverse_kl_sampled" else cfg.top_k)
  return fused_on_policy_kd(hidden, head, scores, loss_mask, mode=mode, temperature=tau, beta=cfg.gkd_beta,
                            sampler_logprobs=sampler_logprobs if mode == "reverse_kl_sampled" else None,
                            true_vocab_size=true_vocab_size, chunk_size=cfg.chunk_size)
