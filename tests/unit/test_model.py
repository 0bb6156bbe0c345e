"""Model core: layouts, layer states, injection, swappable projections, axis names, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill_core.config import resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.model.layers import LOGICAL_AXES
from distill_core.model.layout import logical_axes, to_scanned, to_unrolled
from distill_core.model.transformer import Transformer, count_params, create_model


def tiny(**kw) -> ModelConfig:
  return ModelConfig(**{**resolve_preset("tiny"), **kw})


@nnx.jit(static_argnames=("state_layers", "state_names"))
def run(model, tokens, positions=None, segments=None, *, state_layers=(), state_names=("attn_in", "attn_out"),
        inject=None):
  """The model's forward, compiled once per shape (eager op-by-op dispatch is slow on CPU)."""
  return model(tokens, positions, segments, state_layers=state_layers, state_names=state_names,
               inject_attn_in=inject)


def packed_batch():
  """Two rows: row 0 holds sequences of length 5 and 3 then 2 pads; row 1 one sequence of 10."""
  rng = np.random.RandomState(0)
  tokens = rng.randint(0, 200, (2, 10)).astype(np.int32)
  segments = np.array([[1] * 5 + [2] * 3 + [0] * 2, [1] * 10], np.int32)
  positions = np.array([list(range(5)) + list(range(3)) + [0, 0], list(range(10))], np.int32)
  return tokens, positions, segments


@pytest.fixture(scope="module")
def unrolled():
  return create_model(tiny(rope_scaling={"factor": 8.0, "original_max_position_embeddings": 16}), seed=3)


@pytest.fixture(scope="module")
def scanned(unrolled):
  return to_scanned(unrolled)


def standard(model):
  """The forward most tests share (one compilation per model structure)."""
  tokens, positions, segments = packed_batch()
  return run(model, tokens, positions, segments, state_layers=(1, 0))


def same_weights(model, **changes):
  """A model with a changed config (remat, dtypes) holding `model`'s weights."""
  cfg = model.cfg.model_copy(update=changes)
  new = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  nnx.update(new, jax.tree.map(lambda x: x.astype(cfg.param_dtype), nnx.state(model)))
  return new


def test_forward_shapes_dtypes_and_defaults(unrolled):
  tokens, _, _ = packed_batch()
  out = run(unrolled, tokens)
  assert out.logits.shape == (2, 10, unrolled.cfg.vocab_size) and out.logits.dtype == jnp.float32
  assert out.states == {}
  explicit = run(unrolled, tokens, np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10)),
                 np.ones((2, 10), np.int32))
  np.testing.assert_array_equal(out.logits, explicit.logits)
  out = standard(unrolled)
  assert set(out.states) == {"attn_in", "attn_out"}
  assert out.states["attn_out"].shape == (2, 2, 10, 32)


def test_scanned_and_unrolled_agree(unrolled, scanned):
  a, b = standard(unrolled), standard(scanned)
  np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6, atol=1e-6)
  for name in ("attn_in", "attn_out"):
    np.testing.assert_allclose(a.states[name], b.states[name], rtol=1e-6, atol=1e-6)
  # The stacked layout holds exactly the same weights, and converts back exactly.
  q = scanned.layers.self_attn.q_proj.kernel[...]
  assert q.shape == (2, 32, 4, 8)
  np.testing.assert_array_equal(q[1], unrolled.layers[1].self_attn.q_proj.kernel[...])
  back = to_unrolled(scanned)
  pairs = zip(nnx.to_flat_state(nnx.state(unrolled)), nnx.to_flat_state(nnx.state(back)), strict=True)
  for (pa, va), (pb, vb) in pairs:
    assert pa == pb
    np.testing.assert_array_equal(va[...], vb[...])
  assert back.cfg.scan_layers is False and scanned.cfg.scan_layers is True


def test_states_follow_the_requested_order(unrolled):
  """The standard call asks for layers (1, 0): slot 1 must be layer 0's input norm of the embeddings."""
  out = standard(unrolled)
  tokens, _, _ = packed_batch()
  x = unrolled.embed_tokens(tokens)
  np.testing.assert_allclose(out.states["attn_in"][1], unrolled.layers[0].input_layernorm(x),
                             rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(out.states["attn_in"][0] - out.states["attn_in"][1])).max() > 1e-2


