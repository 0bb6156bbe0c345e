"""On-policy losses against float64 NumPy references computed over the full vocabulary with loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_core.targets import compute_targets
from student_trainer import losses_on_policy as op

B, T, V, TRUE_V = 2, 5, 12, 10
TEMPS = (1.0, 2.0)
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)

jit_sampled = jax.jit(op.sampled_reverse_kl, static_argnames=("true_vocab_size",))
jit_union = jax.jit(op.union_reverse_kl, static_argnames=("true_vocab_size",))
jit_gkd = jax.jit(op.gkd, static_argnames=("beta", "true_vocab_size"))


# ---------------------------------------------------------------- problems


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max()
  return x - np.log(np.sum(np.exp(x)))


def _problem(seed=0, *, k_t=3, k_s=3, temp=1.0, scale=2.0):
  """Student logits (padded ids large), teacher logits z (shifted), the teacher's answer and a loss mask.

  Slot 0 of the scored ids is drawn from the student's softmax(s / temp); the others are the
  top-k of a perturbed (stale) copy of the student, as a sampler a step behind would send.
  """
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(B, T, V)) * scale
  s[..., TRUE_V:] = 40.0  # padded vocabulary ids: must be excluded
  z = rng.normal(size=(B, T, TRUE_V)) * scale + 7.0
  z = z - z.max(axis=-1, keepdims=True)
  x = np.zeros((B, T, 1), np.int64)
  for b in range(B):
    for t in range(T):
      x[b, t, 0] = rng.choice(TRUE_V, p=np.exp(_log_softmax(s[b, t, :TRUE_V] / temp)))
  stale = s[..., :TRUE_V] + rng.normal(size=(B, T, TRUE_V)) * 0.5
  scored = np.concatenate([x, np.argsort(-stale, axis=-1, kind="stable")[..., :k_s]], axis=-1)
  mask = (rng.random(size=(B, T)) > 0.3).astype(np.float32)
  mask[0, 0] = 1.0
  topk = np.argsort(-z, axis=-1, kind="stable")[..., :k_t] if k_t else None
  return dict(s=s.astype(np.float32), z=z, mask=mask, scored_ids=scored, topk_ids=topk)


def _scores(p, temp, scored_values=None):
  """The TeacherScores of problem `p` at `temp` (values float32, lse the exact float64 one)."""
  z = p["z"]
  values = np.take_along_axis(z, p["scored_ids"], axis=-1) if scored_values is None else scored_values
  lse = np.log(np.sum(np.exp(z / temp), axis=-1))
  topk = {}
  if p["topk_ids"] is not None:
    topk = dict(topk_ids=jnp.asarray(p["topk_ids"], jnp.int32),
                topk_logits=jnp.asarray(np.take_along_axis(z, p["topk_ids"], axis=-1), jnp.float32))
  return op.TeacherScores(scored_ids=jnp.asarray(p["scored_ids"], jnp.int32),
                          scored_logits=jnp.asarray(values, jnp.float32), lse=jnp.asarray(lse, jnp.float32), **topk)


# ---------------------------------------------------------------- references


def _divergence(name, beta=None):
  """f(q, p) -> the divergence between two categorical distributions (float64 arrays)."""
  def kl(a, b):
    nz = a > 0
    return float(np.sum(a[nz] * (np.log(a[nz]) - np.log(b[nz]))))

  if name == "reverse":
    return lambda q, p: kl(q, p)
  if name == "forward":
    return lambda q, p: kl(p, q)
  if beta == 0.0:  # TRL's convention: the limits themselves at the ends
    return lambda q, p: kl(p, q)
  if beta == 1.0:
    return lambda q, p: kl(q, p)
  return lambda q, p: beta * kl(p, beta * p + (1 - beta) * q) + (1 - beta) * kl(q, beta * p + (1 - beta) * q)


def _union_ids(row_slots):
  """U in slot order: first occurrence of every valid (id, value) slot."""
  union = []
  for i, value in row_slots:
    if np.isfinite(value) and 0 <= i < TRUE_V and i not in union:
      union.append(int(i))
  return union


def _ref_union(p, temp, div, teacher=None, bucket=True):
  """Per position: (value, |U|, p_tail, q_tail) of `div` over U + one tail bucket (or the full vocabulary)."""
  teacher = teacher if teacher is not None else _scores(p, temp)
  sc_ids, sc_vals = np.asarray(teacher.scored_ids), np.asarray(teacher.scored_logits)
  out = np.zeros((B, T, 4))
  for b in range(B):
    for t in range(T):
      slots = list(zip(sc_ids[b, t], sc_vals[b, t]))
      if teacher.topk_ids is not None:
        slots = list(zip(np.asarray(teacher.topk_ids)[b, t], np.asarray(teacher.topk_logits)[b, t])) + slots
      union = _union_ids(slots)
      q = np.exp(_log_softmax(p["s"][b, t, :TRUE_V] / temp))
      pt = np.exp(_log_softmax(p["z"][b, t] / temp))  # brute force over the real vocabulary
      outside = np.ones(TRUE_V, bool)
      outside[union] = False
      if bucket:
        qc = np.append(q[union], q[outside].sum()) if outside.any() else q[union]
        pc = np.append(pt[union], pt[outside].sum()) if outside.any() else pt[union]
      else:
        qc, pc = q, pt
      out[b, t] = (div(qc, pc), len(union), pt[outside].sum(), q[outside].sum())
  return out


def _masked_mean(per_position, mask):
  return float(np.sum(per_position * mask) / np.sum(mask))


def _close(got, want, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=rtol, atol=atol)


def _per_position(fn, s, teacher, mask):
  """The loss of every single position (B, T): one-hot loss masks, vmapped."""
  hot = np.eye(B * T, dtype=np.float32).reshape(B * T, B, T) * mask[None]
  sums = jax.vmap(lambda m: fn(s, teacher, m)[0].sum)(jnp.asarray(hot))
  return np.asarray(sums).reshape(B, T)


# ---------------------------------------------------------------- union reverse KL


@pytest.mark.parametrize("temp", TEMPS)
def test_union_reverse_kl_equals_full_reverse_kl_when_the_union_covers_the_vocabulary(temp):
  p = _problem(1, k_t=TRUE_V, temp=temp)
  want = _ref_union(p, temp, _divergence("reverse"), bucket=False)
  loss, metrics = jit_union(jnp.asarray(p["s"]), _scores(p, temp), jnp.asarray(p["mask"]), temperature=temp,
                            true_vocab_size=TRUE_V)
  _close(loss.mean(), temp * temp * _masked_mean(want[..., 0], p["mask"]))
  _close(metrics["reverse_kl"].mean(), _masked_mean(want[..., 0], p["mask"]))
  _close(metrics["union_support"].mean(), TRUE_V)
  assert float(metrics["teacher_tail_mass"].mean()) == float(metrics["student_tail_mass"].mean()) == 0.0


def test_union_covering_from_both_halves_equals_full_reverse_kl():
  """Teacher top-k and scored ids each cover part of the vocabulary, with overlaps; together all of it."""
  p = _problem(2, k_t=6, k_s=0)
  rest = np.argsort(-p["z"], axis=-1, kind="stable")[..., 4:]  # overlaps the top-6 at ranks 4 and 5
  p["scored_ids"] = np.concatenate([p["scored_ids"], rest], axis=-1)
  want = _ref_union(p, 1.0, _divergence("reverse"), bucket=False)
  loss, metrics = jit_union(jnp.asarray(p["s"]), _scores(p, 1.0), jnp.asarray(p["mask"]), true_vocab_size=TRUE_V)
  _close(loss.mean(), _masked_mean(want[..., 0], p["mask"]))
  _close(metrics["union_support"].mean(), TRUE_V)


@pytest.mark.parametrize("temp", TEMPS)
@pytest.mark.parametrize("k_t,k_s", [(3, 3), (1, 0), (0, 3)])
def test_union_reverse_kl_equals_the_bucketed_reference_and_is_bounded_by_the_full_kl(temp, k_t, k_s):
  p = _problem(3, k_t=k_t, k_s=k_s, temp=temp)
  teacher = _scores(p, temp)
  want = _ref_union(p, temp, _divergence("reverse"))
  full = _ref_union(p, temp, _divergence("reverse"), bucket=False)
  s, mask = jnp.asarray(p["s"]), jnp.asarray(p["mask"])
  loss, metrics = jit_union(s, teacher, mask, temperature=temp, true_vocab_size=TRUE_V)
  _close(loss.mean(), temp * temp * _masked_mean(want[..., 0], p["mask"]))
  for i, name in enumerate(["reverse_kl", "union_support", "teacher_tail_mass", "student_tail_mass"]):
    _close(metrics[name].mean(), _masked_mean(want[..., i], p["mask"]))
  assert np.all(want[..., 1] < TRUE_V)  # the bucket is not empty: the tail matters here
  # Merging categories can only lose divergence: 0 <= bucketed <= full, position by position.
  got = _per_position(lambda *a: jit_union(*a, temperature=temp, true_vocab_size=TRUE_V), s, teacher, p["mask"])
  counted = p["mask"] > 0
  assert np.all(got[counted] >= -1e-6)
  assert np.all(got[counted] <= temp * temp * full[..., 0][counted] * (1 + 1e-5) + 1e-6)
  assert np.any(got[counted] < temp * temp * full[..., 0][counted] * (1 - 1e-3))


# ---------------------------------------------------------------- GKD


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temp", TEMPS)
def test_gkd_equals_full_generalised_jsd_when_the_union_covers_the_vocabulary(beta, temp):
  p = _problem(4, k_t=TRUE_V, temp=temp)
  want = _ref_union(p, temp, _divergence("jsd", beta), bucket=False)
  loss, _ = jit_gkd(jnp.asarray(p["s"]), _scores(p, temp), jnp.asarray(p["mask"]), beta=beta, temperature=temp,
                    true_vocab_size=TRUE_V)
  _close(loss.mean(), temp * temp * _masked_mean(want[..., 0], p["mask"]))


@pytest.mark.parametrize("beta", BETAS)
def test_gkd_equals_the_bucketed_reference_and_is_bounded_by_the_full_jsd(beta):
  p = _problem(5, k_t=2, k_s=2)
  teacher = _scores(p, 1.0)
  want = _ref_union(p, 1.0, _divergence("jsd", beta))
  full = _ref_union(p, 1.0, _divergence("jsd", beta), bucket=False)
  s, mask = jnp.asarray(p["s"]), jnp.asarray(p["mask"])
  loss, metrics = jit_gkd(s, teacher, mask, beta=beta, true_vocab_size=TRUE_V)
  _close(loss.mean(), _masked_mean(want[..., 0], p["mask"]))
  _close(metrics["reverse_kl"].mean(), _masked_mean(_ref_union(p, 1.0, _divergence("reverse"))[..., 0], p["mask"]))
  got = _per_position(lambda *a: jit_gkd(*a, beta=beta, true_vocab_size=TRUE_V), s, teacher, p["mask"])
  counted = p["mask"] > 0
  assert np.all(got[counted] >= -1e-6)
  assert np.all(got[counted] <= full[..., 0][counted] * (1 + 1e-5) + 1e-6)


@pytest.mark.parametrize("bucket", [False, True])
def test_gkd_beta_limits_are_scaled_forward_and_reverse_kl(bucket):
  """JSD_beta / beta -> KL(p || q) as beta -> 0 and JSD_beta / (1 - beta) -> KL(q || p) as beta -> 1."""
  p = _problem(6, k_t=TRUE_V if not bucket else 3, scale=1.0)  # close enough for the asymptotic regime
  teacher, s, mask = _scores(p, 1.0), jnp.asarray(p["s"]), jnp.asarray(p["mask"])
  forward = _masked_mean(_ref_union(p, 1.0, _divergence("forward"))[..., 0], p["mask"])
  reverse = _masked_mean(_ref_union(p, 1.0, _divergence("reverse"))[..., 0], p["mask"])
  errors = []
  for eps in (1e-2, 1e-3):
    low = float(jit_gkd(s, teacher, mask, beta=eps, true_vocab_size=TRUE_V)[0].mean()) / eps
    high = float(jit_gkd(s, teacher, mask, beta=1 - eps, true_vocab_size=TRUE_V)[0].mean()) / eps
    errors.append((abs(low / forward - 1), abs(high / reverse - 1)))
  # First-order convergence: ten times closer to the limit, the relative error is about ten times smaller.
  for side in range(2):
    assert errors[1][side] < 0.2 * errors[0][side] and errors[1][side] < 0.03
  assert abs(forward - reverse) > 0.05 * forward  # the two limits are told apart
  _close(jit_gkd(s, teacher, mask, beta=0.0, true_vocab_size=TRUE_V)[0].mean(), forward)
  _close(jit_gkd(s, teacher, mask, beta=1.0, true_vocab_size=TRUE_V)[0].mean(), reverse)
  _close(jit_gkd(s, teacher, mask, beta=1.0, true_vocab_size=TRUE_V)[0].mean(),
         jit_union(s, teacher, mask, true_vocab_size=TRUE_V)[0].mean(), rtol=1e-6)


# ---------------------------------------------------------------- sampled-token reverse KL


def _ref_sampled(p, temp, log_mu=None):
  """(surrogate, w (log q(x) - log p(x)), d surrogate / d logits) per position, from the REINFORCE formula."""
  value, ratio, grad = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T, V))
  for b in range(B):
    for t in range(T):
      x = p["scored_ids"][b, t, 0]
      log_q = _log_softmax(p["s"][b, t, :TRUE_V] / temp)
      log_p = _log_softmax(p["z"][b, t] / temp)
      weight = 1.0 if log_mu is None else np.exp(log_q[x] - log_mu[b, t])
      advantage = log_p[x] - log_q[x]
      ratio[b, t] = -weight * advantage
      value[b, t] = -weight * advantage * log_q[x] * temp * temp
      # grad_s log q(x) = (onehot(x) - q) / temp; the weight and the advantage are constants.
      score = -np.exp(log_q)
      score[x] += 1.0
      grad[b, t, :TRUE_V] = -weight * advantage * score / temp * temp * temp
  return value, ratio, grad


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("temp", TEMPS)
def test_sampled_reverse_kl_value_metric_and_gradient_equal_the_reinforce_formula(temp, weighted):
  p = _problem(7, temp=temp)
  teacher, mask = _scores(p, temp), p["mask"]
  log_mu = np.random.default_rng(8).normal(size=(B, T)) - 2.0 if weighted else None
  value, ratio, grad = _ref_sampled(p, temp, log_mu)

  def f(s):
    loss, metrics = op.sampled_reverse_kl(s, teacher, jnp.asarray(mask), temperature=temp, true_vocab_size=TRUE_V,
                                          sampler_logprobs=None if log_mu is None else jnp.asarray(log_mu, jnp.float32))
    return loss.mean(), metrics

  (loss, metrics), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(p["s"]))
  _close(loss, _masked_mean(value, mask))
  _close(metrics["reverse_kl"].mean(), _masked_mean(ratio, mask))
  _close(g, grad * mask[..., None] / mask.sum(), rtol=1e-4, atol=1e-7)
  assert np.all(np.asarray(g)[..., TRUE_V:] == 0.0)
  assert ("importance_weight" in metrics) == weighted


@pytest.mark.parametrize("temp,sampler", [(1.0, "fresh"), (1.5, "fresh"), (1.0, "stale")])
def test_sampled_gradient_is_unbiased_for_the_reverse_kl_gradient(temp, sampler):
  """Averaged over many samples, the estimator's gradient approaches grad tau^2 KL(q || p).

  `fresh`: x ~ q at tau. `stale`: x ~ mu, a sampler with other parameters and a higher
  temperature, corrected by its log-probabilities (importance weights q / mu). Each
  component must lie within 4 standard errors of the exact gradient. A control fails
  the same check, so the tolerance tells a right estimator from a wrong one: fresh,
  the teacher's log-probability alone as the reward (no -log q term); stale, the same
  samples without the weights.
  """
  n, v = 8192, 8
  rng = np.random.default_rng(11)
  s = rng.normal(size=v) * 1.5
  z = rng.normal(size=v) * 1.5
  z = z - z.max()
  log_q, log_p = _log_softmax(s / temp), _log_softmax(z / temp)
  q = np.exp(log_q)
  kl = np.sum(q * (log_q - log_p))
  exact = temp * q * (log_q - log_p - kl)  # d/ds tau^2 KL(softmax(s/tau) || softmax(z/tau))
  log_mu = log_q if sampler == "fresh" else _log_softmax((s + rng.normal(size=v) * 0.5) / (1.3 * temp))
  x = rng.choice(v, size=n, p=np.exp(log_mu))
  teacher = op.TeacherScores(scored_ids=jnp.asarray(x.reshape(n, 1, 1), jnp.int32),
                             scored_logits=jnp.asarray(z[x].reshape(n, 1, 1), jnp.float32),
                             lse=jnp.full((n, 1), np.log(np.sum(np.exp(z / temp))), jnp.float32))
  logits = jnp.asarray(np.broadcast_to(s, (n, 1, v)), jnp.float32)

  def per_sample_gradients(sampler_logprobs):
    grad = jax.jit(jax.grad(lambda lg, mu: op.sampled_reverse_kl(lg, teacher, jnp.ones((n, 1)), temperature=temp,
                                                                  sampler_logprobs=mu)[0].sum))
    return np.asarray(grad(logits, sampler_logprobs), np.float64)[:, 0]  # (n, v): each sample's loss gradient

  if sampler == "fresh":
    estimate = per_sample_gradients(None)
    control = temp * (-log_p[x])[:, None] * (np.eye(v)[x] - q)  # reward log p alone, times tau^2 grad log q(x)
  else:
    estimate = per_sample_gradients(jnp.asarray(log_mu[x].reshape(n, 1), jnp.float32))
    control = per_sample_gradients(None)
  for samples, ok in ((estimate, True), (control, False)):
    mean, se = samples.mean(axis=0), samples.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(mean - exact) <= 4 * se + 1e-6) == ok
  mean = estimate.mean(axis=0)
  assert np.dot(mean, exact) / (np.linalg.norm(mean) * np.linalg.norm(exact)) > 0.99


# ---------------------------------------------------------------- duplicates, masking, numerics


def test_first_occurrences_keeps_the_first_valid_slot_of_every_id():
  rng = np.random.default_rng(12)
  ids = rng.integers(-2, 7, size=(4, 3, 9))
  valid = (rng.random(size=ids.shape) > 0.2) & (ids >= 0)
  got = np.asarray(jax.jit(op.first_occurrences)(jnp.asarray(ids, jnp.int32), jnp.asarray(valid)))
  want = np.zeros_like(valid)
  for idx in np.ndindex(ids.shape[:-1]):
    seen = set()
    for j in range(ids.shape[-1]):
      if valid[idx + (j,)] and ids[idx + (j,)] not in seen:
        seen.add(ids[idx + (j,)])
        want[idx + (j,)] = True
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["union", "gkd"])
def test_duplicates_count_once_and_the_top_k_value_wins(mode):
  """Scored ids repeating each other and the teacher's top-k, the repeats carrying wrong values."""
  p = _problem(13, k_t=3, k_s=2)
  top = p["topk_ids"]
  p["scored_ids"] = np.concatenate([top[..., :1], top[..., 1:3], p["scored_ids"][..., 1:], top[..., :1]], axis=-1)
  values = np.take_along_axis(p["z"], p["scored_ids"], axis=-1)
  wrong = values.copy()
  wrong[..., :3] -= 5.0  # the copies of top-k ids: their top-k slot must be the one used
  wrong[..., -1] -= 5.0
  teacher = _scores(p, 1.0, scored_values=wrong)
  div = _divergence("reverse") if mode == "union" else _divergence("jsd", 0.5)
  want = _ref_union(p, 1.0, div, teacher=_scores(p, 1.0, scored_values=values))
  fn = (lambda *a: jit_union(*a, true_vocab_size=TRUE_V)) if mode == "union" else (
      lambda *a: jit_gkd(*a, beta=0.5, true_vocab_size=TRUE_V))
  loss, metrics = fn(jnp.asarray(p["s"]), teacher, jnp.asarray(p["mask"]))
  _close(loss.mean(), _masked_mean(want[..., 0], p["mask"]))
  _close(metrics["union_support"].mean(), _masked_mean(want[..., 1], p["mask"]))
  assert np.all(want[..., 1] <= 3 + 2)


