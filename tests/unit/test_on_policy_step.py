"""The train step's objective on on-policy batches (loss.kd_mode reverse_kl / gkd): the student's own logits and
the teacher's answer at the scored ids, against float64 NumPy references over the whole real vocabulary (the
union, divergences and REINFORCE formula of test_losses_on_policy); off-policy batches of the same run use
loss.off_policy_kd_mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill_core.config import load_config
from distill_core.data import Batch
from distill_core.model.transformer import create_model
from distill_core.targets import compute_targets
from student_trainer import step as step_lib
from student_trainer.config import TrainConfig
from unit.test_losses_on_policy import _divergence, _log_softmax

B, T, V, K = 2, 10, 384, 4
TAU = 2.0
BASE = ["data.path=unused", "teacher.source=local", "teacher.local.model={preset: tiny, num_hidden_layers: 2}",
        "model={preset: tiny, num_hidden_layers: 2}", f"loss.top_k={K}", f"loss.temperature={TAU}",
        "loss.on_policy_fraction=0.5", "loss.alpha=0.3"]


def _problem():
  """A generated-looking batch (loss mask on a suffix), the sampler's log mu, the teacher's answer at the batch's
  next token and two more ids per position, and the student's logits (float64)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, V, (B, T), dtype=np.int32)
  batch = Batch.from_examples({"example_ids": np.arange(B), "tokens": tokens, "segment_ids": np.ones((B, T), np.int32),
                               "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))})
  mask = batch.loss_mask * (np.arange(T)[None] >= np.array([[3], [5]])).astype(np.float32)
  log_mu = (-rng.random((B, T)) * 4).astype(np.float32) * mask
  batch = Batch(**{**batch.__dict__, "loss_mask": mask, "sampler_logprobs": log_mu})
  ids = np.concatenate([batch.targets[..., None], rng.integers(0, V, (B, T, 2))], axis=-1).astype(np.int32)
  cfg = load_config(TrainConfig, None, BASE + ["loss.kd_mode=reverse_kl"])
  teacher = create_model(cfg.model, seed=3)
  z = np.asarray(teacher(jnp.asarray(tokens), None, jnp.ones((B, T), jnp.int32)).logits, np.float32) * 8
  targets = compute_targets(jnp.asarray(z), k=K, temperatures=[1.0, TAU], true_vocab_size=V, value_dtype="float32",
                            scored_ids=ids)
  return batch, targets, jax.tree.map(np.asarray, targets), z.astype(np.float64)


def _reference(kind, s, z, batch, host, beta=0.5):
  """Per-position loss (tau^2 scaled) and the reverse KL metric of `kind`, from NumPy over the real vocabulary:
  the student's logits `s` and the teacher's `z`; the answer `host` only says which ids were scored and the
  teacher's top-k."""
  loss, rkl = np.zeros((B, T)), np.zeros((B, T))
  for b in range(B):
    for t in range(T):
      if not batch.loss_mask[b, t]:
        continue
      log_q = _log_softmax(s[b, t] / TAU)
      log_p = _log_softmax(z[b, t] / TAU)
      if kind == "sampled":
        x = int(host.scored_ids[b, t, 0])
        weight = np.exp(log_q[x] - batch.sampler_logprobs[b, t])
        ratio = weight * (log_q[x] - log_p[x])
        loss[b, t], rkl[b, t] = ratio * log_q[x] * TAU * TAU, ratio
        continue
      slots = list(zip(host.topk_ids[b, t], host.topk_logits[b, t])) + list(zip(host.scored_ids[b, t],
                                                                                host.scored_logits[b, t]))
      union = list(dict.fromkeys(int(i) for i, value in slots if np.isfinite(value)))  # first occurrences
      q, p = np.exp(log_q), np.exp(log_p)
      outside = np.ones(V, bool)
      outside[union] = False
      qc, pc = np.append(q[union], q[outside].sum()), np.append(p[union], p[outside].sum())
      div = _divergence("reverse") if kind == "union" else _divergence("gkd", beta)
      loss[b, t], rkl[b, t] = div(qc, pc) * TAU * TAU, _divergence("reverse")(qc, pc)
  return loss, rkl


@pytest.mark.parametrize("kind", ["sampled", "union", "gkd"])
def test_on_policy_batches_train_on_the_on_policy_loss_alone(kind):
  batch, targets, host, z = _problem()
  mode = {"sampled": ["loss.kd_mode=reverse_kl"], "union": ["loss.kd_mode=reverse_kl",
          "loss.reverse_kl_estimator=union"], "gkd": ["loss.kd_mode=gkd", "loss.gkd_beta=0.3"]}[kind]
  student = create_model(load_config(TrainConfig, None, BASE + mode).model, seed=4)
  graphdef, params = nnx.split(student)
  s = np.asarray(student(jnp.asarray(batch.tokens), None, jnp.asarray(batch.segment_ids)).logits, np.float64)
  want, want_rkl = _reference(kind, s, z, batch, host, beta=0.3)
  mask = batch.loss_mask
  results = []
  for chunk in (0, 4):
    cfg = load_config(TrainConfig, None, BASE + mode + [f"loss.chunk_size={chunk}"])
    loss = step_lib.objective(cfg, "kd")
    hyper = step_lib.hyperparameters(cfg, 0)

    def f(params, loss=loss, hyper=hyper):
      return loss(nnx.merge(graphdef, params), batch, targets, hyper, jnp.sum(jnp.asarray(mask)))

    results.append(jax.jit(jax.value_and_grad(f, has_aux=True))(params))
  ((total, sums), grads), ((total_c, sums_c), grads_c) = results
  # KD alone, weight 1 (alpha is 0.3): no CE on the student's own samples
  assert "ce_loss_sum" not in sums and float(sums["tokens"]) == mask.sum()
  np.testing.assert_allclose(float(total), (want * mask).sum() / mask.sum(), rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(float(sums["kd_loss_sum"]), (want * mask).sum(), rtol=2e-4, atol=1e-5)
  np.testing.assert_allclose(float(sums["reverse_kl_sum"]), (want_rkl * mask).sum(), rtol=2e-4, atol=1e-5)
  assert ("importance_weight_sum" in sums) == (kind == "sampled")
  np.testing.assert_allclose(float(total_c), float(total), rtol=1e-5)
  for (path, g), (_, g_c) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                 jax.tree_util.tree_leaves_with_path(grads_c)):
    np.testing.assert_allclose(np.asarray(g_c), np.asarray(g), rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_corpus_batches_of_an_on_policy_run_use_the_off_policy_mode():
  batch, targets, _, _ = _problem()
  corpus = targets.replace(scored_ids=None, scored_logits=None)
  assert not corpus.has_scored
  got = {}
  for mode in (["loss.kd_mode=reverse_kl", "loss.off_policy_kd_mode=renormalize"], ["loss.kd_mode=renormalize"]):
    cfg = load_config(TrainConfig, None, BASE + mode)
    student = create_model(cfg.model, seed=4)
    out = step_lib.objective(cfg, "kd")(student, batch, corpus, step_lib.hyperparameters(cfg, 0),
                                        jnp.sum(jnp.asarray(batch.loss_mask)))
    got[mode[0]] = out
  (total, sums), (want_total, want_sums) = got.values()
  assert "ce_loss_sum" in sums and float(total) == float(want_total)
  assert sorted(sums) == sorted(want_sums)


def test_on_policy_modes_need_on_policy_steps_and_name_the_option():
  with pytest.raises(Exception, match="kd_mode reverse_kl trains on the student's own samples"):
    load_config(TrainConfig, None, BASE[:-2] + ["loss.kd_mode=reverse_kl"])
  with pytest.raises(Exception, match="reverse_kl_estimator"):
    load_config(TrainConfig, None, BASE + ["loss.kd_mode=reverse_kl", "loss.reverse_kl_estimator=exact"])
  with pytest.raises(Exception, match="off_policy_kd_mode"):
    load_config(TrainConfig, None, BASE + ["loss.kd_mode=reverse_kl", "loss.off_policy_kd_mode=gkd"])
