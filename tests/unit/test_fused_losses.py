"""Chunked (fused) lm_head + losses: equal to the unchunked losses, values and gradients, in far less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_core import sampling
from distill_core.model.config import ModelConfig
from distill_core.model.transformer import create_model
from distill_core.targets import DenseHead, TeacherTargets, compute_targets
from student_trainer import losses

B, T, E, V, TRUE_V, K = 2, 7, 8, 48, 44, 6
TEMPS = (1.0, 2.0)
CHUNKS = (3, 4)  # neither divides T

# Every KD mode, as loss config fields; each runs with and without dense teacher logits where it applies.
CASES = {
    "ce_only": None,
    "tail": dict(kd_mode="tail", top_k=K),
    "tail_top_p": dict(kd_mode="tail", top_k=K, top_p=0.6),
    "renormalize": dict(kd_mode="renormalize", top_k=K),
    "renormalize_top_p": dict(kd_mode="renormalize", top_k=K, top_p=0.6),
    "topk": dict(kd_mode="topk", top_k=4),
    "sampled_tail": dict(kd_mode="sampled", top_k=K, num_samples=5, sample_tail=True),
    "sampled_whole": dict(kd_mode="sampled", top_k=3, num_samples=5, sample_tail=False),
    "sampled_only": dict(kd_mode="sampled", top_k=0, num_samples=5, sample_tail=False),
    "dense": dict(kd_mode="tail", top_k=K, use_dense=True),
    "dense_hidden": dict(kd_mode="tail", top_k=K, use_dense=True, teacher_hidden=True),
}
TEACHER_E = 5


def _problem(seed=0):
  """hidden (B, T, E), lm_head (E, V), labels, a loss mask with padding and a packed-segment gap, teacher z."""
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(B, T, E)).astype(np.float32)
  w = (rng.normal(size=(E, V)) * 1.2).astype(np.float32)
  w[:, TRUE_V:] = 3.0  # padded vocabulary columns: large logits that must be excluded
  labels = rng.integers(0, TRUE_V, size=(B, T)).astype(np.int32)
  mask = np.ones((B, T), np.float32)
  mask[0, 3] = 0.0  # end of a packed segment
  mask[1, 5:] = 0.0  # padding
  z = (rng.normal(size=(B, T, V)) * 3.0).astype(np.float32)
  return h, w, labels, mask, z


def _targets(z, fields):
  slots = fields.get("num_samples", 0) if fields else 0
  exclude = fields["top_k"] if slots and fields.get("sample_tail") else 0
  sample = {} if not slots else dict(num_samples=slots, sample_temperature=1.5, sample_seed=7,
                                     sample_exclude=exclude,
                                     example_ids=jnp.asarray(sampling.split_u64(np.arange(B) + 100)))
  targets = compute_targets(jnp.asarray(z), k=K, temperatures=TEMPS, true_vocab_size=TRUE_V,
                            value_dtype="float32", **sample)
  if fields and fields.get("teacher_hidden"):  # z = teacher hidden @ teacher lm_head, formed per chunk
    hidden, weight = _teacher_factors(z)
    targets = targets.replace(dense_hidden=hidden, dense_head=DenseHead(weight))
  elif fields and fields.get("use_dense"):
    targets = targets.replace(dense_logits=jnp.asarray(z))
  return targets


def _teacher_factors(z):
  """A teacher hidden state (B, T, E_t) and lm_head (E_t, V) whose product are the dense logits `_problem` uses."""
  rng = np.random.default_rng(9)
  hidden = jnp.asarray(rng.normal(size=(B, T, TEACHER_E)), jnp.float32)
  return hidden, jnp.asarray(rng.normal(size=(TEACHER_E, V)) * 2.0, jnp.float32)


def _loss_fn(fields, chunk_size, targets, labels, mask, temperature):
  fields = {key: value for key, value in (fields or {}).items() if key != "teacher_hidden"} if fields else None
  cfg = losses.LossConfig(**(fields or {}), chunk_size=chunk_size)

  def f(h, w):
    ce, kd, metrics = losses.fused_logit_losses(
        h, lambda x: jnp.einsum("bte,ev->btv", x, w), labels, None if fields is None else targets, mask, cfg,
        temperature=temperature, true_vocab_size=TRUE_V)
    total = ce.sum + (0.0 if kd is None else 0.7 * kd.sum)
    sums = {"ce": ce, **({} if kd is None else {"kd": kd}), **metrics}
    return total, sums

  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))


def _close(got, want, rtol=1e-6):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * max(np.abs(want).max(), 1e-30))


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_unchunked_values_metrics_and_gradients(case):
  h, w, labels, mask, z = _problem()
  fields = CASES[case]
  targets = _targets(z, fields)
  args = (jnp.asarray(h), jnp.asarray(w))
  (want_total, want_sums), (want_gh, want_gw) = _loss_fn(fields, 0, targets, labels, mask, 2.0)(*args)
  assert np.all(np.isfinite(want_gh)) and np.abs(want_gw).max() > 0
  for chunk in CHUNKS:
    (total, sums), (gh, gw) = _loss_fn(fields, chunk, targets, labels, mask, 2.0)(*args)
    _close(total, want_total)
    assert sorted(sums) == sorted(want_sums)
    for name in sums:
      _close(sums[name].sum, want_sums[name].sum)
      assert float(sums[name].count) == float(want_sums[name].count) == mask.sum()
    _close(gh, want_gh)
    _close(gw, want_gw)
    # Padded positions of the last chunk and masked positions get no gradient.
    assert np.all(np.asarray(gh)[1, 5:] == 0.0)


def test_dense_kd_from_teacher_hidden_states_equals_whole_teacher_logits():
  """kd_dense with the teacher's hidden states and lm_head, per chunk, equals kd_dense on its whole logits."""
  h, w, labels, mask, z = _problem()
  hidden, weight = _teacher_factors(z)
  chunked_targets = _targets(z, CASES["dense_hidden"])
  whole_targets = chunked_targets.replace(dense_hidden=None, dense_head=None,
                                          dense_logits=jnp.einsum("bte,ev->btv", hidden, weight))
  args = (jnp.asarray(h), jnp.asarray(w))
  (want, want_sums), (want_gh, want_gw) = _loss_fn(CASES["dense"], 0, whole_targets, labels, mask, 2.0)(*args)
  (got, sums), (gh, gw) = _loss_fn(CASES["dense"], 3, chunked_targets, labels, mask, 2.0)(*args)
  _close(got, want)
  _close(sums["kd"].sum, want_sums["kd"].sum)
  _close(gh, want_gh)
  _close(gw, want_gw)