def test_invalid_slots_at_counted_positions_leave_the_union():
  """A scored id outside the real vocabulary or with a non-finite value joins the tail bucket."""
  p = _problem(14, k_t=2, k_s=3)
  values = np.take_along_axis(p["z"], p["scored_ids"], axis=-1)
  ids = p["scored_ids"].copy()
  ids[..., 1] = TRUE_V + 1  # a padded id
  values[..., 2] = -np.inf
  p["scored_ids"] = ids
  teacher = _scores(p, 1.0, scored_values=values)
  want = _ref_union(p, 1.0, _divergence("reverse"), teacher=teacher)
  loss, _ = jit_union(jnp.asarray(p["s"]), teacher, jnp.asarray(p["mask"]), true_vocab_size=TRUE_V)
  _close(loss.mean(), _masked_mean(want[..., 0], p["mask"]))


def _garbage(teacher, mask):
  """The same answer with NaN values, NaN lse and ids outside the vocabulary at masked positions."""
  off = np.asarray(mask) == 0
  def spoil(x, bad):
    x = np.array(x)
    x[off] = bad
    return jnp.asarray(x)
  return op.TeacherScores(scored_ids=spoil(teacher.scored_ids, -7), scored_logits=spoil(teacher.scored_logits, np.nan),
                          lse=spoil(teacher.lse, np.nan), topk_ids=spoil(teacher.topk_ids, 10**6),
                          topk_logits=spoil(teacher.topk_logits, np.nan))


