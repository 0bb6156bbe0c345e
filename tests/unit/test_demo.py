"""The demo's model pair (the demo itself, end to end, is in tests/integration/test_demo.py)."""


def test_demo_pair_is_a_real_compression():
  """The demo student has at most a third of the demo teacher's parameters, at the same width."""
  import jax
  import numpy as np
  from flax import nnx

  from distill_core.config import build, resolve_preset
  from distill_core.model.config import ModelConfig
  from distill_core.model.transformer import Transformer

  def params(name: str) -> tuple[int, ModelConfig]:
    cfg = build(ModelConfig, resolve_preset(name))
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))), cfg

  (teacher, t_cfg), (student, s_cfg) = params("demo_teacher"), params("demo_student")
  assert 3 * student <= teacher, (student, teacher)
  assert s_cfg.hidden_size == t_cfg.hidden_size  # learn-to-init, copies and blockwise need equal widths
