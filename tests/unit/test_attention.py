"""Attention kernels and remat policies against the dense reference (`xla`) and NumPy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from distill_core.config import resolve_preset
from distill_core.model.attention import (DENSE_MAX_LEN, attend, attention_mask, dot_product_attention,
                                          fill_padding_rows, resolve_attention)
from distill_core.model.attention_chunked import chunked_attention
from distill_core.model.attention_kernels import cudnn_attention, single_sequence_rows, splash_attention
from distill_core.model.config import ModelConfig
from distill_core.model.transformer import REMAT_POLICIES, Transformer

B, T, D = 2, 37, 8
E = resolve_preset("tiny")["hidden_size"]
# Row 0: three packed sequences then padding; row 1: leading padding, two sequences, trailing padding.
SEGMENTS = {
    "causal": np.ones((B, T), np.int32),
    "packed_padded": np.array([[1] * 10 + [2] * 15 + [3] * 5 + [0] * 7,
                               [0] * 5 + [4] * 15 + [1] * 12 + [0] * 5], np.int32),
    "all_padding_row": np.array([[1] * 20 + [0] * 17, [0] * T], np.int32),
}


def qkv(heads: int, kv_heads: int, t: int = T, seed: int = 0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, t, heads, D))
  k, v = rng.normal(size=(2, B, t, kv_heads, D))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def numpy_attention(q, k, v, seg):
  """Brute force, one (row, head, query) at a time; a row with no allowed key averages all values."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for r in range(b):
    for hh in range(h):
      for i in range(t):
        allowed = [j for j in range(i + 1) if seg[r, i] != 0 and seg[r, j] == seg[r, i]]
        if not allowed:
          out[r, i, hh] = v[r, :, hh // g].mean(axis=0)
          continue
        s = np.array([q[r, i, hh] @ k[r, j, hh // g] for j in allowed]) / np.sqrt(d)
        p = np.exp(s - s.max())
        out[r, i, hh] = (p / p.sum()) @ v[r, allowed, hh // g]
  return out


def reference(q, k, v, seg):
  return dot_product_attention(q, k, v, attention_mask(jnp.asarray(seg)))


KERNELS = {
    "chunked": lambda q, k, v, s: fill_padding_rows(chunked_attention(q, k, v, s, block_q=8, block_k=16), v, s),
    "chunked_uneven": lambda q, k, v, s: fill_padding_rows(chunked_attention(q, k, v, s, block_q=7, block_k=5),
                                                          v, s),
    "chunked_one_block": lambda q, k, v, s: attend(q, k, v, s, impl="chunked", chunk=512),
    # Off GPU the cudnn kernel takes its fallback (chunked).
    "cudnn": lambda q, k, v, s: attend(q, k, v, s, impl="cudnn", chunk=8),
    # The same lax.cond with JAX's own kernel in the fused branch, so its mask logic is tested on CPU.
    "cudnn_branch": lambda q, k, v, s: fill_padding_rows(cudnn_attention(
        q, k, v, s, implementation="xla", force=True,
        fallback=lambda: chunked_attention(q, k, v, s, block_q=8, block_k=8)), v, s),
}


def _jit_grad(fn, seg, w):
  return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg) * w), argnums=(0, 1, 2)))


@pytest.mark.parametrize("segments", sorted(SEGMENTS))
def test_reference_matches_numpy(segments):
  q, k, v = qkv(4, 2)
  np.testing.assert_allclose(reference(q, k, v, SEGMENTS[segments]), numpy_attention(q, k, v, SEGMENTS[segments]),
                             rtol=1e-5, atol=1e-5)


@functools.lru_cache(maxsize=None)
def reference_case(segments: str, heads: int, kv_heads: int):
  """Inputs, loss weights and the reference's output, loss and gradients for one case."""
  q, k, v = qkv(heads, kv_heads)
  seg = jnp.asarray(SEGMENTS[segments])
  w = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)  # a loss touching every output
  return (q, k, v), seg, w, jax.jit(reference)(q, k, v, seg), _jit_grad(reference, seg, w)(q, k, v)


