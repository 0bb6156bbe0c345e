"""Learn-to-init in the trainer: frozen parameters, exact resume, fingerprints, remote kernels, end to end."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from integration.test_trainer import make_cfg
from unit.test_lti import student_cfg, teacher_cfg

from distill_core.model.hf import save_hf_checkpoint
from distill_core.model.transformer import create_model
from student_trainer.lti.modules import TeacherKernel
from student_trainer.train import run

STUDENT = ["model.preset=tiny", "model.num_attention_heads=2", "model.num_key_value_heads=1", "model.head_dim=4",
           "model.model_type=qwen2", "model.attention_bias=true"]


@pytest.fixture(scope="module")
def teacher_hf(tmp_path_factory):
  path = tmp_path_factory.mktemp("lti_train_teacher")
  save_hf_checkpoint(create_model(teacher_cfg(), seed=1), path)
  return path


def lti_args(teacher_hf, *extra):
  return [*STUDENT, "lti.enabled=true", "lti.kernels_from=hf", f"lti.kernels_path={teacher_hf}",
          "lti.layer_map=[0,2]", *extra]


def flat_params(state):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(state.model(), nnx.Param))}


def test_only_trainable_parameters_change(tiny_dataset, tmp_path, teacher_hf):
  cfg = make_cfg(tiny_dataset, tmp_path / "run", "steps=2", "optim.learning_rate=1e-2", "optim.warmup_steps=0",
                 *lti_args(teacher_hf, r"lti.train=['\.a$','\.b$']"))
  from distill_core.sharding import make_mesh, rules_table
  from student_trainer.state import create_train_state
  before = create_train_state(cfg, make_mesh(cfg.mesh), rules_table(cfg.mesh))
  before_params = flat_params(before)
  before_c = {k: np.asarray(v) for k, v in jax.tree.leaves_with_path(nnx.state(before.model(), TeacherKernel))}
  after = run(cfg, keep_state=True).state
  after_params = flat_params(after)
  after_c = {k: np.asarray(v) for k, v in jax.tree.leaves_with_path(nnx.state(after.model(), TeacherKernel))}
  changed = {p for p in before_params if not np.array_equal(before_params[p], after_params[p])}
  assert changed == {p for p in before_params if p.endswith((".a", ".b"))}
  assert before_c.keys() == after_c.keys() and len(before_c) == 8
  for k in before_c:
    np.testing.assert_array_equal(before_c[k], after_c[k])
  # The optimizer holds moments of the trainable parameters only.
  _, opt = nnx.merge(after.graphdef, after.params)
  assert sorted(opt.wrt.paths) == sorted(p for p in before_params if p.endswith((".a", ".b")))


def test_lti_resume_is_bit_exact_and_checkpoints_hold_no_teacher_kernel(tiny_dataset, tmp_path, teacher_hf):
  args = lti_args(teacher_hf, "loss.top_k=8", "teacher.source=local", "teacher.local.model=tiny")
  straight = run(make_cfg(tiny_dataset, tmp_path / "a", *args), keep_state=True)
  cfg_b = make_cfg(tiny_dataset, tmp_path / "b", *args)
  first = run(cfg_b, stop_after=3)
  assert first.step == 3
  import json

  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(tmp_path / "b" / "checkpoints" / "3" / "state").item_metadata
  keys = [jax.tree_util.keystr(k) for k, _ in jax.tree.leaves_with_path(tree)]
  assert any("['q_proj']['a']" in k for k in keys) and not any("['c']" in k for k in keys)  # C is not saved
  meta = json.loads((tmp_path / "b" / "checkpoints" / "3" / "meta" / "metadata").read_text())
  assert meta["lti"]["teacher"] == {"kernels_from": "hf", "kernels_path": str(teacher_hf.resolve())}
  assert len(meta["lti"]["kernel_fingerprint"]) == 64
  second = run(cfg_b, keep_state=True)
  assert second.step == 6
  a, b = flat_params(straight.state), flat_params(second.state)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # The collapsed student was written at the end and exports to HF without LTI parameters.
  from distill_core.checkpoints import load_model
  plain = load_model(orbax_checkpoint=str(tmp_path / "b" / "collapsed"))
  tokens = np.arange(32).reshape(2, 16) % 384
  np.testing.assert_allclose(np.asarray(plain(tokens).logits), np.asarray(second.state.model()(tokens).logits),
                             rtol=1e-5, atol=1e-5)


def test_resume_refuses_other_teacher_kernels(tiny_dataset, tmp_path, teacher_hf):
  cfg = make_cfg(tiny_dataset, tmp_path / "run", *lti_args(teacher_hf))
  run(cfg, stop_after=3)
  other = tmp_path / "other_teacher"
  save_hf_checkpoint(create_model(teacher_cfg(), seed=2), other)
  with pytest.raises(ValueError, match="teacher kernels .* differ from those the checkpoint was trained with"):
    run(make_cfg(tiny_dataset, tmp_path / "run", *lti_args(other)))
