"""Blockwise parallel distillation: injection semantics, block independence, NumPy reference, layouts, configs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill_core.config import ConfigError, build, load_config, resolve_preset
from distill_core.data import Batch
from distill_core.model.config import ModelConfig
from distill_core.model.layout import convert_layout
from distill_core.model.transformer import create_model
from distill_core.targets import compute_targets
from student_trainer import step as step_lib
from student_trainer.blockwise import FROZEN_IN_BLOCKWISE
from student_trainer.config import TrainConfig

B, T, LAYERS = 2, 12, 3
# Scanned vs unrolled: the same float32 arithmetic in another loop structure; differences are reassociation only.
LAYOUT_RTOL, LAYOUT_ATOL = 1e-5, 1e-6


def model_cfg(**changes) -> ModelConfig:
  return build(ModelConfig, {**resolve_preset("tiny"), "num_hidden_layers": LAYERS, **changes})


def train_cfg(*overrides: str, layers: int = LAYERS) -> TrainConfig:
  base = ["data.path=unused", "teacher.source=local", f"teacher.local.model={{preset: tiny, num_hidden_layers: {LAYERS}}}",
          f"model={{preset: tiny, num_hidden_layers: {layers}}}", "loss.blockwise=true", "loss.top_k=8"]
  return load_config(TrainConfig, None, base + list(overrides))


def make_batch(seed: int = 0) -> Batch:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 384, (B, T), dtype=np.int32)
  seg = np.ones((B, T), np.int32)
  seg[1, T - 3:] = 0  # padding at the end of row 1
  pos = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  return Batch.from_examples({"example_ids": np.arange(B), "tokens": tokens, "segment_ids": seg, "positions": pos})


def teacher_targets(teacher, batch: Batch, layers=tuple(range(LAYERS))):
  out = teacher(batch.tokens, batch.positions, batch.segment_ids, state_layers=layers,
                state_names=("attn_in", "attn_out"))
  return compute_targets(out.logits, k=8, temperatures=[1.0], true_vocab_size=384, states=out.states,
                         state_layers=layers, value_dtype="float32")


def blockwise_loss(model, batch, targets, cfg):
  loss = step_lib.objective(cfg, "blockwise")
  hyper = step_lib.hyperparameters(cfg, 0)
  return loss(model, batch, targets, hyper, jnp.sum(jnp.asarray(batch.loss_mask)))


def attn_out_of(model, batch, inject):
  return np.asarray(model(batch.tokens, batch.positions, batch.segment_ids, state_layers=tuple(range(LAYERS)),
                          state_names=("attn_out",), inject_attn_in=inject).states["attn_out"])


@pytest.mark.parametrize("scan", [False, True])
def test_own_attn_in_injected_leaves_the_forward_unchanged(scan):
  model = create_model(model_cfg(scan_layers=scan), seed=1)
  batch = make_batch()
  plain = model(batch.tokens, batch.positions, batch.segment_ids, state_layers=tuple(range(LAYERS)))
  own = {j: plain.states["attn_in"][j] for j in range(LAYERS)}
  injected = model(batch.tokens, batch.positions, batch.segment_ids, state_layers=tuple(range(LAYERS)),
                   inject_attn_in=own)
  np.testing.assert_allclose(injected.logits, plain.logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(injected.states["attn_out"], plain.states["attn_out"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scan", [False, True])
def test_changing_one_injection_changes_only_that_layers_attn_out(scan):
  student = create_model(model_cfg(scan_layers=scan), seed=1)
  teacher = create_model(model_cfg(), seed=2)
  batch = make_batch()
  states = teacher_targets(teacher, batch).layer_states["attn_in"]
  inject = {j: states[j] for j in range(LAYERS)}
  base = attn_out_of(student, batch, inject)
  for i in range(LAYERS):
    changed = {**inject, i: inject[i] * 1.5 + 0.1}
    other = attn_out_of(student, batch, changed)
    for j in range(LAYERS):
      if j == i:
        assert np.abs(other[j] - base[j]).max() > 1e-3
      else:
        np.testing.assert_array_equal(other[j], base[j])


def layer_grads(grads, layer: int, scan: bool) -> list[np.ndarray]:
  """Block `layer`'s parameter gradients (its slice of the stacked ones when scanned)."""
  layers = grads["layers"]
  tree = jax.tree.map(lambda g: g[layer], layers) if scan else layers[layer]
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("scan", [False, True])
def test_block_gradient_depends_only_on_its_own_input_and_target(scan):
  cfg = train_cfg(f"model.scan_layers={str(scan).lower()}")
  student = create_model(cfg.model, seed=1)
  teacher = create_model(model_cfg(), seed=2)
  batch = make_batch()
  targets = teacher_targets(teacher, batch)
  graphdef, params, rest = nnx.split(student, nnx.Param, ...)

  grad = jax.jit(jax.grad(lambda p, t: blockwise_loss(nnx.merge(graphdef, p, rest), batch, t, cfg)[0]))
  grads_for = lambda t: grad(params, t)  # noqa: E731 - one compilation for every perturbed target

  base = grads_for(targets)
  frozen = nnx.state(nnx.merge(graphdef, base, rest), FROZEN_IN_BLOCKWISE)
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(frozen))  # only attention is on the path
  for i in range(LAYERS):
    for name in ("attn_in", "attn_out"):
      states = dict(targets.layer_states)
      states[name] = states[name].at[i].multiply(1.7)
      moved = grads_for(targets.replace(layer_states=states))
      for j in range(LAYERS):
        same = all(np.array_equal(a, b) for a, b in zip(layer_grads(base, j, scan), layer_grads(moved, j, scan)))
        assert same == (j != i), (name, i, j)