def check_kernel(kernel, segments: str, heads: int = 4, kv_heads: int = 2):
  (q, k, v), seg, w, ref, (ref_loss, ref_grads) = reference_case(segments, heads, kv_heads)
  np.testing.assert_allclose(jax.jit(kernel)(q, k, v, seg), ref, rtol=1e-5, atol=1e-5)
  loss, grads = _jit_grad(kernel, seg, w)(q, k, v)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-4)
  for name, g, r in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("segments", sorted(SEGMENTS))
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_forward_and_gradients_match_reference(kernel, segments):
  check_kernel(KERNELS[kernel], segments)  # grouped-query: 4 heads share 2 kv heads


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 1)], ids=["mha", "mqa"])
def test_chunked_with_other_head_groupings(heads, kv_heads):
  check_kernel(KERNELS["chunked"], "packed_padded", heads, kv_heads)


def test_splash_interpret_matches_reference_with_gradients():
  """Splash on CPU runs in the Pallas interpreter (lax.platform_dependent picks it off TPU)."""
  check_kernel(lambda q, k, v, s: attend(q, k, v, s, impl="splash", chunk=128), "packed_padded")


def test_splash_under_a_mesh_runs_in_shard_map_over_the_batch():
  q, k, v = qkv(4, 2)
  seg = jnp.asarray(SEGMENTS["packed_padded"])
  mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1), ("data", "fsdp"))
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda q, k, v, s: splash_attention(q, k, v, s, block=128))
    assert "shard_map" in str(jax.make_jaxpr(fn)(q, k, v, seg))
    out = fill_padding_rows(fn(q, k, v, seg), v, seg)
  np.testing.assert_allclose(out, reference(q, k, v, seg), rtol=1e-5, atol=1e-5)


def test_chunked_bfloat16_is_within_bfloat16_rounding_of_the_reference():
  q, k, v = qkv(4, 2, dtype=jnp.bfloat16)
  seg = jnp.asarray(SEGMENTS["packed_padded"])
  out = jax.jit(KERNELS["chunked"])(q, k, v, seg)
  assert out.dtype == jnp.bfloat16
  exact = numpy_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), np.asarray(seg))
  err_chunked = np.abs(np.asarray(out, np.float32) - exact).max()
  err_reference = np.abs(np.asarray(reference(q, k, v, seg), np.float32) - exact).max()
  assert err_chunked <= max(2 * err_reference, 2e-2), (err_chunked, err_reference)


def test_single_sequence_rows_matches_a_loop():
  def brute(seg):
    for row in seg:
      n = int((row != 0).sum())
      if n == 0 or not (row[:n] == row[0]).all() or (row[n:] != 0).any():
        return False
    return True
  cases = [*SEGMENTS.values(), np.array([[3] * 30 + [0] * 7, [1] * T]), np.array([[1] * T, [2] * 20 + [0] * 17])]
  for seg in cases:
    assert bool(single_sequence_rows(jnp.asarray(seg))) == brute(seg), seg


def test_auto_picks_by_platform_and_length():
  assert resolve_attention("auto", 4096, "tpu") == "splash"
  assert resolve_attention("auto", 64, "gpu") == "cudnn"
  assert resolve_attention("auto", DENSE_MAX_LEN, "cpu") == "xla"
  assert resolve_attention("auto", DENSE_MAX_LEN + 1, "cpu") == "chunked"
  assert resolve_attention("chunked", 8, "tpu") == "chunked"
  with jax.set_mesh(Mesh(np.asarray(jax.devices()[:2]).reshape(2, 1), ("data", "fsdp"))):
    assert resolve_attention("auto", DENSE_MAX_LEN + 1) == "chunked"  # a mesh of CPU devices


def _temp_bytes(fn, t: int) -> int:
  q, k, v = (jax.ShapeDtypeStruct((1, t, h, 16), jnp.float32) for h in (2, 1, 1))
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  grad = jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s)), argnums=(0, 1, 2))
  return jax.jit(grad).lower(q, k, v, seg).compile().memory_analysis().temp_size_in_bytes


def test_chunked_temporaries_grow_linearly_in_sequence_length():
  chunked = lambda q, k, v, s: attend(q, k, v, s, impl="chunked", chunk=256)  # noqa: E731
  dense = lambda q, k, v, s: attend(q, k, v, s, impl="xla")  # noqa: E731
  small, large = _temp_bytes(chunked, 1024), _temp_bytes(chunked, 2048)
  assert large < 2.2 * small, (small, large)  # doubling T: linear <= 2x, quadratic ~4x
  # The check can fail: the dense reference's temporaries grow far faster than linearly (4x T: ~16x).
  dense_small, dense_large = _temp_bytes(dense, 512), _temp_bytes(dense, 2048)
  assert dense_large > 6 * dense_small, (dense_small, dense_large)
  assert large < dense_large / 8


