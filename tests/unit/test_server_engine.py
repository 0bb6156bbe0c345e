"""The JAX engine in-process: model sources, per-row temperatures, padding, no recompilation."""

import re

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from distill_core import checkpoints
from distill_core.config import build, resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.model.hf import save_hf_checkpoint
from distill_core.sharding import MeshConfig
from teacher_server.config import ModelSourceConfig
from teacher_server.engine import JaxEngine, load_teacher, weights_fingerprint
from teacher_server.engine_api import EngineBatch, Fetch, k_ladder

TRUE_VOCAB = 350


@pytest.fixture(scope="module")
def model():
  return checkpoints.load_model(build(ModelConfig, resolve_preset("tiny")), seed=5)


@pytest.fixture(scope="module")
def engine(model):
  cfg = build(ModelConfig, {**resolve_preset("tiny"), "true_vocab_size": TRUE_VOCAB})
  masked = checkpoints.load_model(cfg, seed=5)
  eng = JaxEngine(masked, buckets=[(8, 16)], max_k=6, max_temperatures=3, selectable_layers=[0, 1],
                  state_names=["attn_in", "attn_out"], mesh=MeshConfig(data=-1),  # 8 virtual devices, batch split
                  chunk_size=6)  # lm_head + top-k + logsumexp per block of 6 positions (not dividing 16)
  eng.warmup()
  return eng, masked


def test_model_sources_give_identical_weights(model, tmp_path):
  want = weights_fingerprint(model)
  save_hf_checkpoint(model, tmp_path / "hf")
  checkpoints.save_model_orbax(model, tmp_path / "orbax")
  with ocp.StandardCheckpointer() as ckptr:  # a bare checkpoint of nnx.state(model)
    ckptr.save(tmp_path / "bare", nnx.state(model))
  sources = [ModelSourceConfig(source="preset", preset="tiny", seed=5),
             ModelSourceConfig(source="hf", path=str(tmp_path / "hf")),
             ModelSourceConfig(source="orbax", path=str(tmp_path / "orbax")),
             ModelSourceConfig(source="orbax", path=str(tmp_path / "bare"), preset="tiny")]
  for src in sources:
    assert weights_fingerprint(load_teacher(src)) == want, src.source
  assert weights_fingerprint(load_teacher(ModelSourceConfig(source="preset", preset="tiny", seed=6))) != want
  with pytest.raises(ValueError, match="no model_config.json"):
    load_teacher(ModelSourceConfig(source="orbax", path=str(tmp_path / "bare")))


def test_per_row_temperatures_padding_and_states(engine):
  eng, model = engine
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TRUE_VOCAB, (8, 16), dtype=np.int32)
  seg = np.ones_like(tokens)
  seg[5:] = 0  # padding rows, as the batcher sends them
  seg[2, 10:] = 0  # padding columns
  pos = np.tile(np.arange(16, dtype=np.int32), (8, 1))
  temps = np.ones((8, 3), np.float32)
  temps[0] = [1.0, 2.0, 0.25]
  temps[1] = [4.0, 1.0, 1.0]
  fetch = Fetch(k=6, value_dtype="float32", layers=(1,), states=("attn_out",), state_dtype="float32")
  out = eng.forward(EngineBatch(tokens, seg, pos, temps, fetch))
  ref = nnx.jit(lambda m, *a: m(*a, state_layers=(1,), state_names=("attn_out",)))(model, tokens, pos, seg)
  z = np.asarray(ref.logits, np.float64)[..., :TRUE_VOCAB]
  z -= z.max(-1, keepdims=True)
  for b in range(5):
    for t in range(16):
      if seg[b, t] == 0:
        continue
      order = np.argsort(-z[b, t], kind="stable")[:6]
      np.testing.assert_array_equal(out.topk_ids[b, t], order)
      np.testing.assert_allclose(out.topk_logits[b, t], z[b, t, order], atol=1e-5)
      lse = [np.log(np.exp(z[b, t] / temp).sum()) for temp in temps[b]]
      np.testing.assert_allclose(out.logsumexp[b, t], lse, atol=1e-5)
  real = seg[:5] != 0
  np.testing.assert_allclose(out.states["attn_out"][1][:5][real], np.asarray(ref.states["attn_out"])[0, :5][real],
                             atol=1e-5)
  assert out.topk_ids.max() < TRUE_VOCAB


FETCHES = [Fetch(k=k, value_dtype=vd, **states) for k in (1, 3, 4, 6) for vd in ("float16", "bfloat16", "float32")
           for states in ({}, dict(layers=(1,), states=("attn_out",), state_dtype="bfloat16"),
                          dict(layers=(0, 1), states=("attn_in", "attn_out"), state_dtype="float32"))]