# ---------------------------------------------------------------- NumPy reference


def np_rms(x, scale, eps):
  return scale * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def np_rope(x, pos, theta):
  d = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  ang = pos[:, :, None] * inv  # (B, T, D/2)
  cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, :, None], np.sin(np.concatenate([ang, ang], -1))[:, :, None]
  rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  return x * cos + rot * sin


def np_attention(x, layer, seg, pos, cfg):
  """Hugging Face Llama attention in float64 loops over heads: x (B, T, E) -> (B, T, E)."""
  get = lambda m: np.asarray(m.kernel[...], np.float64)
  q = np_rope(np.einsum("bte,ehd->bthd", x, get(layer.self_attn.q_proj)), pos, cfg.rope_theta)
  k = np_rope(np.einsum("bte,ehd->bthd", x, get(layer.self_attn.k_proj)), pos, cfg.rope_theta)
  v = np.einsum("bte,ehd->bthd", x, get(layer.self_attn.v_proj))
  h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
  out = np.zeros(q.shape)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      if seg[b, t] == 0:
        continue
      visible = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
      for head in range(h):
        g = head // (h // kv)
        scores = np.array([q[b, t, head] @ k[b, s, g] for s in visible]) / np.sqrt(d)
        p = np.exp(scores - scores.max())
        out[b, t, head] = (p / p.sum()) @ v[b, visible, g]
  return np.einsum("bthd,hde->bte", out, get(layer.self_attn.o_proj))


@pytest.mark.parametrize("kind", ["cosine", "l2"])
def test_blockwise_loss_matches_numpy(kind):
  cfg = train_cfg(f"loss.feature_kind={kind}", "loss.layer_map=[2, 0]", layers=2)
  student = create_model(cfg.model, seed=1)
  teacher = create_model(model_cfg(), seed=2)
  batch = make_batch()
  targets = teacher_targets(teacher, batch, layers=(2, 0))
  total, sums = blockwise_loss(student, batch, targets, cfg)
  mask = np.asarray(batch.loss_mask)
  per_layer = []
  for j, m in enumerate((2, 0)):
    row = targets.state_layers.index(m)
    x = np.asarray(targets.layer_states["attn_in"][row], np.float64)
    want = np.asarray(targets.layer_states["attn_out"][row], np.float64)
    got = np_attention(x, student.layers[j], np.asarray(batch.segment_ids), np.asarray(batch.positions), cfg.model)
    with np.errstate(invalid="ignore"):
      if kind == "cosine":
        d = 1 - np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
      else:
        d = np.mean((got - want) ** 2, -1)
    per_layer.append(d)
  ref = np.sum(np.where(mask > 0, np.mean(per_layer, 0), 0.0)) / mask.sum()  # padding rows: zero vectors
  np.testing.assert_allclose(float(total), ref, rtol=2e-5)
  np.testing.assert_allclose(float(sums["feature_loss_sum"]) / mask.sum(), ref, rtol=2e-5)
  assert {"ce_loss_sum", "kd_loss_sum", "total_loss_sum", "tokens"} <= set(sums)


@pytest.mark.parametrize("kind", ["cosine", "l2"])
def test_identical_student_and_teacher_give_zero_loss(kind):
  cfg = train_cfg(f"loss.feature_kind={kind}")
  model = create_model(cfg.model, seed=4)
  batch = make_batch()
  total, _ = blockwise_loss(model, batch, teacher_targets(model, batch), cfg)
  different = float(blockwise_loss(create_model(cfg.model, seed=5), batch, teacher_targets(model, batch), cfg)[0])
  assert different > 0 and abs(float(total)) < 1e-4 * different