# --- the whole model -------------------------------------------------------------------------------------

def tiny(**kw) -> ModelConfig:
  return ModelConfig(**{**resolve_preset("tiny"), **kw})


def with_config(model: Transformer, **changes) -> Transformer:
  """`model`'s weights under a config that differs only in attention/remat fields."""
  new = nnx.eval_shape(lambda: Transformer(model.cfg.model_copy(update=changes), rngs=nnx.Rngs(0)))
  nnx.update(new, nnx.state(model))
  return new


def model_batch(t: int = 12):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 200, (2, t)).astype(np.int32)
  seg = np.array([[1] * 5 + [2] * 4 + [0] * (t - 9), [0] * 2 + [1] * (t - 2)], np.int32)
  pos = np.array([list(range(5)) + list(range(4)) + [0] * (t - 9), [0, 0] + list(range(t - 2))], np.int32)
  inject = rng.normal(size=(2, t, E)).astype(np.float32)
  return tokens, pos, seg, inject


def forward_and_grads(model):
  tokens, pos, seg, inject = model_batch()
  w = np.random.default_rng(2).normal(size=(2, 2, 12, 2, E)).astype(np.float32)

  def loss(model):
    out = model(tokens, pos, seg, state_layers=(1, 0), inject_attn_in={1: inject})
    real = (seg != 0)[:, :, None]
    states = jnp.stack([out.states["attn_in"], out.states["attn_out"]], axis=3)  # (L, B, T, 2, E)
    value = jnp.sum(jnp.where(real, jax.nn.log_softmax(out.logits), 0.0)[..., :7]) + jnp.sum(states * w)
    return value, out

  (_, out), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
  return out, {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


@pytest.fixture(scope="module")
def models():
  from distill_core.model.layout import to_scanned
  unrolled = Transformer(tiny(attention="xla", attention_chunk=4), rngs=nnx.Rngs(5))
  return {False: unrolled, True: to_scanned(unrolled)}


@pytest.fixture(scope="module")
def references(models):
  return {scan: forward_and_grads(m) for scan, m in models.items()}


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("impl", ["chunked", "cudnn", "splash"])
def test_model_logits_states_and_gradients_match_xla(models, references, impl, scan):
  """Full model with packed and padded rows, GQA (tiny: 4 heads, 2 kv heads), layer states, injection."""
  ref_out, ref_grads = references[scan]
  out, grads = forward_and_grads(with_config(models[scan], attention=impl))
  np.testing.assert_allclose(out.logits, ref_out.logits, rtol=1e-5, atol=1e-5)
  for name in ("attn_in", "attn_out"):
    np.testing.assert_allclose(out.states[name], ref_out.states[name], rtol=1e-5, atol=1e-5, err_msg=name)
  assert grads.keys() == ref_grads.keys()
  for name, g in grads.items():
    np.testing.assert_allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_every_remat_policy_gives_the_same_gradients(models, references, policy, scan):
  _, ref_grads = references[scan]
  model = with_config(models[scan], remat=policy)
  _, grads = forward_and_grads(model)
  for name, g in grads.items():
    np.testing.assert_allclose(g, ref_grads[name], rtol=1e-5, atol=1e-6, err_msg=name)  # fp32 op order
  graphdef, state = nnx.split(model)
  tokens = model_batch()[0]
  jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens).logits)(state))
  assert jaxpr.count("remat2[") == (1 if scan else 2)


def test_remat_accepts_booleans_and_rejects_unknown_policies():
  assert tiny(remat=True).remat == "full" and tiny(remat=False).remat == "none"
  with pytest.raises(ValueError, match="remat"):
    tiny(remat="minimal")
  with pytest.raises(ValueError, match="attention"):
    tiny(attention="flash")


def test_runtime_fields_are_exactly_what_a_hugging_face_config_does_not_carry():
  """Loading weights with `**cfg.runtime_fields()` rebuilds `cfg` (the trainer compares the two)."""
  from distill_core.model.hf import config_from_hf, config_to_hf
  cfg = tiny(attention="chunked", attention_chunk=64, remat="save_attn_out", scan_layers=True,
             dtype="bfloat16", param_dtype="float32")
  rebuilt = config_from_hf(config_to_hf(cfg)).model_copy(update=cfg.runtime_fields())
  assert ModelConfig.model_validate(rebuilt.model_dump()) == cfg