@pytest.mark.parametrize("mode", sorted(op.ON_POLICY_LOSSES))
def test_masked_positions_never_leak_and_weights_apply(mode):
  p = _problem(15)
  mask = p["mask"] * np.where(np.arange(T) % 2 == 0, 1.0, 0.5)[None].astype(np.float32)  # weighted mask
  teacher = _scores(p, 2.0)

  log_mu = np.full((B, T), -1.5, np.float32)
  dirty_mu = np.where(mask > 0, log_mu, np.nan).astype(np.float32)

  def f(s, teacher, m, mu):
    loss, metrics = op.on_policy_kd(s, teacher, m, mode=mode, temperature=2.0, beta=0.3, true_vocab_size=TRUE_V,
                                    sampler_logprobs=mu)
    return loss.mean(), metrics

  step = jax.jit(jax.value_and_grad(f, has_aux=True))
  (clean, metrics), g_clean = step(jnp.asarray(p["s"]), teacher, jnp.asarray(mask), jnp.asarray(log_mu))
  (dirty, _), g_dirty = step(jnp.asarray(p["s"]), _garbage(teacher, mask), jnp.asarray(mask), jnp.asarray(dirty_mu))
  assert np.isfinite(float(clean)) and np.all(np.isfinite(np.asarray(g_dirty)))
  _close(dirty, clean, rtol=1e-6)
  _close(g_dirty, g_clean, rtol=1e-6, atol=1e-9)
  assert np.all(np.asarray(g_clean)[mask == 0] == 0.0)
  assert float(metrics["reverse_kl"].count) == pytest.approx(float(mask.sum()))
  # Weights: the token-weighted mean of the per-position values.
  per = _per_position(lambda s, t, m: op.on_policy_kd(s, t, m, mode=mode, temperature=2.0, beta=0.3,
                                                      true_vocab_size=TRUE_V, sampler_logprobs=jnp.asarray(log_mu)),
                      jnp.asarray(p["s"]), teacher, (mask > 0).astype(np.float32))
  _close(clean, np.sum(per * mask) / mask.sum())
  # Nothing counted: loss 0, gradient 0.
  (empty, _), g_empty = step(jnp.asarray(p["s"]), _garbage(teacher, np.zeros_like(mask)), jnp.zeros((B, T)),
                             jnp.full((B, T), np.nan))
  assert float(empty) == 0.0 and not np.any(np.asarray(g_empty))