def test_local_teacher_gives_dense_kd_its_hidden_states_and_lm_head():
  from distill_core.data import Batch
  from distill_core.sharding import MeshConfig, make_mesh, rules_table
  from student_trainer.sources.local import LocalTeacher
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
  model = create_model(cfg, seed=1)
  mesh_cfg = MeshConfig(data=1)
  source = LocalTeacher(model, k=4, value_dtype="float32", mesh=make_mesh(mesh_cfg), rules=rules_table(mesh_cfg),
                        dense_logits=True, student_vocab_size=64, chunk_size=3)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, 64, size=(2, 8)).astype(np.int32)
  seg = np.ones_like(tokens)
  batch = Batch(example_ids=np.arange(2), tokens=tokens, segment_ids=seg, positions=np.tile(np.arange(8), (2, 1)),
                targets=tokens, loss_mask=seg.astype(np.float32))
  targets = source.compute(batch, 1.0)
  assert targets.dense_logits is None and targets.dense_hidden.shape == (2, 8, 32)
  ref = np.asarray(model(jnp.asarray(tokens)).logits)
  np.testing.assert_allclose(np.asarray(targets.dense()), ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(targets.topk_ids), np.argsort(-ref, axis=-1, kind="stable")[..., :4])


def _ref_ce_tail(logits, labels, mask, z, temp):
  """float64 NumPy: (mean CE, mean tail-mode KD) over the masked positions, from whole logits."""
  s = logits[..., :TRUE_V].astype(np.float64)
  zz = z[..., :TRUE_V].astype(np.float64)

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))

  ce = -np.take_along_axis(log_softmax(s), labels[..., None], -1)[..., 0]
  log_p, log_q = log_softmax(zz / temp), log_softmax(s / temp)
  kl = np.zeros(mask.shape)
  for b, t in zip(*np.nonzero(mask)):
    top = np.argsort(-zz[b, t], kind="stable")[:K]
    rest = np.setdiff1d(np.arange(TRUE_V), top)
    p, r, q_r = np.exp(log_p[b, t, top]), np.exp(log_p[b, t, rest]).sum(), np.exp(log_q[b, t, rest]).sum()
    kl[b, t] = temp * temp * (np.sum(p * (log_p[b, t, top] - log_q[b, t, top])) + r * np.log(r / q_r))
  return (ce * mask).sum() / mask.sum(), (kl * mask).sum() / mask.sum()