def test_packed_rows_equal_separate_sequences(unrolled):
  """Segment-aware masking + per-token positions: a packed row equals the sequences run alone."""
  tokens, _, _ = packed_batch()
  packed = standard(unrolled).logits
  alone_a = run(unrolled, tokens[:1, :5]).logits
  alone_b = run(unrolled, tokens[:1, 5:8]).logits
  np.testing.assert_allclose(packed[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, 5:8], alone_b[0], rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(packed)).all()  # padding rows attend to nothing, yet stay finite


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_injecting_own_attn_in_is_exact_and_other_input_changes_layer(layout, unrolled, scanned):
  model = unrolled if layout == "unrolled" else scanned
  tokens, positions, segments = packed_batch()
  base = standard(model)  # slot 0 = layer 1, slot 1 = layer 0
  own = {1: base.states["attn_in"][0], 0: base.states["attn_in"][1]}
  same = run(model, tokens, positions, segments, state_layers=(1, 0), inject=own)
  np.testing.assert_array_equal(same.logits, base.logits)
  np.testing.assert_array_equal(same.states["attn_out"], base.states["attn_out"])

  moved = run(model, tokens, positions, segments, state_layers=(1, 0), inject={1: OTHER})
  np.testing.assert_array_equal(moved.states["attn_in"][0], OTHER)
  np.testing.assert_array_equal(moved.states["attn_out"][1], base.states["attn_out"][1])  # layer 0 untouched
  assert np.abs(np.asarray(moved.states["attn_out"][0] - base.states["attn_out"][0])).max() > 1e-3
  assert np.abs(np.asarray(moved.logits - base.logits)).max() > 1e-3


OTHER = np.random.RandomState(1).normal(size=(2, 10, 32)).astype(np.float32)


def test_injection_agrees_between_layouts(unrolled, scanned):
  tokens, positions, segments = packed_batch()
  a = run(unrolled, tokens, positions, segments, state_layers=(1, 0), inject={1: OTHER})
  b = run(scanned, tokens, positions, segments, state_layers=(1, 0), inject={1: OTHER})
  np.testing.assert_allclose(a.logits, b.logits, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(a.states["attn_out"], b.states["attn_out"], rtol=1e-6, atol=1e-6)


class ComposedQuery(nnx.Module):
  """A q_proj replacement whose kernel is computed: K[e,u,d] = sum_x C[e,x,d] A[x,u].

  C is a frozen `nnx.Variable` (not a Param), A a trainable head map.
  """

  def __init__(self, frozen_kernel: jax.Array):
    self.frozen = nnx.Variable(frozen_kernel)
    heads = frozen_kernel.shape[1]
    self.head_map = nnx.Param(jnp.eye(heads, dtype=frozen_kernel.dtype))

  def __call__(self, x):
    kernel = jnp.einsum("exd,xu->eud", self.frozen[...], self.head_map[...])
    return jnp.einsum("bte,ehd->bthd", x, kernel)


def test_projection_can_be_swapped_for_any_module(unrolled):
  model = nnx.clone(unrolled)
  base = standard(unrolled).logits
  kernel = model.layers[1].self_attn.q_proj.kernel[...]
  model.layers[1].self_attn.q_proj = ComposedQuery(kernel)
  np.testing.assert_allclose(standard(model).logits, base, rtol=1e-6, atol=1e-6)

  # Swapping two heads in the map equals swapping them in a plain kernel.
  perm = jnp.array([1, 0, 2, 3])
  model.layers[1].self_attn.q_proj.head_map[...] = jnp.eye(4)[:, perm]
  swapped = standard(model).logits
  reference = nnx.clone(unrolled)
  reference.layers[1].self_attn.q_proj.kernel[...] = kernel[:, perm]
  np.testing.assert_allclose(swapped, standard(reference).logits, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(swapped - base)).max() > 1e-4

  # Gradients (traced, not run) reach the head map but not the frozen kernel.
  tokens, _, _ = packed_batch()
  grads = nnx.eval_shape(nnx.grad(lambda m: m(tokens).logits.std()), model)
  assert set(grads["layers"][1]["self_attn"]["q_proj"]) == {"head_map"}
  assert set(grads["layers"][0]["self_attn"]["q_proj"]) == {"kernel"}

  # With the same module in every layer, the swapped model converts to the scanned layout.
  model.layers[0].self_attn.q_proj = ComposedQuery(model.layers[0].self_attn.q_proj.kernel[...])
  stacked = to_scanned(model)
  assert stacked.layers.self_attn.q_proj.frozen.shape == (2, 32, 4, 8)
  np.testing.assert_allclose(standard(stacked).logits, swapped, rtol=1e-6, atol=1e-6)


def _loss(model):
  tokens, positions, segments = packed_batch()
  out = model(tokens, positions, segments, state_layers=(1,))
  return out.logits.std() + out.states["attn_out"].mean()


def _grads(model) -> dict[str, np.ndarray]:
  grads = nnx.jit(nnx.grad(_loss))(model)
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


def test_remat_gives_the_same_gradients(unrolled, scanned):
  plain = _grads(unrolled)
  assert len(plain) == 21 and all(np.isfinite(g).all() for g in plain.values())
  remat_scanned = _grads(same_weights(scanned, remat=True))
  assert len(remat_scanned) == 12
  for name, g in remat_scanned.items():
    if name.startswith("layers."):
      for i in range(2):
        np.testing.assert_allclose(g[i], plain[name.replace("layers.", f"layers.{i}.", 1)],
                                   rtol=1e-5, atol=1e-7, err_msg=name)
    else:
      np.testing.assert_allclose(g, plain[name], rtol=1e-5, atol=1e-7, err_msg=name)
  # Both layouts really rematerialise: the traced forward holds one remat per layer call.
  for scan, expected in ((False, 2), (True, 1)):
    for remat in (False, True):
      abstract = nnx.eval_shape(lambda c=tiny(scan_layers=scan, remat=remat): Transformer(c, rngs=nnx.Rngs(0)))
      graphdef, state = nnx.split(abstract)
      jaxpr = str(jax.make_jaxpr(lambda s, g=graphdef: _loss(nnx.merge(g, s)))(state))
      assert jaxpr.count("remat2[") == (expected if remat else 0)


def test_bfloat16_compute_and_params(unrolled):
  bf16 = same_weights(unrolled, dtype="bfloat16", param_dtype="bfloat16")
  assert bf16.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  out = standard(bf16)
  assert out.logits.dtype == jnp.float32 and out.states["attn_in"].dtype == jnp.bfloat16
  np.testing.assert_allclose(out.logits, standard(unrolled).logits, atol=3e-2)


def test_jit_with_static_graphdef(unrolled):
  graphdef, state = nnx.split(unrolled)
  tokens, positions, segments = packed_batch()
  fn = jax.jit(lambda g, s: nnx.merge(g, s)(tokens, positions, segments).logits, static_argnums=0)
  np.testing.assert_allclose(fn(graphdef, state), standard(unrolled).logits, rtol=1e-6, atol=1e-6)


def test_logical_axes(unrolled, scanned):
  axes = logical_axes(unrolled)
  assert axes["embed_tokens.embedding"] == ("vocab", "embed")
  assert axes["layers.1.self_attn.q_proj.kernel"] == ("embed", "q_heads", "head_dim")
  assert axes["layers.0.self_attn.k_proj.kernel"] == ("embed", "kv_heads", "head_dim")
  assert axes["layers.0.self_attn.o_proj.kernel"] == ("q_heads", "head_dim", "embed")
  assert axes["layers.0.mlp.down_proj.kernel"] == ("mlp", "embed")
  assert axes["norm.scale"] == ("norm",) and axes["lm_head.kernel"] == ("embed", "vocab")
  stacked = logical_axes(scanned)
  assert stacked["layers.mlp.gate_proj.kernel"] == ("layers", "embed", "mlp")
  assert len(stacked) == 2 + (len(axes) - 3) // 2 + 1
  shapes = {".".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(scanned, nnx.Param))}
  for path, names in stacked.items():
    assert len(names) == len(shapes[path]), path
    assert set(names) <= set(LOGICAL_AXES) | {"layers"}, path
  specs = nnx.get_partition_spec(nnx.state(scanned, nnx.Param))
  assert tuple(specs["layers"]["self_attn"]["v_proj"]["kernel"].get_value()) == ("layers", "embed", "kv_heads", "head_dim")