@pytest.mark.parametrize("mode", sorted(op.ON_POLICY_LOSSES))
def test_tiny_probabilities_keep_values_exact_and_gradients_finite(mode):
  """Confident student and teacher (logit scale 40): the tails underflow to 1e-30 and below."""
  p = _problem(16, k_t=2, k_s=2, scale=40.0)
  teacher, mask = _scores(p, 1.0), p["mask"]

  def f(s):
    loss, metrics = op.on_policy_kd(s, teacher, jnp.asarray(mask), mode=mode, beta=0.5, true_vocab_size=TRUE_V)
    return loss.mean(), metrics

  (loss, metrics), g = jax.jit(jax.value_and_grad(f, has_aux=True))(jnp.asarray(p["s"]))
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0
  if mode == "reverse_kl_union":
    want = _ref_union(p, 1.0, _divergence("reverse"))
    _close(loss, _masked_mean(want[..., 0], mask), rtol=1e-4)
  if mode == "gkd":
    want = _ref_union(p, 1.0, _divergence("jsd", 0.5))
    _close(loss, _masked_mean(want[..., 0], mask), rtol=1e-4)


@pytest.mark.parametrize("mode", ["reverse_kl_union", "gkd"])
def test_f16_wire_values_meet_the_accuracy_budget(mode):
  """Teacher values sent as float16 (raw logits ~20-30, shifted by the teacher's compute_targets): within 1e-3."""
  rng = np.random.default_rng(21)
  b, t, v, k = 4, 16, 256, 32
  z = (rng.normal(size=(b, t, v)) * 2.5 + 25.0).astype(np.float32)
  shifted = z - z.max(axis=-1, keepdims=True)
  mask = jnp.ones((b, t))
  for s in (z + rng.normal(size=z.shape), rng.normal(size=z.shape) * 2.5 + 22.0):  # a student near, one far
    scored = np.concatenate([rng.integers(0, v, size=(b, t, 1)), np.argsort(-s, axis=-1)[..., :k]], axis=-1)
    for temp in TEMPS:
      got = {}
      for dtype in ("float32", "float16"):
        targets = compute_targets(jnp.asarray(z), k=k, temperatures=(temp,), true_vocab_size=v, value_dtype=dtype)
        teacher = op.TeacherScores(
            scored_ids=jnp.asarray(scored, jnp.int32),
            scored_logits=jnp.asarray(np.take_along_axis(shifted, scored, axis=-1)).astype(dtype),
            lse=targets.logsumexp[..., 0], topk_ids=targets.topk_ids, topk_logits=targets.topk_logits)
        got[dtype] = float(jax.jit(lambda x, tt: op.on_policy_kd(x, tt, mask, mode=mode, temperature=temp)[0].mean())(
            jnp.asarray(s, jnp.float32), teacher))
      assert abs(got["float16"] / got["float32"] - 1.0) < 1e-3