def test_fused_matches_the_numpy_reference():
  h, w, labels, mask, z = _problem(seed=1)
  fields = CASES["tail"]
  (_, sums), _ = _loss_fn(fields, 3, _targets(z, fields), labels, mask, 2.0)(jnp.asarray(h), jnp.asarray(w))
  want_ce, want_kd = _ref_ce_tail(np.einsum("bte,ev->btv", h.astype(np.float64), w), labels, mask, z, 2.0)
  np.testing.assert_allclose(float(sums["ce"].mean()), want_ce, rtol=2e-5)
  np.testing.assert_allclose(float(sums["kd"].mean()), want_kd, rtol=2e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_model_hidden_states_and_head_give_the_call_logits(tied):
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                    tie_word_embeddings=tied)
  model = create_model(cfg, seed=0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 9)), jnp.int32)
  out = jax.jit(lambda m, x: m(x, state_layers=(1,)))(model, tokens)
  hidden, states = jax.jit(lambda m, x: m.hidden_states(x, state_layers=(1,)))(model, tokens)
  assert hidden.shape == (2, 9, 32)
  logits = jax.jit(lambda m, x: m.logits_from_hidden(x))(model, hidden)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(out.logits))
  np.testing.assert_array_equal(np.asarray(states["attn_out"]), np.asarray(out.states["attn_out"]))
  weight, is_tied = model.lm_head_weights()
  assert is_tied == tied
  head = jax.jit(lambda x: DenseHead(weight, tied=is_tied, dtype=cfg.dtype)(x))(hidden)
  np.testing.assert_array_equal(np.asarray(head), np.asarray(out.logits))  # the same arithmetic as the model


def test_fused_loss_and_gradient_memory_stays_far_below_whole_logits():
  """Compiled temporaries of loss + gradient at V=32768, T=1024 are a fraction of one (B, T, V) f32 buffer."""
  b, t, e, v, k, chunk = 1, 1024, 16, 32768, 8, 32
  f32, i32 = jnp.float32, jnp.int32
  sds = jax.ShapeDtypeStruct
  targets = TeacherTargets(topk_ids=sds((b, t, k), i32), topk_logits=sds((b, t, k), f32),
                           logsumexp=sds((b, t, 1), f32), temperatures=sds((1,), f32))
  whole = b * t * v * 4

  def temp_bytes(chunk_size):
    cfg = losses.LossConfig(kd_mode="tail", top_k=k, chunk_size=chunk_size)

    def f(h, w, labels, targets, mask):
      ce, kd, _ = losses.fused_logit_losses(h, lambda x: jnp.einsum("bte,ev->btv", x, w), labels, targets,
                                            mask, cfg, temperature=1.0, true_vocab_size=v - 100)
      return ce.sum + kd.sum

    lowered = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(
        sds((b, t, e), f32), sds((e, v), f32), sds((b, t), i32), targets, sds((b, t), f32))
    return lowered.compile().memory_analysis().temp_size_in_bytes

  fused, unchunked = temp_bytes(chunk), temp_bytes(0)
  assert unchunked >= whole  # the reference path does hold whole logits (the check can fail)
  print(f"temporaries: fused {fused} bytes, unchunked {unchunked} bytes, whole logits {whole} bytes")
  # O(chunk x V): a few (B, chunk, V) buffers (logits, their gradient, exponentials), not O(T x V).
  assert fused < 6 * b * chunk * v * 4, f"fused loss temporaries {fused} bytes for chunks of {chunk} positions"
  assert fused < whole / 4, f"fused loss temporaries {fused} bytes vs whole logits {whole} bytes"