def test_scanned_and_unrolled_give_the_same_loss_and_gradients():
  cfg = train_cfg()
  scan_cfg = train_cfg("model.scan_layers=true")
  unrolled = create_model(cfg.model, seed=1)
  scanned = convert_layout(unrolled, scan_layers=True)
  batch = make_batch()
  targets = teacher_targets(create_model(model_cfg(), seed=2), batch)

  def loss_and_grads(model, c):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = lambda p: blockwise_loss(nnx.merge(graphdef, p, rest), batch, targets, c)[0]
    loss, grads = jax.value_and_grad(fn)(params)
    return loss, nnx.merge(graphdef, grads, rest)  # the gradients as a model, so layouts convert

  (loss_u, grads_u), (loss_s, grads_s) = loss_and_grads(unrolled, cfg), loss_and_grads(scanned, scan_cfg)
  np.testing.assert_allclose(float(loss_s), float(loss_u), rtol=LAYOUT_RTOL)
  flat_u = dict(nnx.to_flat_state(nnx.state(convert_layout(grads_u, scan_layers=True), nnx.Param)))
  flat_s = dict(nnx.to_flat_state(nnx.state(grads_s, nnx.Param)))
  assert flat_u.keys() == flat_s.keys()
  for path in flat_s:
    np.testing.assert_allclose(np.asarray(flat_s[path][...]), np.asarray(flat_u[path][...]),
                               rtol=LAYOUT_RTOL, atol=LAYOUT_ATOL, err_msg=str(path))


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize(("overrides", "message"), [
    (["teacher.local.model={preset: tiny, hidden_size: 64, num_attention_heads: 4}"],
     "needs equal embedding widths, but model.hidden_size is 32 and teacher.local.model.hidden_size is 64"),
    (["loss.layer_map=[0, 5]"], r"loss.layer_map \[0, 5\] does not fit: .*teacher layer 5 >= teacher depth 3"),
    (["loss.layer_map=[0]"], r"loss.layer_map \[0\] does not fit: layer_map: 1 entries for 2 student layers"),
    (["model={preset: tiny, num_hidden_layers: 2}"],
     r"loss.layer_map None does not fit: layer_map: required when depths differ \(student 2, teacher 3"),
    (["teacher.source=none"], "loss.blockwise: needs a teacher's layer states, but teacher.source is 'none'"),
    (["loss.blockwise=false", "loss.blockwise_steps=3"], "loss.blockwise_steps is 3 but loss.blockwise is false"),
])
def test_bad_blockwise_configs_fail_with_named_fields(overrides, message):
  with pytest.raises(ConfigError, match=message):
    train_cfg(*overrides, layers=2)


def test_phase_schedule():
  assert [train_cfg("loss.blockwise_steps=2").loss.phase_at(s) for s in range(4)] == \
      ["blockwise", "blockwise", "kd", "kd"]
  assert train_cfg("loss.blockwise_steps=0").loss.phase_at(0) == "kd"
  assert not train_cfg("loss.blockwise_steps=0").loss.ever_blockwise
  assert train_cfg().loss.phase_at(10**9) == "blockwise"


def test_remote_plan_asks_for_both_states_and_narrows_per_batch():
  from remote_utils import fake_requirements
  from unit.test_remote_source import info_response, plan
  from distill_core.stream.checks import TeacherMismatch
  need = fake_requirements(feature_layers=lambda depth: (1,), state_names=("attn_in", "attn_out"),
                           tokenizer_fingerprint="tok")
  planned = plan(info_response(), need)
  assert (planned.layers, planned.states) == ((1,), ("attn_in", "attn_out"))
  kd_step = planned.spec(1.0, ("attn_out",))  # a KD step after the switch
  assert (kd_step.layers, kd_step.states) == ((1,), ("attn_out",))
  assert (planned.spec(1.0, ()).layers, planned.spec(1.0, ()).states) == ((), ())  # a KD step without beta
  with pytest.raises(TeacherMismatch, match="the teacher does not offer attn_in states"):
    plan(info_response(state_names=["attn_out"]), need)
  with pytest.raises(TeacherMismatch, match="teacher width 8 != student width 16 .*model.hidden_size"):
    plan(info_response(), dataclasses.replace(need, hidden_size=16))


# ---------------------------------------------------------------- phases


def test_phase_switch_is_announced_with_what_changes():
  from student_trainer.blockwise import phase_note
  loss = train_cfg("loss.blockwise_steps=3", "loss.beta=0.25").loss
  notes = {step: phase_note(loss, step, first=step == 0) for step in range(6)}
  assert [s for s, n in notes.items() if n] == [0, 3]
  assert notes[0].startswith("step 1: blockwise phase for steps 1-3: ")
  assert notes[3].startswith("step 4: blockwise phase over, ordinary KD from now on") and "beta 0.25" in notes[3]
  assert phase_note(loss, 2, first=True).startswith("step 3: blockwise phase for steps 3-3")  # a resumed run
  assert phase_note(train_cfg("loss.blockwise_steps=0").loss, 0, first=True) is None
