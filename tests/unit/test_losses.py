"""Distillation losses against independent float64 NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_core.config import ConfigError, build
from distill_core.targets import TeacherTargets, compute_targets, slice_batch
from student_trainer import losses
from student_trainer.schedules import ScheduleConfig

B, T, V, TRUE_V, K = 3, 6, 48, 44, 8
MODES = ("tail", "renormalize", "topk")

# Jitted entry points keep the suite fast (eager mode compiles every primitive).
jit_kd_sparse = jax.jit(losses.kd_sparse, static_argnames=("mode", "top_p", "k", "true_vocab_size"))
jit_kd_dense = jax.jit(losses.kd_dense, static_argnames=("true_vocab_size",))
jit_ce = jax.jit(losses.ce, static_argnames=("true_vocab_size",))


# ---------------------------------------------------------------- references


def _log_softmax(x):
  x = x - x.max()
  return x - np.log(np.sum(np.exp(x)))


def _ref_kl_row(s, z, k, temp, mode, top_p):
  """T^2 * KL for one position from full float64 logits over the real vocabulary."""
  log_p, log_q = _log_softmax(z / temp), _log_softmax(s / temp)
  order = np.argsort(-z, kind="stable")[:k]
  p = np.exp(log_p[order])
  n = k
  if top_p:
    reached = np.nonzero(np.cumsum(p) >= top_p)[0]
    n = int(reached[0]) + 1 if reached.size else k
  support = order[:n]
  p_s, lp_s, lq_s = p[:n], log_p[support], log_q[support]
  if mode == "topk":
    kl = np.sum(p_s * (lp_s - lq_s))
  elif mode == "renormalize":
    pr, qr = p_s / p_s.sum(), np.exp(lq_s) / np.exp(lq_s).sum()
    kl = np.sum(pr * (np.log(pr) - np.log(qr)))
  else:
    outside = np.ones(z.shape[0], bool)
    outside[support] = False
    r, q_tail = np.exp(log_p[outside]).sum(), np.exp(log_q[outside]).sum()
    kl = np.sum(p_s * (lp_s - lq_s)) + (r * (np.log(r) - np.log(q_tail)) if outside.any() else 0.0)
  return temp * temp * kl, n


def _ref_sparse(s, z, mask, k, temp, mode, top_p=None, true_v=None):
  """(masked mean, mean support size) with explicit loops."""
  true_v = true_v or s.shape[-1]
  total, count, support = 0.0, 0.0, 0.0
  for b in range(s.shape[0]):
    for t in range(s.shape[1]):
      if mask[b, t] > 0:
        kl, n = _ref_kl_row(s[b, t, :true_v].astype(np.float64), z[b, t, :true_v].astype(np.float64),
                            k, temp, mode, top_p)
        total, count, support = total + kl, count + 1, support + n
  return total / count, support / count


def _inputs(seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  s = (rng.normal(size=(B, T, V)) * scale).astype(np.float32)
  z = (rng.normal(size=(B, T, V)) * scale).astype(np.float32)
  z[..., TRUE_V:] = 50.0  # padded ids: must be excluded on both sides
  s[..., TRUE_V:] = 50.0
  mask = (rng.random(size=(B, T)) > 0.25).astype(np.float32)
  mask[0, 0] = 1.0
  return s, z, mask


_compute_targets = jax.jit(compute_targets, static_argnames=("k", "true_vocab_size", "value_dtype"))


def _targets(z, temps, k=K, true_v=TRUE_V, dtype="float32"):
  return _compute_targets(jnp.asarray(z), k=k, temperatures=jnp.asarray(temps, jnp.float32),
                          true_vocab_size=true_v, value_dtype=dtype)


# ---------------------------------------------------------------- KD


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_p", [None, 0.6])
@pytest.mark.parametrize("temp", [0.7, 1.0, 3.0])
def test_sparse_matches_reference(mode, top_p, temp):
  s, z, mask = _inputs()
  loss, metrics = jit_kd_sparse(jnp.asarray(s), _targets(z, (temp,)), jnp.asarray(mask), mode=mode,
                                   top_p=top_p, true_vocab_size=TRUE_V)
  want, support = _ref_sparse(s, z, mask, K, temp, mode, top_p, TRUE_V)
  np.testing.assert_allclose(float(loss.mean()), want, rtol=2e-5)
  assert float(loss.count) == mask.sum()
  np.testing.assert_allclose(float(metrics["kd_support"].mean()), support, rtol=1e-6)
  if top_p is not None:
    assert support < K  # the cut is active in this case


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_p", [None, 0.6])
def test_fused_chunks_match_reference(mode, top_p):
  """The chunked (fused) path, with the identity as lm_head and chunks of 4 of T=6 positions, against NumPy."""
  s, z, mask = _inputs()
  cfg = losses.LossConfig(kd_mode=mode, top_k=K, top_p=top_p, chunk_size=4)
  labels = np.argmax(z[..., :TRUE_V], axis=-1).astype(np.int32)
  fused = jax.jit(lambda x, t, m: losses.fused_logit_losses(x, lambda h: h, jnp.asarray(labels), t, m, cfg,
                                                            temperature=2.0, true_vocab_size=TRUE_V))
  ce, kd, metrics = fused(jnp.asarray(s), _targets(z, (2.0,)), jnp.asarray(mask))
  want, support = _ref_sparse(s, z, mask, K, 2.0, mode, top_p, TRUE_V)
  np.testing.assert_allclose(float(kd.mean()), want, rtol=2e-5)
  np.testing.assert_allclose(float(metrics["kd_support"].mean()), support, rtol=1e-6)
  log_q = np.stack([[_log_softmax(row[:TRUE_V].astype(np.float64)) for row in rows] for rows in s])
  want_ce = -np.take_along_axis(log_q, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(ce.mean()), (want_ce * mask).sum() / mask.sum(), rtol=2e-5)


def test_teacher_tail_mass_metric():
  s, z, mask = _inputs(seed=1)
  _, metrics = jit_kd_sparse(jnp.asarray(s), _targets(z, (2.0,)), jnp.asarray(mask), true_vocab_size=TRUE_V)
  want = []
  for b, t in zip(*np.nonzero(mask)):
    p = np.exp(_log_softmax(z[b, t, :TRUE_V].astype(np.float64) / 2.0))
    want.append(1.0 - np.sort(p)[::-1][:K].sum())
  np.testing.assert_allclose(float(metrics["teacher_tail_mass"].mean()), np.mean(want), rtol=1e-5)


def test_dense_matches_reference_and_tail_with_full_k():
  s, z, mask = _inputs(seed=2)
  for temp in (0.5, 1.0, 2.0):
    dense, _ = jit_kd_dense(jnp.asarray(s), jnp.asarray(z), jnp.asarray(mask), temperature=temp,
                               true_vocab_size=TRUE_V)
    want, _ = _ref_sparse(s, z, mask, TRUE_V, temp, "topk", None, TRUE_V)  # k = V: the full KL
    np.testing.assert_allclose(float(dense.mean()), want, rtol=2e-5)
    tail, _ = jit_kd_sparse(jnp.asarray(s), _targets(z, (temp,), k=TRUE_V), jnp.asarray(mask),
                               true_vocab_size=TRUE_V)
    np.testing.assert_allclose(float(tail.mean()), float(dense.mean()), rtol=1e-5)


@pytest.mark.parametrize("temp", [0.5, 1.0, 2.0, 8.0])
def test_identical_teacher_and_student_give_zero(temp):
  _, z, mask = _inputs(seed=3)
  zj, maskj = jnp.asarray(z), jnp.asarray(mask)
  for k, top_ps in ((K, (None, 0.5)), (TRUE_V, (None,))):
    for mode in MODES:
      for top_p in top_ps:
        loss, _ = jit_kd_sparse(zj + 7.0, _targets(z, (temp,), k=k), maskj, mode=mode, top_p=top_p,
                                   true_vocab_size=TRUE_V)
        assert abs(float(loss.mean())) < 1e-6 * max(1.0, temp * temp), (k, mode, top_p)
  dense, _ = jit_kd_dense(zj, zj - 3.0, maskj, temperature=temp, true_vocab_size=TRUE_V)
  assert abs(float(dense.mean())) < 1e-6 * max(1.0, temp * temp)


def test_forward_kl_direction():
  p = np.array([0.7, 0.2, 0.05, 0.05])
  q = np.array([0.25, 0.25, 0.25, 0.25])
  forward, reverse = np.sum(p * np.log(p / q)), np.sum(q * np.log(q / p))
  assert abs(forward - reverse) > 0.05
  z, s = np.log(p)[None, None].astype(np.float32), np.log(q)[None, None].astype(np.float32)
  mask = jnp.ones((1, 1))
  dense, _ = jit_kd_dense(jnp.asarray(s), jnp.asarray(z), mask, temperature=1.0)
  sparse, _ = jit_kd_sparse(jnp.asarray(s), _targets(z, (1.0,), k=4, true_v=4), mask)
  np.testing.assert_allclose([float(dense.mean()), float(sparse.mean())], [forward, forward], rtol=1e-5)


def test_renormalize_matches_the_truncation_definition():
  # The KD fork's own example: teacher [0.6, 0.3, 0.1], student [0.4, 0.4, 0.2], top-2.
  z = np.log(np.array([[[0.6, 0.3, 0.1]]], np.float32))
  s = jnp.asarray(np.log(np.array([[[0.4, 0.4, 0.2]]], np.float32)))
  targets = _targets(z, (1.0,), k=2, true_v=3)
  mask = jnp.ones((1, 1))
  loss, _ = jit_kd_sparse(s, targets, mask, mode="renormalize")
  pt, qt = np.array([2 / 3, 1 / 3]), np.array([0.5, 0.5])
  np.testing.assert_allclose(float(loss.mean()), np.sum(pt * np.log(pt / qt)), rtol=1e-6)
  # Truncated classes get no gradient at all (unlike a full-vocabulary student).
  grad = jax.jit(jax.grad(lambda x: losses.kd_sparse(x, targets, mask, mode="renormalize")[0].sum))(s)
  assert float(grad[0, 0, 2]) == 0.0 and abs(float(grad[0, 0, 0])) > 1e-3
  grad_topk = jax.jit(jax.grad(lambda x: losses.kd_sparse(x, targets, mask, mode="topk")[0].sum))(s)
  assert abs(float(grad_topk[0, 0, 2])) > 1e-3


def test_tail_is_exact_for_a_confident_student():
  # The student puts all but ~1e-10 of its mass on the teacher's top-k; the tail term dominates.
  s, z, mask = _inputs(seed=4)
  order = np.argsort(-z[..., :TRUE_V], axis=-1)[..., :K]
  np.put_along_axis(s, order, np.take_along_axis(s, order, -1) + 30.0, -1)
  targets = _targets(z, (1.0,))
  loss, _ = jit_kd_sparse(jnp.asarray(s), targets, jnp.asarray(mask), true_vocab_size=TRUE_V)
  want, _ = _ref_sparse(s, z, mask, K, 1.0, "tail", None, TRUE_V)
  np.testing.assert_allclose(float(loss.mean()), want, rtol=1e-5)
  # Gradient: q_v - p~_v, with p~ = teacher p on the top-k and r * q_v / q_tail outside.
  kd_sum = lambda x: losses.kd_sparse(x, targets, jnp.asarray(mask), true_vocab_size=TRUE_V)[0].sum
  grad = np.asarray(jax.jit(jax.grad(kd_sum))(jnp.asarray(s)))
  for b, t in zip(*np.nonzero(mask)):
    sr, zr = s[b, t, :TRUE_V].astype(np.float64), z[b, t, :TRUE_V].astype(np.float64)
    q, p = np.exp(_log_softmax(sr)), np.exp(_log_softmax(zr))
    outside = np.ones(TRUE_V, bool)
    outside[order[b, t]] = False
    p_tilde = np.where(outside, p[outside].sum() * q / q[outside].sum(), p)
    np.testing.assert_allclose(grad[b, t, :TRUE_V], q - p_tilde, atol=2e-6)
    assert np.all(grad[b, t, TRUE_V:] == 0.0)


def test_temperature_selects_the_matching_column():
  s, z, mask = _inputs(seed=5)
  targets = _targets(z, (1.0, 2.0, 4.0))
  want, _ = _ref_sparse(s, z, mask, K, 2.0, "tail", None, TRUE_V)
  loss, metrics = losses.kd_sparse(jnp.asarray(s), targets, jnp.asarray(mask), temperature=2.0,
                                   true_vocab_size=TRUE_V)  # eager: the concrete value is checked
  np.testing.assert_allclose(float(loss.mean()), want, rtol=2e-5)
  assert float(metrics["temperature_gap"].mean()) == 0.0
  jitted = jax.jit(lambda x, tt, temp: losses.kd_sparse(x, tt, jnp.asarray(mask), temperature=temp,
                                                         true_vocab_size=TRUE_V)[0].mean())
  np.testing.assert_allclose(float(jitted(jnp.asarray(s), targets, jnp.float32(2.0))), want, rtol=2e-5)
  with pytest.raises(ValueError, match="temperature 3.0"):
    losses.kd_sparse(jnp.asarray(s), targets, jnp.asarray(mask), temperature=3.0)


def test_f16_wire_values_meet_the_accuracy_budget():
  rng = np.random.default_rng(6)
  z = (rng.normal(size=(4, 16, 256)) * 2.5 + 25.0).astype(np.float32)  # raw logits ~20-30
  mask = jnp.ones((4, 16))
  near, far = z + rng.normal(size=z.shape), rng.normal(size=z.shape) * 2.5 + 22.0
  for s in (near.astype(np.float32), far.astype(np.float32)):
    for temp in (1.0, 2.0):
      ref = jit_kd_sparse(jnp.asarray(s), _targets(z, (temp,), k=32, true_v=256), mask)[0]
      f16 = jit_kd_sparse(jnp.asarray(s), _targets(z, (temp,), k=32, true_v=256, dtype="float16"), mask)[0]
      assert abs(float(f16.mean()) / float(ref.mean()) - 1.0) < 1e-3


# ---------------------------------------------------------------- CE, features


def test_ce_matches_reference_and_ignores_masked_labels():
  s, _, mask = _inputs(seed=7)
  labels = np.random.default_rng(7).integers(0, TRUE_V, size=(B, T)).astype(np.int32)
  labels[mask == 0] = -1  # garbage at masked positions must not matter
  loss, _ = jit_ce(jnp.asarray(s), jnp.asarray(labels), jnp.asarray(mask), true_vocab_size=TRUE_V)
  want = [-_log_softmax(s[b, t, :TRUE_V].astype(np.float64))[labels[b, t]] for b, t in zip(*np.nonzero(mask))]
  np.testing.assert_allclose(float(loss.mean()), np.mean(want), rtol=1e-6)
  as_bool, _ = jit_ce(jnp.asarray(s), jnp.asarray(labels), jnp.asarray(mask > 0), true_vocab_size=TRUE_V)
  np.testing.assert_allclose(float(as_bool.mean()), np.mean(want), rtol=1e-6)


@pytest.mark.parametrize("kind", ["cosine", "l2"])
def test_feature_loss_matches_reference(kind):
  rng = np.random.default_rng(8)
  st, tt = rng.normal(size=(2, 2, B, T, 16)).astype(np.float32)
  _, _, mask = _inputs(seed=8)
  st[:, mask == 0] = 0.0  # zero vectors at padding: cosine must stay finite
  tt[:, mask == 0] = np.nan  # and whatever the teacher sent there must not leak
  loss, _ = losses.feature_loss(jnp.asarray(st), jnp.asarray(tt), jnp.asarray(mask), kind=kind)
  rows = []
  for b, t in zip(*np.nonzero(mask)):
    a, c = st[:, b, t].astype(np.float64), tt[:, b, t].astype(np.float64)
    if kind == "cosine":
      d = 1 - np.sum(a * c, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(c, axis=-1))
    else:
      d = np.mean((a - c) ** 2, axis=-1)
    rows.append(d.mean())
  np.testing.assert_allclose(float(loss.mean()), np.mean(rows), rtol=1e-5)
  grad = jax.grad(lambda x: losses.feature_loss(x, jnp.asarray(tt), jnp.asarray(mask), kind=kind)[0].sum)(
      jnp.asarray(st))
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[:, mask == 0] == 0.0)


def test_select_teacher_states():
  states = jnp.arange(3 * B * T * 2, dtype=jnp.float32).reshape(3, B, T, 2)
  targets = TeacherTargets(topk_ids=jnp.zeros((B, T, 1), jnp.int32), topk_logits=jnp.zeros((B, T, 1)),
                           logsumexp=jnp.zeros((B, T, 1)), temperatures=(1.0,),
                           layer_states={"attn_out": states}, state_layers=(4, 0, 2))
  picked = losses.select_teacher_states(targets, (0, 0, 4))
  np.testing.assert_array_equal(np.asarray(picked), np.asarray(states)[[1, 1, 0]])
  with pytest.raises(ValueError, match=r"\[3\]"):
    losses.select_teacher_states(targets, (3,))
  with pytest.raises(ValueError, match="attn_in"):
    losses.select_teacher_states(targets, (0,), name="attn_in")


# ---------------------------------------------------------------- masking, accumulation


@pytest.mark.parametrize("mode", MODES)
def test_gradients_finite_with_masked_and_all_padding_rows(mode):
  s, z, mask = _inputs(seed=9, scale=20.0)
  mask[1] = 0.0  # an all-padding row
  targets = _targets(z, (1.0,), dtype="float16")
  # Garbage targets where nothing counts: NaN values, ids outside the vocabulary.
  garbage_ids = np.where(np.arange(K) % 2, V + 5, -3).astype(np.int32)
  targets = targets.replace(topk_logits=targets.topk_logits.at[1].set(np.nan),
                            logsumexp=targets.logsumexp.at[1].set(np.nan),
                            topk_ids=targets.topk_ids.at[1].set(garbage_ids))

  def total(x):
    kd, _ = losses.kd_sparse(x, targets, jnp.asarray(mask), mode=mode, top_p=0.9, true_vocab_size=TRUE_V)
    ce, _ = losses.ce(x, jnp.zeros((B, T), jnp.int32), jnp.asarray(mask), true_vocab_size=TRUE_V)
    return losses.combine(kd=kd, ce=ce, alpha=0.5)[0]

  value, grad = jax.jit(jax.value_and_grad(total))(jnp.asarray(s))
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
  assert np.all(np.asarray(grad)[1] == 0.0) and np.any(np.asarray(grad)[0] != 0.0)
  empty = jnp.zeros((B, T))
  kd, _ = jit_kd_sparse(jnp.asarray(s), targets, empty, mode=mode)
  assert float(kd.mean()) == 0.0 and float(kd.count) == 0.0
  g = jax.jit(jax.grad(lambda x: losses.kd_sparse(x, targets, empty, mode=mode)[0].mean()))(jnp.asarray(s))
  assert np.all(np.asarray(g) == 0.0)


def test_micro_batches_give_token_weighted_means():
  s, z, mask = _inputs(seed=10)
  mask[0] = 1.0
  mask[2] = 0.0
  mask[2, 0] = 1.0  # micro-batches with very different token counts
  labels = jnp.asarray(np.random.default_rng(10).integers(0, TRUE_V, size=(B, T)).astype(np.int32))
  targets = _targets(z, (2.0,))

  def parts(x, lo, hi):
    m = jnp.asarray(mask[lo:hi])
    kd, metrics = losses.kd_sparse(x[lo:hi], slice_batch(targets, lo, hi), m, true_vocab_size=TRUE_V)
    ce, _ = losses.ce(x[lo:hi], labels[lo:hi], m, true_vocab_size=TRUE_V)
    return kd, ce, metrics

  @functools.partial(jax.jit, static_argnums=(1, 2))
  def total(x, lo, hi, n=None):
    kd, ce, _ = parts(x, lo, hi)
    return losses.combine(kd=kd, ce=ce, alpha=0.3, num_tokens=n)[0]

  x, n = jnp.asarray(s), jnp.float32(mask.sum())
  full_value, full_grad = jax.value_and_grad(total)(x, 0, B)
  micro = [jax.value_and_grad(total)(x, lo, hi, n) for lo, hi in ((0, 2), (2, B))]
  np.testing.assert_allclose(sum(float(v) for v, _ in micro), float(full_value), rtol=1e-6)
  np.testing.assert_allclose(sum(np.asarray(g) for _, g in micro), np.asarray(full_grad), atol=1e-7)
  split = jax.jit(parts, static_argnums=(1, 2))
  (kd_a, _, met_a), (kd_b, _, met_b), (kd_full, _, met_full) = split(x, 0, 2), split(x, 2, B), split(x, 0, B)
  np.testing.assert_allclose(float((kd_a + kd_b).mean()), float(kd_full.mean()), rtol=1e-6)
  mean_of_means = (float(kd_a.mean()) + float(kd_b.mean())) / 2
  assert abs(mean_of_means - float(kd_full.mean())) > 1e-3  # the case tells the two apart
  summed = {key: met_a[key] + met_b[key] for key in met_a}
  np.testing.assert_allclose(float(losses.means(summed)["teacher_tail_mass"]),
                             float(met_full["teacher_tail_mass"].mean()), rtol=1e-6)


def test_combine_weights():
  kd, ce, feat = (losses.MaskedSum(jnp.float32(v * 4), jnp.float32(4)) for v in (2.0, 3.0, 5.0))
  total, metrics = losses.combine(kd=kd, ce=ce, feature=feat, alpha=0.25, beta=0.1)
  np.testing.assert_allclose(float(total), 0.25 * 2 + 0.75 * 3 + 0.1 * 5, rtol=1e-6)
  assert set(metrics) == {"kd_loss", "ce_loss", "feature_loss", "total_loss"}
  ce_only, _ = losses.combine(ce=ce, alpha=0.25)
  assert float(ce_only) == 3.0
  halved, _ = losses.combine(kd=kd, ce=ce, alpha=0.25, num_tokens=8)
  np.testing.assert_allclose(float(halved), (0.25 * 2 + 0.75 * 3) / 2, rtol=1e-6)


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize("name", ["ce", "tail", "renormalize", "topk", "ce+tail"])
def test_memory_holds_at_most_one_vocab_sized_buffer(name):
  b, t, v = 4, 32, 2048
  rng = np.random.default_rng(11)
  s = jnp.asarray(rng.normal(size=(b, t, v)).astype(np.float32))
  targets = compute_targets(s[::-1], k=16, temperatures=(1.0,), true_vocab_size=v - 8)
  mask, labels = jnp.ones((b, t)), jnp.zeros((b, t), jnp.int32)

  def loss(x):
    parts = {}
    if name.startswith("ce"):
      parts["ce"] = losses.ce(x, labels, mask, true_vocab_size=v - 8)[0]
    if name != "ce":
      parts["kd"] = losses.kd_sparse(x, targets, mask, mode=name.split("+")[-1], top_p=0.9,
                                     true_vocab_size=v - 8)[0]
    return losses.combine(alpha=0.5, **parts)[0]

  stats = jax.jit(jax.value_and_grad(loss)).lower(s).compile().memory_analysis()
  assert stats.temp_size_in_bytes <= 1.5 * b * t * v * 4 + 64 * 1024, stats


# ---------------------------------------------------------------- config, schedules


def test_loss_config_and_soft_loss_dispatch():
  cfg = build(losses.LossConfig, {"kd_mode": "topk", "top_k": 4, "temperature": 2.0,
                                  "alpha": {"kind": "linear", "start": 0.0, "end": 1.0, "steps": 10}})
  assert cfg.temperature.value(5) == 2.0 and cfg.alpha.value(5) == 0.5
  s, z, mask = _inputs(seed=12)
  targets = _targets(z, (2.0,)).replace(dense_logits=jnp.asarray(z))
  def soft(x, tt, m, c):
    return jax.jit(lambda *a: losses.soft_loss(*a, c, true_vocab_size=TRUE_V))(x, tt, m)

  loss, _ = soft(jnp.asarray(s), targets, jnp.asarray(mask), cfg)
  want, _ = _ref_sparse(s, z, mask, 4, 2.0, "topk", None, TRUE_V)  # first 4 of the 8 ids sent
  np.testing.assert_allclose(float(loss.mean()), want, rtol=2e-5)
  dense_cfg = cfg.model_copy(update={"use_dense": True})
  loss, _ = soft(jnp.asarray(s), targets, jnp.asarray(mask), dense_cfg)
  want, _ = _ref_sparse(s, z, mask, TRUE_V, 2.0, "topk", None, TRUE_V)
  np.testing.assert_allclose(float(loss.mean()), want, rtol=2e-5)
  with pytest.raises(ValueError, match="top_k"):
    losses.soft_loss(jnp.asarray(s), targets, jnp.asarray(mask), cfg.model_copy(update={"top_k": 16}))


@pytest.mark.parametrize("data, key", [
    ({"temperature": 0.0}, "temperature"),
    ({"alpha": {"kind": "linear", "start": 0.5, "end": 1.5, "steps": 3}}, "alpha"),
    ({"beta": -1.0}, "beta"),
    ({"kd_mode": "reverse"}, "kd_mode"),
    ({"top_p": 1.5}, "top_p"),
    ({"alpha": {"kind": "cosine", "start": 0.5}}, "steps"),
])
def test_loss_config_rejects(data, key):
  with pytest.raises(ConfigError, match=key):
    build(losses.LossConfig, data)


def test_layer_pairs():
  cfg = losses.LossConfig()
  assert cfg.layer_pairs(3, 3) == ((0, 1, 2), (0, 1, 2))
  with pytest.raises(ValueError, match="layer_map"):
    cfg.layer_pairs(2, 4)
  mapped = losses.LossConfig(layer_map=[1, 3], feature_layers=[1])
  assert mapped.layer_pairs(2, 4) == ((1,), (3,))
  with pytest.raises(ValueError, match="teacher depth"):
    mapped.layer_pairs(2, 3)


def test_schedules_host_and_traced():
  lin = ScheduleConfig(kind="linear", start=1.0, end=3.0, steps=10, delay=5)
  cos = ScheduleConfig(kind="cosine", start=4.0, end=2.0, steps=8)
  const = build(losses.LossConfig, {"beta": 0.25}).beta
  host = {step: (lin.value(step), cos.value(step), const.value(step)) for step in (0, 5, 10, 15, 40)}
  assert all(isinstance(v, float) for vals in host.values() for v in vals)
  assert [host[s][0] for s in (0, 5, 10, 15, 40)] == [1.0, 1.0, 2.0, 3.0, 3.0]
  np.testing.assert_allclose([cos.value(s) for s in (0, 2, 4, 8, 9)],
                             [4.0, 2 + 2 * (1 + np.cos(np.pi / 4)) / 2, 3.0, 2.0, 2.0], rtol=1e-12)
  assert host[15][2] == 0.25
  traced = jax.jit(lambda step: jnp.stack([lin.value(step), cos.value(step), const.value(step)]))
  for step, want in host.items():
    np.testing.assert_allclose(np.asarray(traced(jnp.int32(step))), want, rtol=1e-6)
  assert traced._cache_size() == 1
