"""The (data, fsdp, tensor) mesh: rules for heads, MLP width and vocabulary, and the same numbers as one device."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from distill_core.config import load_config
from distill_core.sharding import MeshConfig, batch_parallelism, make_mesh, rules_table, state_shardings
from student_trainer.config import TrainConfig


def needs_eight():
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


def test_mesh_sizes_fill_the_free_axis_and_refuse_what_does_not_fit():
  assert MeshConfig(data=1, fsdp=-1, tensor=2).sizes(8) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert MeshConfig(fsdp=2, tensor=2).sizes(8) == {"data": 2, "fsdp": 2, "tensor": 2}
  with pytest.raises(ValueError, match="only one of data, fsdp may be -1"):
    MeshConfig(data=-1, fsdp=-1).sizes(8)
  with pytest.raises(ValueError, match="does not fit the 8 available devices"):
    MeshConfig(data=1, fsdp=4, tensor=4).sizes(8)


def train_cfg(tmp_path, *overrides):
  base = ["model=tiny", "model.hidden_size=64", "model.intermediate_size=128", "steps=1", f"run_dir={tmp_path}",
          "optim.warmup_steps=0", "loss.alpha=0.5", "loss.top_k=8"]
  return load_config(TrainConfig, None, base + list(overrides))


def test_tensor_axis_shards_heads_mlp_and_vocabulary(tmp_path):
  needs_eight()
  from student_trainer.state import abstract_train_state
  cfg = train_cfg(tmp_path, "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4")
  mesh = make_mesh(cfg.mesh)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 4} and batch_parallelism(mesh) == 2
  state = abstract_train_state(cfg, mesh, rules_table(cfg.mesh))
  model, _ = nnx.merge(state.graphdef, state.params)
  specs = {".".join(map(str, p)): v.get_value().sharding.spec
           for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  # tiny: 4 query heads and 2 kv heads; 2 kv heads do not divide by 4, so they stay whole.
  assert specs["layers.0.self_attn.q_proj.kernel"] == PartitionSpec("fsdp", "tensor", None)
  assert specs["layers.0.self_attn.k_proj.kernel"] == PartitionSpec("fsdp", None, None)
  assert specs["layers.0.self_attn.o_proj.kernel"] == PartitionSpec("tensor", None, "fsdp")
  assert specs["layers.0.mlp.gate_proj.kernel"] == PartitionSpec("fsdp", "tensor")
  assert specs["layers.0.mlp.down_proj.kernel"] == PartitionSpec("tensor", "fsdp")
  assert specs["embed_tokens.embedding"] == PartitionSpec("tensor", "fsdp")


def one_step(cfg, devices):
  """Loss and updated parameters of one kd train step on `devices`, from the same init, batch and targets."""
  from distill_core.data import Batch
  from distill_core.sharding import shard_batch
  from distill_core.targets import TeacherTargets
  from student_trainer import step as step_lib
  from student_trainer.state import create_train_state
  mesh = make_mesh(cfg.mesh, devices)
  state = create_train_state(cfg, mesh, rules_table(cfg.mesh))
  rng = np.random.default_rng(0)
  b, t, k, v = 8, 16, cfg.loss.top_k, cfg.model.real_vocab_size
  tokens = rng.integers(0, v, (b, t), dtype=np.int32)
  ones = np.ones_like(tokens)
  batch = Batch.from_examples({"example_ids": np.arange(b), "tokens": tokens, "segment_ids": ones,
                               "positions": np.cumsum(ones, axis=1, dtype=np.int32) - 1})
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  ids = np.argsort(-logits, axis=-1)[..., :k].astype(np.int32)
  top = np.take_along_axis(logits, ids, axis=-1)
  shifted = logits - logits.max(-1, keepdims=True)
  lse = np.log(np.exp(shifted).sum(-1, keepdims=True)).astype(np.float32)
  targets = TeacherTargets(topk_ids=shard_batch(ids, mesh),
                           topk_logits=shard_batch((top - logits.max(-1, keepdims=True)).astype(np.float32), mesh),
                           logsumexp=shard_batch(lse, mesh), temperatures=[1.0])
  fn = step_lib.make_train_step(state.graphdef, cfg, "kd", state.shardings)
  params, metrics = fn(state.params, shard_batch(batch, mesh), targets, step_lib.hyperparameters(cfg, 0))
  model, _ = nnx.merge(state.graphdef, params)
  leaves = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
  return float(metrics["total_loss_sum"]) / float(metrics["tokens"]), leaves, params


def test_tensor_parallel_step_matches_one_device(tmp_path):
  needs_eight()
  one, one_params, _ = one_step(train_cfg(tmp_path, "mesh.data=1"), jax.devices()[:1])
  loss, params, state = one_step(train_cfg(tmp_path, "mesh.data=2", "mesh.fsdp=1", "mesh.tensor=4"), jax.devices())
  assert any(not x.sharding.is_fully_replicated and "tensor" in str(x.sharding.spec) for x in jax.tree.leaves(state))
  assert loss == pytest.approx(one, rel=1e-5)
  # Adam's first step is about lr * sign(g): where g is near 0, the tensor-parallel sums' other
  # order may move a weight by a few percent of one step (lr = 3e-3); a wrong layout moves it by a whole one.
  for a, b in zip(one_params, params, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_fsdp_over_every_chip_with_tensor_matches_one_device(tmp_path):
  needs_eight()
  one, _, _ = one_step(train_cfg(tmp_path, "mesh.data=1"), jax.devices()[:1])
  loss, _, _ = one_step(train_cfg(tmp_path, "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=2"), jax.devices())
  assert loss == pytest.approx(one, rel=1e-5)


def test_float32_master_weights_with_bfloat16_compute(tmp_path):
  """param_dtype float32 + dtype bfloat16: parameters and Adam moments stay f32, the loss is the f32
  model's to bf16 precision."""
  needs_eight()
  full, _, _ = one_step(train_cfg(tmp_path, "mesh.data=1"), jax.devices()[:1])
  loss, params, state = one_step(train_cfg(tmp_path, "mesh.data=1", "model.dtype=bfloat16",
                                           "model.param_dtype=float32"), jax.devices()[:1])
  assert all(p.dtype == np.float32 for p in params)
  floats = [x for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating)]
  assert floats and all(x.dtype == np.float32 for x in floats)  # moments follow the master weights
  assert loss == pytest.approx(full, rel=2e-2) and loss != full