@pytest.mark.parametrize("mode", ["tail", "sampled"])
def test_train_step_objective_is_unchanged_by_chunking(mode):
  """The kd objective (student hidden states + its own lm_head per chunk, feature loss, grad accumulation)
  gives the unchunked loss, metrics and gradients with loss.chunk_size=5 on T=12."""
  from flax import nnx

  from distill_core.config import load_config
  from distill_core.data import Batch
  from student_trainer import step as step_lib
  from student_trainer.config import TrainConfig

  b, t = 2, 12
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 384, (b, t), dtype=np.int32)
  seg = np.ones((b, t), np.int32)
  seg[1, t - 3:] = 0
  batch = Batch.from_examples({"example_ids": np.arange(b), "tokens": tokens, "segment_ids": seg,
                               "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))})
  sampled = ["loss.kd_mode=sampled", "loss.num_samples=4", "loss.top_k=2"] if mode == "sampled" else []
  base = ["data.path=unused", "teacher.source=local", "teacher.local.model={preset: tiny, num_hidden_layers: 2}",
          "model={preset: tiny, num_hidden_layers: 2}",
          "loss.top_k=8", "loss.beta=0.5", "loss.temperature=2.0", *sampled]
  teacher = create_model(load_config(TrainConfig, None, base).model, seed=3)
  hidden = teacher.hidden_states(batch.tokens, batch.positions, batch.segment_ids, state_layers=(0, 1),
                                 state_names=("attn_out",))
  sample = {} if mode == "tail" else dict(num_samples=4, sample_temperature=1.0, sample_seed=5, sample_exclude=2,
                                          example_ids=jnp.asarray(sampling.split_u64(np.arange(b))))
  # A confident teacher (logits x 40): the KL is O(1) per token, so float32 reassociation stays ~1e-7 of it.
  targets = compute_targets(40.0 * teacher.logits_from_hidden(hidden.hidden), k=8, temperatures=[2.0],
                            true_vocab_size=384, states=hidden.states, state_layers=(0, 1), value_dtype="float32",
                            **sample)
  student = create_model(load_config(TrainConfig, None, base).model, seed=4)
  results = []
  for chunk in (0, 5):
    cfg = load_config(TrainConfig, None, base + [f"loss.chunk_size={chunk}"])
    loss = step_lib.objective(cfg, "kd")
    hyper = step_lib.hyperparameters(cfg, 0)
    graphdef, params = nnx.split(student)

    def f(params, loss=loss, hyper=hyper, graphdef=graphdef):
      return loss(nnx.merge(graphdef, params), batch, targets, hyper, jnp.sum(jnp.asarray(batch.loss_mask)))

    results.append(jax.jit(jax.value_and_grad(f, has_aux=True))(params))
  ((want, want_sums), want_grads), ((got, sums), grads) = results
  _close(got, want)
  assert sorted(sums) == sorted(want_sums) and "feature_loss_sum" in sums and "teacher_tail_mass_sum" in sums
  for name in sums:
    _close(sums[name], want_sums[name])
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    _close(g, dict(jax.tree_util.tree_leaves_with_path(want_grads))[path], rtol=1e-5)