@pytest.mark.parametrize("preset,expected", [
    ("llama3_8b", 8_030_261_248),
    ("llama3_2_1b", 1_235_814_400),
    ("qwen2_5_0_5b", 494_032_768),
])
def test_published_parameter_counts_without_memory(preset, expected):
  cfg = ModelConfig(**resolve_preset(preset))
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  assert count_params(abstract) == expected
  layers, e = cfg.num_hidden_layers, cfg.hidden_size
  heads, d = cfg.num_attention_heads, cfg.dim_per_head
  assert abstract.layers.self_attn.q_proj.kernel.shape == (layers, e, heads, d)
  assert (abstract.lm_head is None) == cfg.tie_word_embeddings
  out = nnx.eval_shape(lambda m, t: m(t, state_layers=(0, layers - 1)), abstract,
                       jax.ShapeDtypeStruct((2, 16), jnp.int32))
  assert out.logits.shape == (2, 16, cfg.vocab_size) and out.logits.dtype == jnp.float32
  assert out.states["attn_out"].shape == (2, 2, 16, e)


def test_bad_inputs_name_the_problem(unrolled):
  tokens, _, _ = packed_batch()
  with pytest.raises(ValueError, match="state_layers"):
    unrolled(tokens, state_layers=(2,))
  with pytest.raises(ValueError, match="repeats"):
    unrolled(tokens, state_layers=(0, 0))
  with pytest.raises(ValueError, match="state_names"):
    unrolled(tokens, state_layers=(0,), state_names=("mlp_out",))
  with pytest.raises(ValueError, match=r"inject_attn_in\[0\]"):
    unrolled(tokens, inject_attn_in={0: np.zeros((2, 10, 16), np.float32)})
  with pytest.raises(ValueError, match="inject_attn_in layer 5"):
    unrolled(tokens, inject_attn_in={5: np.zeros((2, 10, 32), np.float32)})
  with pytest.raises(ValueError, match="tokens"):
    unrolled(tokens.astype(np.float32))
  with pytest.raises(ValueError, match="segment_ids"):
    unrolled(tokens, segment_ids=np.ones((2, 9), np.int32))