# ---------------------------------------------------------------- chunked, API


@pytest.mark.parametrize("mode", sorted(op.ON_POLICY_LOSSES))
def test_fused_per_chunk_equals_whole_logits_values_metrics_and_gradients(mode):
  p = _problem(17)
  rng = np.random.default_rng(18)
  hidden = jnp.asarray(rng.normal(size=(B, T, 6)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(6, V)), jnp.float32)
  teacher, mask = _scores(p, 2.0), jnp.asarray(p["mask"])
  log_mu = jnp.asarray(rng.normal(size=(B, T)) - 2.0, jnp.float32)

  def f(h, w, chunk):
    loss, metrics = op.fused_on_policy_kd(h, lambda x: jnp.einsum("bte,ev->btv", x, w), teacher, mask, mode=mode,
                                          temperature=2.0, beta=0.7, sampler_logprobs=log_mu,
                                          true_vocab_size=TRUE_V, chunk_size=chunk)
    return loss.sum, metrics

  want = jax.jit(jax.value_and_grad(lambda h, w: f(h, w, 0), argnums=(0, 1), has_aux=True))(hidden, weight)
  got = jax.jit(jax.value_and_grad(lambda h, w: f(h, w, 2), argnums=(0, 1), has_aux=True))(hidden, weight)
  (want_loss, want_metrics), want_grads = want
  (loss, metrics), grads = got
  _close(loss, want_loss, rtol=1e-5)
  for name in want_metrics:
    _close(metrics[name].sum, want_metrics[name].sum, rtol=1e-5)
  for g, wg in zip(grads, want_grads):
    _close(g, wg, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(want_grads[1])).max() > 0