def test_no_recompilation_after_warmup(engine):
  eng, _ = engine
  assert eng.compilations() == 3  # one bucket: no states, bf16 states, f32 states
  rng = np.random.default_rng(1)
  for fetch in FETCHES:
    temps = rng.uniform(0.5, 2, (8, 3)).astype(np.float32)
    tokens = rng.integers(0, TRUE_VOCAB, (8, 16), dtype=np.int32)
    eng.forward(EngineBatch(tokens, np.ones_like(tokens), np.tile(np.arange(16, dtype=np.int32), (8, 1)),
                            temps, fetch))
  assert eng.compilations() == 3
  with pytest.raises(ValueError, match="not one of the buckets"):
    eng.forward(EngineBatch(tokens[:4], tokens[:4], tokens[:4], temps[:4], Fetch(k=1)))
  with pytest.raises(ValueError, match="not offered"):
    eng.forward(EngineBatch(tokens, tokens, tokens, temps, Fetch(k=1, layers=(2,), states=("attn_out",),
                                                                   state_dtype="float32")))


def test_only_the_fetched_outputs_leave_the_device(engine, monkeypatch):
  """Every device -> host copy is counted; a batch copies the asked k, dtype, layers and states only."""
  eng, model = engine
  copied = []
  real_get = jax.device_get

  def counting_get(tree):
    host = real_get(tree)
    copied.append(sum(np.asarray(x).nbytes for x in jax.tree.leaves(host)))
    return host

  monkeypatch.setattr(jax, "device_get", counting_get)
  rng = np.random.default_rng(2)
  tokens = rng.integers(0, TRUE_VOCAB, (8, 16), dtype=np.int32)
  pos = np.tile(np.arange(16, dtype=np.int32), (8, 1))
  temps = np.ones((8, 3), np.float32)
  ref = nnx.jit(lambda m, *a: m(*a, state_layers=(0, 1), state_names=("attn_in", "attn_out")))(
      model, tokens, pos, np.ones_like(tokens))
  full = eng.forward(EngineBatch(tokens, np.ones_like(tokens), pos, temps,
                                 Fetch(k=6, value_dtype="float32", layers=(0, 1), states=("attn_in", "attn_out"),
                                       state_dtype="float32")))
  bt, e = 8 * 16, model.cfg.hidden_size
  for fetch in FETCHES:
    copied.clear()
    out = eng.forward(EngineBatch(tokens, np.ones_like(tokens), pos, temps, fetch))
    k = next(entry for entry in k_ladder(6) if entry >= fetch.k)
    want = bt * k * (4 + fetch.value_dtype.itemsize) + bt * 3 * 4
    if fetch.with_states:
      want += len(fetch.layers) * len(fetch.states) * bt * e * fetch.state_dtype.itemsize
    assert copied == [want] == [out.nbytes] == [eng.last_host_bytes], fetch
    assert out.topk_ids.shape == (8, 16, k) and out.topk_logits.dtype == fetch.value_dtype
    np.testing.assert_array_equal(out.topk_ids, full.topk_ids[..., :k])
    np.testing.assert_array_equal(out.topk_logits, full.topk_logits[..., :k].astype(fetch.value_dtype))
    assert sorted(out.states) == sorted(fetch.states)
    for name in fetch.states:
      assert sorted(out.states[name]) == list(fetch.layers)
      for layer in fetch.layers:
        got = out.states[name][layer]
        assert got.dtype == fetch.state_dtype and got.shape == (8, 16, e)
        np.testing.assert_allclose(got.astype(np.float32), np.asarray(ref.states[name])[layer],
                                   rtol=1e-2, atol=1e-2)


def test_parameters_and_bad_settings(engine, model):
  eng, masked = engine
  params = dict(eng.parameters(re.compile(r"^layers\.1\.self_attn\.o_proj")))
  assert list(params) == ["layers.1.self_attn.o_proj.kernel"]
  np.testing.assert_array_equal(params["layers.1.self_attn.o_proj.kernel"],
                                np.asarray(masked.layers[1].self_attn.o_proj.kernel[...]))
  kwargs = dict(max_k=4, max_temperatures=1, selectable_layers="all", state_names=["attn_out"])
  with pytest.raises(ValueError, match="divide by the mesh size 8"):
    JaxEngine(model, buckets=[(4, 16)], **kwargs)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    JaxEngine(model, buckets=[(8, 512)], **kwargs)
  with pytest.raises(ValueError, match="selectable_layers"):
    JaxEngine(model, buckets=[(8, 16)], **{**kwargs, "selectable_layers": [2]})
  with pytest.raises(ValueError, match="logits_chunk_size: -1"):
    JaxEngine(model, buckets=[(8, 16)], **kwargs, chunk_size=-1)
