"""TeacherTargets and compute_targets against NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_core import targets as tg

B, T, V, TRUE_V, K = 3, 5, 40, 36, 6
TEMPS = (0.5, 1.0, 3.0)


def _logits(seed=0, scale=4.0):
  rng = np.random.default_rng(seed)
  z = (rng.normal(size=(B, T, V)) * scale).astype(np.float32)
  z[..., TRUE_V:] = 100.0  # padded ids would win every top-k if they were not masked
  return z


def _reference(z, k, temps, true_v):
  """float64 loops: ids sorted descending, shifted values, per-temperature logsumexp."""
  ids = np.zeros((B, T, k), np.int64)
  vals = np.zeros((B, T, k))
  lse = np.zeros((B, T, len(temps)))
  for b in range(B):
    for t in range(T):
      row = z[b, t, :true_v].astype(np.float64)
      row = row - row.max()
      order = sorted(range(true_v), key=lambda v: -row[v])[:k]
      ids[b, t] = order
      vals[b, t] = row[order]
      for j, temp in enumerate(temps):
        lse[b, t, j] = np.log(np.sum(np.exp(row / temp)))
  return ids, vals, lse


def test_compute_targets_matches_numpy():
  z = _logits()
  out = tg.compute_targets(jnp.asarray(z), k=K, temperatures=TEMPS, true_vocab_size=TRUE_V,
                           value_dtype="float32")
  ids, vals, lse = _reference(z, K, TEMPS, TRUE_V)
  np.testing.assert_array_equal(np.asarray(out.topk_ids), ids)
  assert out.topk_ids.dtype == jnp.int32 and int(np.asarray(out.topk_ids).max()) < TRUE_V
  np.testing.assert_allclose(np.asarray(out.topk_logits), vals, rtol=0, atol=2e-6)
  assert np.all(np.asarray(out.topk_logits)[..., 0] == 0.0)  # shifted: top entry exactly 0
  np.testing.assert_allclose(np.asarray(out.logsumexp), lse, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(out.temperatures), np.asarray(TEMPS, np.float32))
  assert out.layer_states == {} and out.state_layers == () and out.dense_logits is None
  out.validate(batch_size=B, seq_len=T, k=K, n_temps=len(TEMPS))


def test_logsumexp_keeps_precision_for_a_dominant_token():
  z = np.zeros((B, T, V), np.float32)
  z[..., 0] = 30.0  # every other token has probability e^-30 ~ 1e-13
  out = tg.compute_targets(jnp.asarray(z), k=2, temperatures=(1.0,), true_vocab_size=V, value_dtype="float32")
  expect = np.log1p((V - 1) * np.exp(-30.0))  # ~3.6e-12, far below float32 resolution of 1 + x
  np.testing.assert_allclose(np.asarray(out.logsumexp)[..., 0], expect, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_value_dtype_rounds_shifted_values(dtype):
  z = _logits(seed=1) + 25.0  # raw magnitudes ~25: shifting keeps the small values exact
  out32 = tg.compute_targets(jnp.asarray(z), k=K, temperatures=(1.0,), true_vocab_size=TRUE_V,
                             value_dtype="float32")
  out = tg.compute_targets(jnp.asarray(z), k=K, temperatures=(1.0,), true_vocab_size=TRUE_V,
                           value_dtype=dtype)
  assert out.topk_logits.dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(np.asarray(out.topk_logits),
                                np.asarray(out32.topk_logits).astype(jnp.dtype(dtype)))
  np.testing.assert_array_equal(np.asarray(out.logsumexp), np.asarray(out32.logsumexp))


def test_jit_with_traced_temperatures_compiles_once():
  fn = jax.jit(functools.partial(tg.compute_targets, k=K, true_vocab_size=TRUE_V))
  z = jnp.asarray(_logits())
  a = fn(z, temperatures=jnp.asarray([1.0], jnp.float32))
  b = fn(z, temperatures=jnp.asarray([2.0], jnp.float32))
  assert fn._cache_size() == 1
  _, _, lse = _reference(_logits(), K, (2.0,), TRUE_V)
  np.testing.assert_allclose(np.asarray(b.logsumexp), lse, rtol=1e-6)
  assert not np.allclose(np.asarray(a.logsumexp), np.asarray(b.logsumexp))


def test_states_are_carried():
  states = {"attn_out": jnp.ones((2, B, T, 8), jnp.float32), "attn_in": jnp.zeros((2, B, T, 8), jnp.float32)}
  out = tg.compute_targets(jnp.asarray(_logits()), k=K, temperatures=(1.0,), true_vocab_size=TRUE_V,
                           states=states, state_layers=(3, 1), state_dtype="bfloat16")
  assert out.state_layers == (3, 1)
  assert out.layer_states["attn_out"].dtype == jnp.bfloat16
  out.validate(hidden_size=8, state_names=("attn_in", "attn_out"), state_layers=(3, 1))
  with pytest.raises(ValueError, match="hidden_size"):
    out.validate(hidden_size=16)
  with pytest.raises(ValueError, match="state_layers"):
    tg.compute_targets(jnp.asarray(_logits()), k=K, temperatures=(1.0,), true_vocab_size=TRUE_V,
                       states=states)


@pytest.mark.parametrize("kwargs, field", [
    ({"k": TRUE_V + 1}, "k"),
    ({"true_vocab_size": V + 1}, "true_vocab_size"),
    ({"value_dtype": "int8"}, "value_dtype"),
])
def test_compute_targets_rejects_bad_arguments(kwargs, field):
  args = {"k": K, "temperatures": (1.0,), "true_vocab_size": TRUE_V, **kwargs}
  with pytest.raises(ValueError, match=field):
    tg.compute_targets(jnp.asarray(_logits()), **args)


def _sample(seed=0, with_states=True, dense=False):
  rng = np.random.default_rng(seed)
  arrays = {
      "topk_ids": rng.integers(0, TRUE_V, size=(B, T, K)).astype(np.int32),
      "topk_logits": -np.abs(rng.normal(size=(B, T, K))).astype(np.float16),
      "logsumexp": rng.random(size=(B, T, 2)).astype(np.float32),
      "temperatures": np.asarray([1.0, 2.0], np.float32),
      "state_layers": np.asarray([0, 2], np.int32) if with_states else np.zeros((0,), np.int32),
  }
  if with_states:
    arrays["layer_states.attn_out"] = rng.normal(size=(2, B, T, 4)).astype(np.float32)
  if dense:
    arrays["dense_logits"] = rng.normal(size=(B, T, V)).astype(np.float32)
  return arrays


def test_numpy_round_trip():
  arrays = _sample(dense=True)
  back = tg.to_numpy(tg.from_numpy(arrays))
  assert set(back) == set(arrays)
  for key, value in arrays.items():
    assert back[key].dtype == value.dtype, key
    np.testing.assert_array_equal(back[key], value)


@pytest.mark.parametrize("mutate, field", [
    (lambda a: a.update(topk_logits=a["topk_logits"][:, :, :-1]), "topk_logits"),
    (lambda a: a.update(topk_ids=a["topk_ids"].astype(np.int64)), "topk_ids"),
    (lambda a: a.update(logsumexp=a["logsumexp"].astype(np.float16)), "logsumexp"),
    (lambda a: a.update(temperatures=np.asarray([1.0], np.float32)), "temperatures"),
    (lambda a: a.update({"layer_states.attn_out": a["layer_states.attn_out"][:, :2]}),
     r"layer_states\[attn_out\]"),
    (lambda a: a.update({"layer_states.mlp_out": a["layer_states.attn_out"]}), r"layer_states\[mlp_out\]"),
    (lambda a: a.update(state_layers=np.zeros((0,), np.int32)), "state_layers"),
    (lambda a: a.update(extra=np.zeros(1)), "extra"),
    (lambda a: a.pop("logsumexp"), "logsumexp"),
])
def test_validate_names_the_field(mutate, field):
  arrays = _sample()
  mutate(arrays)
  with pytest.raises(ValueError, match=field):
    tg.from_numpy(arrays)


def test_validate_expected_sizes():
  targets = tg.from_numpy(_sample())
  with pytest.raises(ValueError, match="batch_size"):
    targets.validate(batch_size=B + 1)
  with pytest.raises(ValueError, match="seq_len"):
    targets.validate(seq_len=T + 1)
  with pytest.raises(ValueError, match="n_temps"):
    targets.validate(n_temps=3)


def test_slice_and_concat_round_trip():
  targets = tg.from_numpy(_sample(dense=True))
  parts = [tg.slice_batch(targets, 0, 1), tg.slice_batch(targets, 1, B)]
  assert parts[0].batch_size == 1 and parts[0].layer_states["attn_out"].shape == (2, 1, T, 4)
  back = tg.to_numpy(tg.concat(parts))
  for key, value in tg.to_numpy(targets).items():
    np.testing.assert_array_equal(back[key], value)
  other = tg.from_numpy({**_sample(), "temperatures": np.asarray([1.0, 4.0], np.float32)})
  with pytest.raises(ValueError, match="temperatures"):
    tg.concat([parts[1], tg.slice_batch(other, 0, 1)])


def test_pytree_leaves_and_static_layers():
  targets = tg.from_numpy(_sample())
  leaves, treedef = jax.tree.flatten(targets)
  assert len(leaves) == 5  # ids, logits, lse, temperatures, one state; no dense logits
  assert any(leaf is targets.temperatures for leaf in leaves)
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert rebuilt.state_layers == (0, 2)
  doubled = jax.jit(lambda t: t.replace(logsumexp=t.logsumexp * 2))(targets)
  np.testing.assert_allclose(np.asarray(doubled.logsumexp), 2 * targets.logsumexp)
  assert doubled.state_layers == (0, 2)


def test_temperature_index():
  targets = tg.from_numpy(_sample())
  assert targets.temperature_index(2.0) == 1
  with pytest.raises(ValueError, match="temperature 3.0"):
    targets.temperature_index(3.0)


@pytest.mark.parametrize("chunk", [1, 4, 0])  # 4 does not divide T=5; 0: one block
def test_chunked_targets_from_hidden_equal_the_whole_logits_answer(chunk):
  """Per block of positions: the same top-k, values, logsumexp and draws (keyed by position) as on the
  whole (B, T, V) logits, for a static and a per-row tail exclusion; states pass through."""
  from distill_core import sampling
  rng = np.random.default_rng(3)
  e = 12
  hidden = jnp.asarray(rng.normal(size=(B, T, e)), jnp.float32)
  w = rng.normal(size=(e, V)).astype(np.float32) * 1.5
  w[:, TRUE_V:] = 5.0  # padded columns would win every top-k if they were not masked
  head = lambda h: jnp.einsum("bte,ev->btv", h, jnp.asarray(w))  # noqa: E731
  states = {"attn_out": jnp.asarray(rng.normal(size=(1, B, T, e)), jnp.float32)}
  eids = jnp.asarray(sampling.split_u64(np.arange(B) + 40))
  for exclude in (2, jnp.asarray([0, 3, 1], jnp.int32)):
    kw = dict(k=K, temperatures=TEMPS, true_vocab_size=TRUE_V, value_dtype="float32", num_samples=7,
              sample_temperature=jnp.asarray([1.0, 0.5, 2.0]), sample_seed=11, example_ids=eids,
              sample_exclude=exclude, sample_counts=jnp.asarray([7, 3, 5], jnp.int32))
    want = jax.jit(lambda h: tg.compute_targets(head(h), states=states, state_layers=(1,), **kw))(hidden)
    got = jax.jit(lambda h: tg.compute_targets_from_hidden(h, head, chunk_size=chunk, states=states,
                                                           state_layers=(1,), **kw))(hidden)
    assert got.state_layers == (1,) and got.sample_skip == want.sample_skip
    for name in ("topk_ids", "sample_ids", "sample_counts"):
      np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), err_msg=name)
    for name in ("topk_logits", "logsumexp", "sample_logits", "sample_logsumexp", "temperatures",
                 "sample_temperature"):
      np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), rtol=1e-6,
                                 atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(np.asarray(got.layer_states["attn_out"]), np.asarray(states["attn_out"]))
    got.validate(batch_size=B, seq_len=T, k=K, n_temps=len(TEMPS))


def test_chunked_targets_memory_stays_far_below_whole_logits():
  """Compiled temporaries of top-k + 2 logsumexps + draws at V=32768, T=1024 per block of 32 positions are a
  few (B, 32, V) buffers, far below one (B, T, V) float32 buffer (which the unchunked path exceeds)."""
  b, t, e, v, chunk = 1, 1024, 16, 32768, 32
  sds = jax.ShapeDtypeStruct
  whole = b * t * v * 4

  def temp_bytes(chunk_size):
    def f(hidden, w, eids):
      return tg.compute_targets_from_hidden(
          hidden, lambda h: jnp.einsum("bte,ev->btv", h, w), chunk_size=chunk_size, k=8, temperatures=(1.0, 2.0),
          true_vocab_size=v - 100, num_samples=4, sample_seed=1, example_ids=eids, sample_exclude=8)
    lowered = jax.jit(f).lower(sds((b, t, e), jnp.float32), sds((e, v), jnp.float32), sds((b, 2), jnp.uint32))
    return lowered.compile().memory_analysis().temp_size_in_bytes

  fused, unchunked = temp_bytes(chunk), temp_bytes(0)
  print(f"temporaries: chunked {fused} bytes, unchunked {unchunked} bytes, whole logits {whole} bytes")
  assert unchunked >= whole
  assert fused < 8 * b * chunk * v * 4 and fused < whole / 4, fused


def test_dense_hidden_and_head_travel_with_the_rows_and_stay_in_process():
  rng = np.random.default_rng(4)
  hidden = rng.normal(size=(B, T, 3)).astype(np.float32)
  head = tg.DenseHead(rng.normal(size=(3, V)).astype(np.float32))
  base = tg.compute_targets(jnp.asarray(_logits()), k=K, temperatures=TEMPS, true_vocab_size=TRUE_V)
  targets = base.replace(dense_hidden=hidden, dense_head=head).validate()
  assert targets.has_dense and not base.has_dense
  np.testing.assert_allclose(np.asarray(targets.dense()), np.einsum("bte,ev->btv", hidden, head.weight), rtol=1e-6,
                             atol=1e-6)
  both = tg.concat([tg.slice_batch(targets, 0, 1), tg.slice_batch(targets, 1, B)])
  np.testing.assert_array_equal(np.asarray(both.dense_hidden), hidden)
  assert both.dense_head is head
  with pytest.raises(ValueError, match="dense_hidden: given without dense_head"):
    base.replace(dense_hidden=hidden).validate()
  with pytest.raises(ValueError, match="dense_hidden: shape"):
    base.replace(dense_hidden=hidden[:, :2], dense_head=head).validate()
  with pytest.raises(ValueError, match="dense_hidden: an in-process"):
    tg.to_numpy(targets)
  with pytest.raises(ValueError, match="concat: part 1 disagrees"):
    tg.concat([tg.slice_batch(targets, 0, 1), tg.slice_batch(base, 1, B)])
