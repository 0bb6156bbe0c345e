"""Sampled teacher targets: the device-side draws and the unbiased `sampled` KD estimator.

The statistical tests use fixed seeds; their tolerances are stated where they
are checked (a few standard errors of the Monte Carlo mean, so a correct
estimator fails with probability well under 1e-4 per check).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_core import sampling
from distill_core.config import ConfigError, build
from distill_core.parts.samples import SampleRequest
from distill_core.targets import TeacherTargets, compute_targets, concat, from_numpy, slice_batch, to_numpy
from student_trainer import losses

B, T, V, TRUE_V = 2, 4, 64, 60
Z_SIGMAS = 5.0  # tolerance of every Monte Carlo check, in standard errors of its mean


def _logits(seed, scale=2.5, teacher_scale=None):
  rng = np.random.default_rng(seed)
  s = (rng.normal(size=(B, T, V)) * scale).astype(np.float32)
  z = (rng.normal(size=(B, T, V)) * (teacher_scale or scale)).astype(np.float32)
  z[..., TRUE_V:] = 40.0  # padded ids: excluded on both sides (and never sampled)
  s[..., TRUE_V:] = 40.0
  mask = np.ones((B, T), np.float32)
  mask[1, -1] = 0.0
  return s, z, mask


@functools.partial(jax.jit, static_argnames=("k", "slots", "exclude", "value_dtype"))
def _sampled_targets(z, seed_words, temps, tau, n=None, *, k, slots, exclude, value_dtype="float32"):
  """N = n draws (default: slots) in `slots` slots, so one compilation serves several N."""
  eids = jnp.asarray(sampling.split_u64(np.arange(B) + 1000))
  return compute_targets(z, k=k, temperatures=temps, true_vocab_size=TRUE_V, value_dtype=value_dtype,
                         num_samples=slots, sample_temperature=tau, sample_seed=seed_words, example_ids=eids,
                         sample_exclude=exclude, sample_counts=n)


@functools.partial(jax.jit, static_argnames=("k", "slots", "exclude"))
def _many(z, seeds, temp, tau, n, *, k, slots, exclude):
  """Targets for every seed (vmapped over the seed words)."""
  return jax.vmap(lambda w: _sampled_targets(z, w, jnp.reshape(temp, (1,)), tau, n, k=k, slots=slots,
                                             exclude=exclude))(seeds)


def _seeds(count):
  return jnp.asarray(sampling.split_u64(np.arange(count)))


def _loss_and_grad(targets_batch, s, mask, *, temp, k, mode="sampled"):
  def one(targets):
    def f(x):
      return losses.kd_sparse(x, targets, jnp.asarray(mask), mode=mode, temperature=temp, k=k,
                              true_vocab_size=TRUE_V)[0].sum
    return jax.value_and_grad(f)(jnp.asarray(s))
  return jax.jit(jax.vmap(one))(targets_batch)


def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.sum(np.exp(x), -1, keepdims=True))


def _dense(s, z, mask, temp):
  def f(x):
    return losses.kd_dense(x, jnp.asarray(z), jnp.asarray(mask), temperature=temp, true_vocab_size=TRUE_V)[0].sum
  value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(s))
  return float(value), np.asarray(grad)


# ---------------------------------------------------------------- the draws


def test_draws_follow_the_proposal_and_never_hit_padded_or_excluded_ids():
  """Chi-square goodness of fit of 20000 draws per position; padded and excluded ids get none."""
  _, z, _ = _logits(1)
  n, k = 20000, 5
  for tau, exclude in ((1.0, 0), (2.5, 0), (0.7, k)):
    t = _sampled_targets(jnp.asarray(z), jnp.asarray(sampling.split_u64(np.asarray(7))), jnp.ones((1,)), tau,
                         k=k, slots=n, exclude=exclude)
    ids, counts, logits = (np.asarray(x) for x in (t.sample_ids, t.sample_counts, t.sample_logits))
    topk = np.asarray(t.topk_ids)
    assert t.sample_skip == exclude and np.all(counts.sum(-1) == n)
    for b in range(B):
      for p_ in range(T):
        zz = z[b, p_, :TRUE_V].astype(np.float64)
        zz = zz - zz.max()
        x = zz / tau
        support = np.ones(TRUE_V, bool)
        support[topk[b, p_, :exclude]] = False
        lse = np.log(np.sum(np.exp(x[support])))
        np.testing.assert_allclose(float(t.sample_logsumexp[b, p_]), lse, rtol=1e-6, atol=1e-6)
        emp = np.zeros(V)
        np.add.at(emp, ids[b, p_], counts[b, p_])
        assert emp[TRUE_V:].sum() == 0, "a padded vocabulary id was sampled"
        assert emp[:TRUE_V][~support].sum() == 0, "an excluded top-k id was sampled"
        used = counts[b, p_] > 0
        assert np.all(np.diff(ids[b, p_][used]) > 0) and np.all(ids[b, p_][~used] == 0)
        np.testing.assert_allclose(logits[b, p_][used], zz[ids[b, p_][used]], atol=1e-5)
        expect = n * np.exp(x[:TRUE_V] - lse) * support
        chi2 = np.sum((emp[:TRUE_V][support] - expect[support]) ** 2 / expect[support])
        dof = support.sum() - 1
        assert chi2 < dof + 6 * np.sqrt(2 * dof), (tau, exclude, b, p_, chi2, dof)  # ~6 sigma


def test_draws_depend_only_on_seed_example_id_and_position():
  """Same (seed, id, position): same draws whatever the batch, row order, padding or slot count."""
  rng = np.random.default_rng(2)
  z = rng.normal(size=(3, 5, V)).astype(np.float32)
  z = z - z.max(-1, keepdims=True)
  top = np.argsort(-z, -1)[..., :4].astype(np.int32)
  draw = jax.jit(sampling.draw_samples, static_argnames=("num_draws",))
  seed = sampling.split_u64(np.asarray(11))
  eids = sampling.split_u64(np.asarray([5, 2**40 + 3, 9]))
  base = [np.asarray(x) for x in draw(z, top, num_draws=16, num_samples=16, temperature=1.0, exclude=0,
                                      seeds=seed, example_ids=eids)]
  # Rows reordered, one row alone, and more slots with only 16 draws made: identical per row.
  perm = [2, 0, 1]
  shuffled = [np.asarray(x) for x in draw(z[perm], top[perm], num_draws=16, num_samples=16, temperature=1.0,
                                          exclude=0, seeds=seed, example_ids=eids[perm])]
  wider = [np.asarray(x) for x in draw(z, top, num_draws=40, num_samples=16, temperature=1.0, exclude=0,
                                       seeds=seed, example_ids=eids)]
  for a, b_, c in zip(base, shuffled, wider):
    np.testing.assert_array_equal(a[perm], b_)
    np.testing.assert_array_equal(a[..., :16] if a.ndim == 3 else a, c[..., :16] if c.ndim == 3 else c)
  assert np.all(wider[1][..., 16:] == 0)
  other_seed = np.asarray(draw(z, top, num_draws=16, num_samples=16, temperature=1.0, exclude=0,
                               seeds=sampling.split_u64(np.asarray(12)), example_ids=eids)[0])
  assert not np.array_equal(other_seed, base[0])
  other_ids = np.asarray(draw(z, top, num_draws=16, num_samples=16, temperature=1.0, exclude=0, seeds=seed,
                              example_ids=sampling.split_u64(np.asarray([6, 2**40 + 4, 10])))[0])
  assert not np.array_equal(other_ids, base[0])
  # Positions differ from each other (the column index is part of the key).
  assert len({tuple(base[0][0, t]) for t in range(5)}) > 1


def test_sampled_targets_round_trip_slice_and_concat():
  _, z, _ = _logits(3)
  t = _sampled_targets(jnp.asarray(z), jnp.asarray(sampling.split_u64(np.asarray(1))), jnp.ones((1,)), 1.0,
                       k=4, slots=8, exclude=4, value_dtype="float16")
  host = jax.tree.map(np.asarray, t)
  flat = to_numpy(host)
  back = from_numpy(flat)
  assert back.sample_skip == 4 and back.has_samples and back.sample_logits.dtype == np.float16
  for name in ("sample_ids", "sample_counts", "sample_logits", "sample_logsumexp", "sample_temperature"):
    np.testing.assert_array_equal(getattr(back, name), getattr(host, name))
  joined = concat([slice_batch(host, 0, 1), slice_batch(host, 1, 2)])
  for name in ("sample_ids", "sample_counts", "sample_logits", "sample_logsumexp", "topk_ids"):
    np.testing.assert_array_equal(getattr(joined, name), getattr(host, name))
  with pytest.raises(ValueError, match="sampled"):
    concat([host, host.replace(sample_skip=0)])
  with pytest.raises(ValueError, match="sample_counts"):
    from_numpy({**flat, "sample_counts": flat["sample_counts"][:, :, :3]})
  with pytest.raises(ValueError, match="sample_logsumexp: missing"):
    from_numpy({key: v for key, v in flat.items() if key != "sample_logsumexp"})
  with pytest.raises(ValueError, match="sample_skip"):
    host.replace(sample_skip=9).validate()


def test_compute_targets_checks_sampling_arguments():
  _, z, _ = _logits(4)
  with pytest.raises(ValueError, match="example_ids"):
    compute_targets(jnp.asarray(z), k=4, temperatures=(1.0,), true_vocab_size=TRUE_V, num_samples=4)
  with pytest.raises(ValueError, match="sample_exclude"):
    compute_targets(jnp.asarray(z), k=4, temperatures=(1.0,), true_vocab_size=TRUE_V, num_samples=4,
                    example_ids=sampling.split_u64(np.arange(B)), sample_exclude=5)
  for bad, field in (({"num_samples": 0}, "num_samples"), ({"num_samples": 2, "temperature": 0.0},
                     "sample_temperature"), ({"num_samples": 2, "temperature": float("nan")}, "sample_temperature"),
                     ({"num_samples": 2, "seed": -1}, "sample_seed")):
    with pytest.raises(ValueError, match=field):
      SampleRequest(**bad)


# ---------------------------------------------------------------- the estimator


@pytest.mark.parametrize("k, exclude, temp, tau", [
    (0, 0, 1.0, 2.0),  # samples only, a flatter proposal than the loss distribution (weights != 1)
    (4, 4, 1.0, 1.5),  # exact top-4, samples from the tail beyond it
    (4, 0, 1.0, 1.0),  # exact top-4, samples from the whole vocabulary (draws in the top-4 dropped)
])
def test_sampled_estimator_is_unbiased_and_top_k_estimators_are_not(k, exclude, temp, tau):
  """Over 1024 seeds the mean sampled loss and gradient match kd_dense within Z_SIGMAS standard errors;
  `topk` and `tail` at the same top-k miss the dense loss or gradient by far more than that tolerance.

  The teacher's smallest probabilities are ~1e-3, so every id is drawn many times over the 16384
  draws per position: the sample standard error is then a fair estimate (with ids drawn once
  in a million, the Monte Carlo mean itself would not have converged)."""
  s, z, mask = _logits(5, teacher_scale=1.0)
  seeds = np.arange(1024)
  targets = _many(jnp.asarray(z), _seeds(len(seeds)), jnp.float32(temp), jnp.float32(tau), 16, k=max(k, 1),
                  slots=16, exclude=exclude)
  values, grads = (np.asarray(x, np.float64) for x in _loss_and_grad(targets, s, mask, temp=temp, k=k))
  dense_value, dense_grad = _dense(s, z, mask, temp)

  def within(mean, se, want, atol):
    return np.abs(mean - want) <= Z_SIGMAS * se + atol

  se_v = values.std(ddof=1) / np.sqrt(len(seeds))
  assert within(values.mean(), se_v, dense_value, 1e-4 * abs(dense_value)), (values.mean(), dense_value, se_v)
  se_g = grads.std(axis=0, ddof=1) / np.sqrt(len(seeds))
  ok = within(grads.mean(axis=0), se_g, dense_grad, 1e-6)
  assert ok.all(), (np.abs(grads.mean(axis=0) - dense_grad)[~ok], se_g[~ok], dense_grad[~ok])
  assert se_v > 0 and se_v < 0.2 * abs(dense_value)  # the check has power: the estimator is not exact
  # The same criterion rejects the biased top-k estimators (deterministic, so their "mean" is their value).
  kb = max(k, 1)
  for mode in ("topk", "tail"):
    t0 = jax.tree.map(lambda x: x[0], targets)
    v, g = (np.asarray(x, np.float64) for x in jax.tree.map(lambda x: x[0], _loss_and_grad(
        jax.tree.map(lambda x: x[None], t0), s, mask, temp=temp, k=kb, mode=mode)))
    biased = not within(v, se_v, dense_value, 1e-4 * abs(dense_value)) or not within(g, se_g, dense_grad,
                                                                                       1e-6).all()
    assert biased, f"{mode} at k={kb} would pass the unbiasedness test"


def test_variance_falls_as_one_over_n():
  """tau = T: every draw has weight 1, so Var = sum_pos Var_p(f) / N exactly (f = T^2 (log p - log q));
  the variance over 300 seeds matches it within 25% (about 3 standard errors) for N = 8, 32, 128."""
  s, z, mask = _logits(6)
  temp = 1.5
  log_p = _log_softmax64(z[..., :TRUE_V] / temp)
  log_q = _log_softmax64(s[..., :TRUE_V] / temp)
  f = temp * temp * (log_p - log_q)
  p = np.exp(log_p)
  var_f = np.sum(p * f * f, -1) - np.sum(p * f, -1) ** 2  # (B, T)
  var_sum = float(np.sum(var_f * (mask > 0)))
  seeds = np.arange(300)
  ratios = []
  for n in (8, 32, 128):
    targets = _many(jnp.asarray(z), _seeds(len(seeds)), jnp.float32(temp), jnp.float32(temp), n, k=1, slots=128,
                    exclude=0)
    values = np.asarray(_loss_and_grad(targets, s, mask, temp=temp, k=0)[0], np.float64)
    ratios.append(values.var(ddof=1) / (var_sum / n))
  assert all(0.75 < r < 1.33 for r in ratios), ratios


def test_sampled_loss_masks_and_stays_finite():
  s, z, mask = _logits(7, scale=15.0)
  mask[0] = 0.0  # an all-padding row
  t = _sampled_targets(jnp.asarray(z), jnp.asarray(sampling.split_u64(np.asarray(3))), jnp.ones((1,)), 1.0,
                       k=4, slots=8, exclude=4, value_dtype="float16")
  t = t.replace(sample_logits=t.sample_logits.at[0].set(jnp.nan), sample_ids=t.sample_ids.at[0].set(V + 7),
                sample_logsumexp=t.sample_logsumexp.at[0].set(jnp.nan), topk_logits=t.topk_logits.at[0].set(jnp.nan))

  def f(x):
    return losses.kd_sparse(x, t, jnp.asarray(mask), mode="sampled", k=4, true_vocab_size=TRUE_V)[0].mean()

  value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(s))
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[0] == 0.0) and np.any(np.asarray(grad)[1] != 0.0)
  _, metrics = jax.jit(lambda x: losses.kd_sparse(x, t, jnp.asarray(mask), mode="sampled", k=4,
                                                  true_vocab_size=TRUE_V))(jnp.asarray(s))
  assert 0 < float(metrics["teacher_tail_mass"].mean()) < 1 and float(metrics["kd_support"].mean()) > 4


def test_sampled_mode_checks_its_inputs_and_config():
  s, z, mask = _logits(8)
  plain = compute_targets(jnp.asarray(z), k=4, temperatures=(1.0,), true_vocab_size=TRUE_V)
  with pytest.raises(ValueError, match="sample_ids"):
    losses.kd_sparse(jnp.asarray(s), plain, jnp.asarray(mask), mode="sampled")
  tail = _sampled_targets(jnp.asarray(z), jnp.asarray(sampling.split_u64(np.asarray(3))), jnp.ones((1,)), 1.0,
                          k=4, slots=8, exclude=4)
  with pytest.raises(ValueError, match="first 4 top-k ids"):
    losses.kd_sparse(jnp.asarray(s), tail, jnp.asarray(mask), mode="sampled", k=2)
  cfg = build(losses.LossConfig, {"kd_mode": "sampled", "top_k": 0, "num_samples": 16, "sample_temperature": 2.0})
  assert cfg.request_k == 1 and cfg.sampling == SampleRequest(16, 2.0, 0, 0)
  cfg = build(losses.LossConfig, {"kd_mode": "sampled", "top_k": 8, "num_samples": 4})
  assert cfg.sampling.exclude == 8 and build(losses.LossConfig, {}).sampling is None
  for data, key in (({"kd_mode": "sampled"}, "num_samples"), ({"top_k": 0}, "top_k"),
                    ({"kd_mode": "sampled", "num_samples": 4, "sample_temperature": 0.0}, "sample_temperature"),
                    ({"kd_mode": "sampled", "num_samples": 4, "sample_temperature": float("nan")},
                     "sample_temperature")):
    with pytest.raises(ConfigError, match=key):
      build(losses.LossConfig, data)


def test_sampled_loss_memory_holds_at_most_one_vocab_sized_buffer():
  b, t, v = 4, 32, 2048
  rng = np.random.default_rng(11)
  s = jnp.asarray(rng.normal(size=(b, t, v)).astype(np.float32))
  targets = compute_targets(s[::-1], k=16, temperatures=(1.0,), true_vocab_size=v - 8, num_samples=32,
                            example_ids=sampling.split_u64(np.arange(b)), sample_exclude=0)
  mask = jnp.ones((b, t))

  def loss(x):
    return losses.kd_sparse(x, targets, mask, mode="sampled", k=16, true_vocab_size=v - 8)[0].mean()

  stats = jax.jit(jax.value_and_grad(loss)).lower(s).compile().memory_analysis()
  assert stats.temp_size_in_bytes <= 1.5 * b * t * v * 4 + 64 * 1024, stats