def test_bad_inputs_raise_naming_the_field():
  p = _problem(19)
  teacher, s, mask = _scores(p, 1.0), jnp.asarray(p["s"]), jnp.asarray(p["mask"])
  with pytest.raises(ValueError, match="scored_logits"):
    op.union_reverse_kl(s, teacher.replace(scored_logits=teacher.scored_logits[..., :1]), mask)
  with pytest.raises(ValueError, match="lse"):
    op.sampled_reverse_kl(s, teacher.replace(lse=teacher.lse[..., None]), mask)
  with pytest.raises(ValueError, match="topk_ids"):
    op.gkd(s, teacher.replace(topk_logits=None), mask)
  with pytest.raises(ValueError, match="scored_ids"):
    op.gkd(s, teacher.replace(scored_ids=teacher.scored_ids.astype(jnp.float32)), mask)
  with pytest.raises(ValueError, match="sampler_logprobs"):
    op.sampled_reverse_kl(s, teacher, mask, sampler_logprobs=jnp.zeros((B, T, 1)))
  with pytest.raises(ValueError, match="beta"):
    op.gkd(s, teacher, mask, beta=1.5)
  with pytest.raises(ValueError, match="mode"):
    op.on_policy_kd(s, teacher, mask, mode="forward_kl")


@pytest.mark.parametrize("mode", sorted(op.ON_POLICY_LOSSES))
def test_memory_holds_at_most_one_vocab_sized_buffer(mode):
  """Loss + gradient keep the student's (B, T, V) temporaries to about one float32 buffer (as the KD modes do)."""
  b, t, v, k = 4, 32, 2048, 16
  rng = np.random.default_rng(20)
  s = jnp.asarray(rng.normal(size=(b, t, v)).astype(np.float32))
  z = rng.normal(size=(b, t, v - 8))
  z = z - z.max(axis=-1, keepdims=True)
  top = np.argsort(-z, axis=-1)[..., :k]
  scored = np.concatenate([rng.integers(0, v - 8, size=(b, t, 1)), np.argsort(-np.asarray(s)[..., :v - 8])[..., :k]],
                          axis=-1)
  teacher = op.TeacherScores(scored_ids=jnp.asarray(scored, jnp.int32),
                             scored_logits=jnp.asarray(np.take_along_axis(z, scored, -1), jnp.float16),
                             lse=jnp.asarray(np.log(np.exp(z).sum(-1)), jnp.float32),
                             topk_ids=jnp.asarray(top, jnp.int32),
                             topk_logits=jnp.asarray(np.take_along_axis(z, top, -1), jnp.float16))

  def loss(x):
    return op.on_policy_kd(x, teacher, jnp.ones((b, t)), mode=mode, temperature=2.0, true_vocab_size=v - 8)[0].mean()

  stats = jax.jit(jax.value_and_grad(loss)).lower(s).compile().memory_analysis()
  assert stats.temp_size_in_bytes <= 1.5 * b * t * v * 4 + 64 * 1024, stats
