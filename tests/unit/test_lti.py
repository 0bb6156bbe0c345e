"""Learn-to-init: kernels vs NumPy einsum, initial slices, surgery rules and their errors, collapse."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from distill_core.config import build, resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.model.hf import save_hf_checkpoint
from distill_core.model.transformer import Transformer, create_model
from student_trainer.plain_model import collapse_model
from student_trainer.lti import kernels
from student_trainer.lti.config import LTIConfig, PathRule
from student_trainer.lti.modules import LTIProj, TeacherKernel
from student_trainer.lti.surgery import LTIPlanError, apply_plan, make_plan
from student_trainer.lti.teacher import HFTeacherParams

RNG = np.random.default_rng(0)
# Teacher: 4 query heads, 2 kv heads, head dim 8. Student: 2 query heads, 1 kv head, head dim 4 (E = 32 both).
E, HT, KT, DT, HS, KS, DS = 32, 4, 2, 8, 2, 1, 4


def teacher_cfg(**kw) -> ModelConfig:
  return build(ModelConfig, {**resolve_preset("tiny"), "num_hidden_layers": 3, "model_type": "qwen2",
                             "attention_bias": True, "intermediate_size": 96, **kw})


def student_cfg(**kw) -> ModelConfig:
  return build(ModelConfig, {**resolve_preset("tiny"), "num_hidden_layers": 2, "num_attention_heads": HS,
                             "num_key_value_heads": KS, "head_dim": DS, "model_type": "qwen2",
                             "attention_bias": True, **kw})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("lti_teacher")
  save_hf_checkpoint(create_model(teacher_cfg(), seed=1), path)
  return path


def lti_cfg(teacher_dir, **kw) -> LTIConfig:
  return LTIConfig(**{"enabled": True, "kernels_from": "hf", "kernels_path": str(teacher_dir), "layer_map": [0, 2],
                      **kw})


def surgered(teacher_dir, scan: bool = False, seed: int = 0, copy_from_teacher=(), **kw):
  teacher = HFTeacherParams(teacher_dir)
  plan = make_plan(student_cfg(scan_layers=scan), lti_cfg(teacher_dir, **kw), teacher,
                   [PathRule(**r) for r in copy_from_teacher])
  model = Transformer(student_cfg(scan_layers=scan), rngs=nnx.Rngs(seed))
  wrt = apply_plan(model, plan, teacher.fetch(plan.teacher_names()))
  return model, plan, wrt


# ----------------------------------------------------------------------------- kernels


def _ref_kernel(kind, c, a=None, b=None, w=None):
  """NumPy einsum reference, one layer at a time."""
  if w is not None:
    return np.einsum("xye,xyuv->uve", c, w) if kind == "o" else np.einsum("exy,xyuv->euv", c, w)
  return np.einsum("xye,xu,vy->uve", c, a, b) if kind == "o" else np.einsum("exy,xu,yv->euv", c, a, b)


@pytest.mark.parametrize("layered", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("general", [False, True], ids=["factorised", "general"])
@pytest.mark.parametrize("kind", kernels.PROJ_KINDS)
def test_lti_kernel_and_projection_match_numpy(kind, general, layered):
  heads_t, heads_s = (HT, HS) if kind in ("q", "o") else (KT, KS)
  lead = (3,) if layered else ()
  c = RNG.normal(size=lead + ((heads_t, DT, E) if kind == "o" else (E, heads_t, DT))).astype(np.float32)
  a = RNG.normal(size=lead + (heads_t, heads_s)).astype(np.float32)
  b = RNG.normal(size=lead + ((DS, DT) if kind == "o" else (DT, DS))).astype(np.float32)
  w = RNG.normal(size=lead + (heads_t, DT, heads_s, DS)).astype(np.float32)
  maps = {"w": w} if general else {"a": a, "b": b}
  got = np.asarray(kernels.effective_kernel(kind, c, **maps, layered=layered))
  layers = range(3) if layered else [None]
  want = np.stack([_ref_kernel(kind, c[i], **{k: v[i] for k, v in maps.items()}) for i in layers]) if layered \
      else _ref_kernel(kind, c, **maps)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  if layered:
    return
  proj = LTIProj(kind, c, **maps)
  x = RNG.normal(size=(2, 5, heads_s, DS) if kind == "o" else (2, 5, E)).astype(np.float32)
  y = np.einsum("bthd,hde->bte", x, want) if kind == "o" else np.einsum("bte,ehd->bthd", x, want)
  np.testing.assert_allclose(np.asarray(proj(x)), y, rtol=1e-4, atol=1e-5)
  assert not isinstance(proj.c, nnx.Param) and isinstance(proj.c, TeacherKernel)
  assert "c" not in dict(nnx.to_flat_state(nnx.state(proj, nnx.Param)))


# ----------------------------------------------------------------------------- initial slices


def _rotary_dims():
  return np.r_[0:DS // 2, DT // 2:DT // 2 + DS // 2]  # the kept dims of each rotary half


def test_select_init_is_exactly_a_head_and_dim_slice(teacher_dir):
  model, plan, _ = surgered(teacher_dir)
  t = {n: v for n, v in HFTeacherParams(teacher_dir).fetch(plan.teacher_names()).items()}
  dims = _rotary_dims()
  for j, tl in enumerate([0, 2]):
    attn = model.layers[j].self_attn
    q, k, v, o = (np.asarray(getattr(attn, f"{p}_proj").kernel()) for p in "qkvo")
    cq, ck = t[f"layers.{tl}.self_attn.q_proj.kernel"], t[f"layers.{tl}.self_attn.k_proj.kernel"]
    cv, co = t[f"layers.{tl}.self_attn.v_proj.kernel"], t[f"layers.{tl}.self_attn.o_proj.kernel"]
    # 1 student kv head = teacher kv head 0; its 2 query heads = teacher query heads 0 and 1 (both read kv 0).
    np.testing.assert_array_equal(k, ck[:, [0]][:, :, dims])
    np.testing.assert_array_equal(v, cv[:, [0]][:, :, dims])
    np.testing.assert_array_equal(q, cq[:, [0, 1]][:, :, dims])
    np.testing.assert_array_equal(o, co[[0, 1]][:, dims])
    tb = t[f"layers.{tl}.self_attn.q_proj.bias"]
    np.testing.assert_array_equal(np.asarray(attn.q_proj.bias[...]), tb[[0, 1]][:, dims])


def test_average_init_averages_head_buckets(teacher_dir):
  model, plan, _ = surgered(teacher_dir, a_init="average")
  t = HFTeacherParams(teacher_dir).fetch(plan.teacher_names())
  dims = _rotary_dims()
  attn = model.layers[1].self_attn
  ck, cq = t["layers.2.self_attn.k_proj.kernel"], t["layers.2.self_attn.q_proj.kernel"]
  co = t["layers.2.self_attn.o_proj.kernel"]
  np.testing.assert_allclose(np.asarray(attn.k_proj.kernel()), ck[:, :, dims].mean(1, keepdims=True), atol=1e-6)
  # Student query head g of the single group averages teacher query head g of both teacher groups.
  want_q = np.stack([(cq[:, 0] + cq[:, 2]) / 2, (cq[:, 1] + cq[:, 3]) / 2], axis=1)[:, :, dims]
  np.testing.assert_allclose(np.asarray(attn.q_proj.kernel()), want_q, atol=1e-6)
  want_o = np.stack([co[0] + co[2], co[1] + co[3]])[:, dims]  # the output sums what a head stands for
  np.testing.assert_allclose(np.asarray(attn.o_proj.kernel()), want_o, atol=1e-6)


def test_svd_init_projects_value_output_on_top_singular_directions(teacher_dir):
  model, plan, _ = surgered(teacher_dir, b_init="svd")
  t = HFTeacherParams(teacher_dir).fetch(plan.teacher_names())
  cv = t["layers.0.self_attn.v_proj.kernel"]
  b = np.asarray(model.layers[0].self_attn.v_proj.b[...])
  _, _, vt = np.linalg.svd(cv.reshape(-1, DT))
  np.testing.assert_allclose(np.abs(b), np.abs(vt[:DS].T), atol=1e-5)  # top-Ds right singular vectors
  np.testing.assert_allclose(b.T @ b, np.eye(DS), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(model.layers[0].self_attn.o_proj.b[...]), b.T)
  np.testing.assert_array_equal(np.asarray(model.layers[0].self_attn.q_proj.b[...]),
                                kernels.rotary_identity(DT, DS))  # q/k keep the rotary-pair identity


def test_general_map_starts_equal_to_factorised(teacher_dir):
  fact, _, _ = surgered(teacher_dir)
  gen, _, _ = surgered(teacher_dir, map="general")
  tokens = RNG.integers(0, 384, (2, 12))
  np.testing.assert_allclose(np.asarray(gen(tokens).logits), np.asarray(fact(tokens).logits), atol=1e-5)


# ----------------------------------------------------------------------------- layouts, collapse


@pytest.mark.parametrize("general", [False, True], ids=["factorised", "general"])
def test_scanned_equals_unrolled_and_collapse_keeps_logits(teacher_dir, general):
  kw = dict(map="general" if general else "factorised",
            copy_from_teacher=[{"student": r"embed_tokens|^norm|lm_head|layernorm"}])
  unrolled, _, _ = surgered(teacher_dir, scan=False, **kw)
  scanned, _, _ = surgered(teacher_dir, scan=True, **kw)
  # Same random MLPs in both layouts (a seed draws differently per layout).
  for name in ("gate_proj", "up_proj", "down_proj"):
    getattr(scanned.layers.mlp, name).kernel[...] = np.stack(
        [getattr(unrolled.layers[j].mlp, name).kernel[...] for j in range(2)])
  tokens = RNG.integers(0, 384, (2, 16))
  lti_logits = np.asarray(unrolled(tokens).logits)
  np.testing.assert_allclose(np.asarray(scanned(tokens).logits), lti_logits, atol=1e-5)
  for model in (unrolled, scanned):
    plain = collapse_model(model)
    assert not nnx.state(plain, TeacherKernel) and all(
        not isinstance(n, LTIProj) for _, n in nnx.iter_graph(plain))
    np.testing.assert_allclose(np.asarray(plain(tokens).logits), lti_logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- rules and their errors


def test_plan_share_copy_train(teacher_dir):
  model, plan, wrt = surgered(
      teacher_dir, share=[{"param": r"layers\.1\.self_attn\.(k|v)_proj\.a$", "to": r"layers.0.self_attn.\1_proj.a"}],
      copy_from_teacher=[{"student": r"^(embed_tokens\.embedding|norm\.scale)$"}], train=[r"\.a$", r"\.b$"])
  assert model.layers[1].self_attn.k_proj.a is model.layers[0].self_attn.k_proj.a
  text = plan.describe()
  assert "layers.1.self_attn.k_proj.a = layers.0.self_attn.k_proj.a" in text and "2 copied" in text
  t = HFTeacherParams(teacher_dir).fetch(["embed_tokens.embedding", "norm.scale"])
  np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]), t["embed_tokens.embedding"])
  # 8 projections x (a, b) minus the two tied a's.
  assert len(wrt.paths) == 14 and all(p.endswith((".a", ".b")) for p in wrt.paths)
  assert "layers.0.mlp.up_proj.kernel" in plan.frozen


@pytest.mark.parametrize("scan, kw, message", [
    (False, dict(projections=[{"student": r"q_proj\.kernl"}]), r"matches no student parameter"),
    (True, dict(projections=[{"student": r"layers\.1\.self_attn\.q_proj\.kernel"}]),
     r"names single layers, but the student's layers are scanned"),
    (True, dict(train=[r"layers\.0\."]), r"lti.train\[0\] .* names single layers"),
    (True, dict(share=[{"param": r"layers\.1\.self_attn\.k_proj\.a$", "to": "layers.self_attn.v_proj.a"}]),
     r"lti.share\[0\].param .* names single layers"),
    (False, dict(projections=[{"student": r"mlp\.up_proj\.kernel"}]), r"not an attention projection kernel"),
    (False, dict(projections=[{"student": r"q_proj\.kernel"}, {"student": r"layers\.0\.self_attn\.q_proj\.kernel"}]),
     r"matched by lti.projections\[0\] and \[1\]"),
    (False, dict(copy_from_teacher=[{"student": r"layers\.0\.mlp\.up_proj\.kernel"}]),
     r"cannot copy teacher layers.0.mlp.up_proj.kernel \(32, 96\) into student layers.0.mlp.up_proj.kernel"),
    (False, dict(copy_from_teacher=[{"student": r"^norm\.scale$", "teacher": "final_norm.scale"}]),
     r"the teacher has no parameter final_norm.scale \(for student norm.scale\)"),
    (False, dict(copy_from_teacher=[{"student": r"^nothing$"}]), r"copy_from_teacher\[0\].student '\^nothing\$' matches no"),
    (False, dict(share=[{"param": r"layers\.1\.self_attn\.q_proj\.a$", "to": "layers.0.self_attn.k_proj.a"}]),
     r"cannot tie layers.1.self_attn.q_proj.a \(4, 2\) to layers.0.self_attn.k_proj.a \(2, 1\)"),
    (False, dict(share=[{"param": r"layers\.1\.self_attn\.q_proj\.a$", "to": "layers.9.q.a"}]),
     r"target layers.9.q.a .* is not a student parameter"),
    (False, dict(train=[r"\.zzz$"]), r"lti.train\[0\] '\\\\.zzz\$' matches no student parameter"),
    (False, dict(layer_map=[0, 5]), r"layers \[5\] out of range for a 3-layer teacher"),
    (False, dict(layer_map=[0]), r"needs one teacher layer per student layer \(2\)"),
])
def test_rule_errors_name_the_rule_and_paths(teacher_dir, scan, kw, message):
  copy = [PathRule(**r) for r in kw.pop("copy_from_teacher", ())]
  cfg = lti_cfg(teacher_dir, **kw)
  with pytest.raises(LTIPlanError, match=message):
    make_plan(student_cfg(scan_layers=scan), cfg, HFTeacherParams(teacher_dir), copy)


def test_wider_student_heads_are_refused(teacher_dir):
  with pytest.raises(LTIPlanError, match="has head dim 10, its teacher kernel layers.0.self_attn.k_proj.kernel 8"):
    make_plan(student_cfg(head_dim=10), lti_cfg(teacher_dir), HFTeacherParams(teacher_dir))


def test_width_mismatch_is_refused(tmp_path):
  save_hf_checkpoint(create_model(teacher_cfg(hidden_size=64, intermediate_size=64), seed=1), tmp_path)
  with pytest.raises(LTIPlanError, match="needs equal embedding widths"):
    make_plan(student_cfg(), lti_cfg(tmp_path), HFTeacherParams(tmp_path))


def test_lti_plan_dry_run_prints_every_match(teacher_dir, capsys):
  from student_trainer.__main__ import main
  args = ["--config", "configs/tiny_ce.yaml", "--lti-plan", "lti.enabled=true", "lti.kernels_from=hf",
          f"lti.kernels_path={teacher_dir}", "lti.layer_map=[0,2]", "model.model_type=qwen2",
          "model.attention_bias=true", r"copy_from_teacher=[{student: '^norm\.scale$'}]"]
  assert main(args) == 0
  out = capsys.readouterr().out
  assert "layers.1.self_attn.o_proj.kernel <- C = teacher layers.2.self_attn.o_proj.kernel (4, 8, 32)" in out
  assert "copy_from_teacher[0] '^norm\\\\.scale$': 1 copied" in out and "train  layers.0.self_attn.q_proj.a" in out
  assert main(args + ["model.scan_layers=true", r"lti.train=['layers\.0\.']"]) == 2
  assert "names single layers, but the student's layers are scanned" in capsys.readouterr().err


def test_orbax_teacher_gives_the_same_kernels_as_hf(teacher_dir, tmp_path):
  from distill_core.checkpoints import load_model, save_model_orbax
  from student_trainer.lti.teacher import OrbaxTeacherParams
  save_model_orbax(load_model(hf_checkpoint=str(teacher_dir), scan_layers=True), tmp_path / "orbax")
  hf, orbax = HFTeacherParams(teacher_dir), OrbaxTeacherParams(tmp_path / "orbax")
  assert orbax.shapes == hf.shapes and orbax.num_layers == hf.num_layers == 3
  names = make_plan(student_cfg(), lti_cfg(teacher_dir), hf).teacher_names()
  for name, value in hf.fetch(names).items():
    np.testing.assert_array_equal(orbax.fetch([name])[name], value)
  assert orbax.record() == {"kernels_from": "orbax", "kernels_path": str((tmp_path / "orbax").resolve())}


# ----------------------------------------------------------------------------- copy_from_teacher alone


COPY_RULES = [{"student": r"^(embed_tokens\.embedding|norm\.scale|lm_head\.kernel)$"},
              {"student": r"layers\.(\d+\.)?(input|post_attention)_layernorm\.scale$"}]


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_copy_without_lti_copies_exactly_and_trains_everything(teacher_dir, scan):
  model, plan, wrt = surgered(teacher_dir, scan=scan, enabled=False, copy_from_teacher=COPY_RULES)
  fresh = Transformer(student_cfg(scan_layers=scan), rngs=nnx.Rngs(0))
  assert not plan.projections and not any(isinstance(n, LTIProj) for _, n in nnx.iter_graph(model))
  t = HFTeacherParams(teacher_dir).fetch(["embed_tokens.embedding", "norm.scale", "lm_head.kernel",
                                          "layers.0.input_layernorm.scale", "layers.2.post_attention_layernorm.scale"])
  np.testing.assert_array_equal(np.asarray(model.embed_tokens.embedding[...]), t["embed_tokens.embedding"])
  np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), t["lm_head.kernel"])
  # Student layer 1 reads teacher layer layer_map[1] = 2.
  post = model.layers.post_attention_layernorm.scale[...][1] if scan else \
      model.layers[1].post_attention_layernorm.scale[...]
  np.testing.assert_array_equal(np.asarray(post), t["layers.2.post_attention_layernorm.scale"])
  # Attention and MLP keep the seed's random initialisation.
  q = (lambda m: m.layers.self_attn.q_proj.kernel[...]) if scan else (lambda m: m.layers[0].self_attn.q_proj.kernel[...])
  np.testing.assert_array_equal(np.asarray(q(model)), np.asarray(q(fresh)))
  every = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert wrt.paths == every and not plan.frozen
  assert "without learn-to-init every parameter" in plan.describe()


def test_copy_from_teacher_moved_out_of_lti(teacher_dir):
  from student_trainer.config import TrainConfig
  lti = {"kernels_from": "hf", "kernels_path": str(teacher_dir)}
  old = TrainConfig(**{"lti": {**lti, "copy_from_teacher": COPY_RULES}})
  new = TrainConfig(**{"lti": lti, "copy_from_teacher": COPY_RULES})
  assert old == new and [r.student for r in new.copy_from_teacher] == [r["student"] for r in COPY_RULES]
  assert new.from_teacher and not new.lti.enabled
  with pytest.raises(ValueError, match="moved to the top-level key copy_from_teacher; give only that one"):
    TrainConfig(**{"lti": {**lti, "copy_from_teacher": COPY_RULES}, "copy_from_teacher": COPY_RULES})
  with pytest.raises(ValueError, match=r"copy_from_teacher: needs lti.kernels_from"):
    TrainConfig(**{"copy_from_teacher": COPY_RULES})
  with pytest.raises(ValueError, match=r"copy_from_teacher: needs lti.kernels_path for lti.kernels_from=hf"):
    TrainConfig(**{"lti": {"kernels_from": "hf"}, "copy_from_teacher": COPY_RULES})


def test_demo_lti_recipe_plans_on_the_demo_pair(tmp_path):
  """configs/demo/lti.yaml on the demo pair (unequal head counts): its rules match and start from the teacher."""
  from distill_core.config import load_config
  from student_trainer.config import TrainConfig
  from student_trainer.lti.build import plan_for
  teacher = build(ModelConfig, resolve_preset("demo_teacher"))
  save_hf_checkpoint(create_model(teacher, seed=1), tmp_path)
  cfg = load_config(TrainConfig, "configs/demo/lti.yaml", ["lti.kernels_from=hf", f"lti.kernels_path={tmp_path}"])
  assert cfg.model.num_attention_heads < teacher.num_attention_heads
  plan, source = plan_for(cfg)
  assert len(plan.projections) == 4 * cfg.model.num_hidden_layers
  assert {s for _, s, _ in plan.copy} == {"embed_tokens.embedding", "norm.scale"} | {
      f"layers.{j}.{n}_layernorm.scale" for j in range(2) for n in ("input", "post_attention")}
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  apply_plan(model, plan, source.fetch(plan.teacher_names()))
  # select + identity: the student's one kv head is the teacher's kv head 0, and its 2 query heads are
  # that kv head's group, teacher query heads 0 and 1 (at teacher layer layer_map[1] = 5).
  t = source.fetch(["layers.5.self_attn.q_proj.kernel", "layers.5.self_attn.k_proj.kernel"])
  np.testing.assert_allclose(np.asarray(model.layers[1].self_attn.q_proj.kernel()),
                             t["layers.5.self_attn.q_proj.kernel"][:, :2], atol=1e-6)
  np.testing.assert_allclose(np.asarray(model.layers[1].self_attn.k_proj.kernel()),
                             t["layers.5.self_attn.k_proj.kernel"][:, :1], atol=1e-6)
