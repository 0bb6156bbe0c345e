"""Hugging Face checkpoints: config mapping, exact round trips, and logits against a NumPy reference."""

import json
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from distill_core.config import resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.model.hf import config_from_hf, config_to_hf, load_hf_checkpoint, save_hf_checkpoint
from distill_core.model.transformer import Transformer

LLAMA = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 32,
    "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
    "max_position_embeddings": 256, "tie_word_embeddings": False, "attention_bias": False,
    "torch_dtype": "float32",
}
QWEN2 = {
    "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": 100, "hidden_size": 32,
    "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 128,
    "tie_word_embeddings": True, "use_sliding_window": False, "torch_dtype": "float32",
}
LLAMA_BIAS_TIED = {**LLAMA, "attention_bias": True, "tie_word_embeddings": True, "rope_scaling": None}
CASES = {"llama": LLAMA, "qwen2": QWEN2, "llama_bias_tied": LLAMA_BIAS_TIED}


def random_hf_weights(hf: dict, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
  """HF-named tensors of a random model, built without any project code."""
  rng = np.random.RandomState(seed)
  e, f, v = hf["hidden_size"], hf["intermediate_size"], hf["vocab_size"]
  h, k = hf["num_attention_heads"], hf["num_key_value_heads"]
  d = hf.get("head_dim") or e // h
  qkv_bias = hf["model_type"] == "qwen2" or hf.get("attention_bias", False)
  o_bias = hf["model_type"] == "llama" and hf.get("attention_bias", False)

  def normal(*shape, scale=0.2):
    return (scale * rng.normal(size=shape)).astype(dtype)

  w = {"model.embed_tokens.weight": normal(v, e, scale=1.0)}
  for i in range(hf["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w[p + "self_attn.q_proj.weight"] = normal(h * d, e)
    w[p + "self_attn.k_proj.weight"] = normal(k * d, e)
    w[p + "self_attn.v_proj.weight"] = normal(k * d, e)
    w[p + "self_attn.o_proj.weight"] = normal(e, h * d)
    if qkv_bias:
      w[p + "self_attn.q_proj.bias"] = normal(h * d)
      w[p + "self_attn.k_proj.bias"] = normal(k * d)
      w[p + "self_attn.v_proj.bias"] = normal(k * d)
    if o_bias:
      w[p + "self_attn.o_proj.bias"] = normal(e)
    w[p + "mlp.gate_proj.weight"] = normal(f, e)
    w[p + "mlp.up_proj.weight"] = normal(f, e)
    w[p + "mlp.down_proj.weight"] = normal(e, f)
    w[p + "input_layernorm.weight"] = (1 + normal(e, scale=0.3)).astype(dtype)
    w[p + "post_attention_layernorm.weight"] = (1 + normal(e, scale=0.3)).astype(dtype)
  w["model.norm.weight"] = (1 + normal(e, scale=0.3)).astype(dtype)
  if not hf["tie_word_embeddings"]:
    w["lm_head.weight"] = normal(v, e)
  return w


# ----------------------------------------------------------------------------- NumPy reference


def reference_inv_freq(d: int, theta: float, scaling: dict | None) -> np.ndarray:
  """Element by element, the piecewise rule of HF `_compute_llama3_parameters`."""
  out = []
  for i in range(d // 2):
    freq = 1.0 / theta ** (2 * i / d)
    if scaling:
      wavelen = 2 * math.pi / freq
      old = scaling["original_max_position_embeddings"]
      lo, hi, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
      if wavelen > old / lo:
        freq = freq / factor
      elif wavelen >= old / hi:
        smooth = (old / wavelen - lo) / (hi - lo)
        freq = (1 - smooth) * freq / factor + smooth * freq
    out.append(freq)
  return np.array(out)


def reference_logits(w: dict, hf: dict, tokens, positions, segments) -> np.ndarray:
  """Float64 forward of a Llama/Qwen2 model straight from HF-named tensors."""
  w = {name: np.asarray(t, np.float64) for name, t in w.items()}
  e, h, k = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"]
  d = hf.get("head_dim") or e // h
  eps = hf["rms_norm_eps"]
  inv = reference_inv_freq(d, hf["rope_theta"], hf.get("rope_scaling"))
  b, t = tokens.shape

  def rms(x, weight):
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)

  def rotate(x):  # x (B, T, heads, D): pairs (j, j + D/2) rotate by position * inv[j]
    out = np.empty_like(x)
    angle = positions[:, :, None, None] * inv  # (B, T, 1, D/2)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    out[..., : d // 2] = x1 * np.cos(angle) - x2 * np.sin(angle)
    out[..., d // 2:] = x2 * np.cos(angle) + x1 * np.sin(angle)
    return out

  def proj(x, name):
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y

  x = w["model.embed_tokens.weight"][tokens]
  for layer in range(hf["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    a = rms(x, w[p + "input_layernorm.weight"])
    q = rotate(proj(a, p + "self_attn.q_proj").reshape(b, t, h, d))
    kk = rotate(proj(a, p + "self_attn.k_proj").reshape(b, t, k, d))
    v = proj(a, p + "self_attn.v_proj").reshape(b, t, k, d)
    att = np.zeros((b, t, h, d))
    for bi in range(b):
      for head in range(h):
        kv = head // (h // k)
        for ti in range(t):
          keys = [s for s in range(ti + 1) if segments[bi, s] == segments[bi, ti] != 0]
          if not keys:
            continue
          scores = np.array([q[bi, ti, head] @ kk[bi, s, kv] for s in keys]) / math.sqrt(d)
          probs = np.exp(scores - scores.max())
          probs /= probs.sum()
          att[bi, ti, head] = sum(pr * v[bi, s, kv] for pr, s in zip(probs, keys))
    x = x + proj(att.reshape(b, t, h * d), p + "self_attn.o_proj")
    m = rms(x, w[p + "post_attention_layernorm.weight"])
    gate = m @ w[p + "mlp.gate_proj.weight"].T
    x = x + ((gate / (1 + np.exp(-gate))) * (m @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
  x = rms(x, w["model.norm.weight"])
  head_w = w["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else w["lm_head.weight"]
  return x @ head_w.T


# ----------------------------------------------------------------------------- helpers


def packed(vocab: int):
  rng = np.random.RandomState(7)
  tokens = rng.randint(0, vocab, (2, 12)).astype(np.int32)
  segments = np.array([[1] * 7 + [2] * 3 + [0] * 2, [3] * 12], np.int32)
  positions = np.array([list(range(7)) + list(range(3)) + [0, 0], list(range(20, 32))], np.int32)
  return tokens, positions, segments


def write_checkpoint(path, hf: dict, weights: dict, shards: int = 1):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(hf))
  names = list(weights)
  if shards == 1:
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for i, chunk in enumerate(np.array_split(np.arange(len(names)), shards), start=1):
    file = f"model-{i:05d}-of-{shards:05d}.safetensors"
    save_file({names[j]: weights[names[j]] for j in chunk}, str(path / file), metadata={"format": "pt"})
    weight_map.update({names[j]: file for j in chunk})
  (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def read_all(path) -> dict[str, np.ndarray]:
  files = sorted(path.glob("*.safetensors"))
  out = {}
  for file in files:
    with safe_open(str(file), framework="numpy") as f:
      out.update({name: f.get_tensor(name) for name in f.keys()})
  return out


@nnx.jit
def forward(model, tokens, positions, segments):
  return model(tokens, positions, segments).logits


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case,shards,scan", [("llama", 1, False), ("qwen2", 3, True), ("llama_bias_tied", 2, False)])
def test_logits_match_numpy_reference(tmp_path, case, shards, scan):
  hf = CASES[case]
  weights = random_hf_weights(hf)
  write_checkpoint(tmp_path / "ckpt", hf, weights, shards)
  model = load_hf_checkpoint(tmp_path / "ckpt", scan_layers=scan)
  assert model.cfg.scan_layers is scan and model.cfg.model_type == hf["model_type"]
  tokens, positions, segments = packed(hf["vocab_size"])
  got = np.asarray(forward(model, tokens, positions, segments))
  want = reference_logits(weights, hf, tokens, positions, segments)
  real = segments != 0
  np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
  assert np.isfinite(got).all()


def test_llama3_scaling_hits_every_frequency_band():
  """The reference case must exercise the kept, blended and divided frequencies."""
  s = LLAMA["rope_scaling"]
  wavelens = 2 * math.pi * LLAMA["rope_theta"] ** (np.arange(0, 16, 2) / 16)
  old = s["original_max_position_embeddings"]
  assert (wavelens < old / s["high_freq_factor"]).any()
  assert (wavelens > old / s["low_freq_factor"]).any()
  assert ((wavelens >= old / s["high_freq_factor"]) & (wavelens <= old / s["low_freq_factor"])).any()


def randomised(cfg: ModelConfig, seed: int):
  """A project model with every parameter random (biases and norms included), no JAX init."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.RandomState(seed)
  state = nnx.state(model, nnx.Param)
  for _, var in nnx.to_flat_state(state):
    var.set_value(jnp.asarray(0.3 * rng.normal(size=var.shape), var.dtype))
  nnx.update(model, state)
  return model


@pytest.mark.parametrize("case", ["llama", "qwen2"])
def test_save_load_save_is_exact(tmp_path, case):
  cfg = config_from_hf(CASES[case])
  if case == "qwen2":
    cfg = cfg.model_copy(update={"true_vocab_size": 90})
  model = randomised(cfg, seed=1)
  tokens, positions, segments = packed(cfg.vocab_size)
  logits = np.asarray(forward(model, tokens, positions, segments))

  save_hf_checkpoint(model, tmp_path / "one")
  save_hf_checkpoint(model, tmp_path / "many", max_shard_bytes=20_000)
  assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "model.safetensors"]
  shard_files = sorted((tmp_path / "many").glob("model-*-of-*.safetensors"))
  assert len(shard_files) > 2
  index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == {p.name for p in shard_files}
  original = read_all(tmp_path / "one")
  assert read_all(tmp_path / "many").keys() == original.keys()
  assert ("lm_head.weight" in original) == (not cfg.tie_word_embeddings)
  assert index["metadata"]["total_size"] == sum(t.nbytes for t in original.values())
  # HF layout: q_proj.weight is (H*D, E), o_proj.weight is (E, H*D).
  hd = cfg.num_attention_heads * cfg.dim_per_head
  assert original["model.layers.0.self_attn.q_proj.weight"].shape == (hd, cfg.hidden_size)
  assert original["model.layers.1.self_attn.o_proj.weight"].shape == (cfg.hidden_size, hd)
  np.testing.assert_array_equal(original["model.layers.1.self_attn.q_proj.weight"],
                                np.asarray(model.layers[1].self_attn.q_proj.kernel[...]).reshape(32, -1).T)

  for source in ("one", "many"):
    for scan in (False, True):
      loaded = load_hf_checkpoint(tmp_path / source, scan_layers=scan)
      assert loaded.cfg.true_vocab_size == cfg.true_vocab_size
      again = tmp_path / f"again-{source}-{scan}"
      save_hf_checkpoint(loaded, again, max_shard_bytes=30_000 if scan else 10**9)
      tensors = read_all(again)
      assert tensors.keys() == original.keys()
      for name, t in original.items():
        assert tensors[name].dtype == t.dtype
        np.testing.assert_array_equal(tensors[name], t, err_msg=name)
      assert json.loads((again / "config.json").read_text()) == json.loads((tmp_path / "one" / "config.json").read_text())
      if not scan:
        np.testing.assert_array_equal(np.asarray(forward(loaded, tokens, positions, segments)), logits)


def test_bfloat16_checkpoints_load_exactly(tmp_path):
  hf = {**QWEN2, "torch_dtype": "bfloat16"}
  weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hf_weights(hf, seed=3).items()}
  write_checkpoint(tmp_path / "bf16", hf, weights)
  model = load_hf_checkpoint(tmp_path / "bf16")
  assert model.cfg.param_dtype == "bfloat16" and model.cfg.dtype == "bfloat16"
  emb = np.asarray(model.embed_tokens.embedding[...])
  assert emb.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(emb, weights["model.embed_tokens.weight"])
  wide = load_hf_checkpoint(tmp_path / "bf16", dtype="float32", param_dtype="float32")
  k = np.asarray(wide.layers[0].self_attn.k_proj.kernel[...])
  assert k.dtype == np.float32
  np.testing.assert_array_equal(k.reshape(32, -1).T, weights["model.layers.0.self_attn.k_proj.weight"].astype(np.float32))
  save_hf_checkpoint(model, tmp_path / "back")
  back = read_all(tmp_path / "back")
  assert back.keys() == weights.keys()
  for name, t in weights.items():
    assert back[name].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back[name], t)


def test_config_mapping_round_trips_presets():
  for name in ("llama3_8b", "llama3_2_1b", "qwen2_5_0_5b", "tiny"):
    cfg = ModelConfig(**resolve_preset(name)).model_copy(update={"scan_layers": False})
    hf = config_to_hf(cfg)
    assert json.loads(json.dumps(hf)) == hf
    assert config_from_hf(hf) == cfg, name
  llama = config_to_hf(ModelConfig(**resolve_preset("llama3_2_1b")))
  assert llama["architectures"] == ["LlamaForCausalLM"] and llama["torch_dtype"] == "bfloat16"
  assert llama["rope_scaling"]["rope_type"] == "llama3" and llama["rope_scaling"]["factor"] == 32.0
  assert llama["tie_word_embeddings"] is True and llama["head_dim"] == 64
  qwen = config_to_hf(ModelConfig(**resolve_preset("qwen2_5_0_5b")))
  assert qwen["architectures"] == ["Qwen2ForCausalLM"] and qwen["true_vocab_size"] == 151665


def test_config_from_hf_variants_and_rejections():
  nested = {**LLAMA, "rope_scaling": None, "rope_theta": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1234.0}}
  cfg = config_from_hf(nested)
  assert cfg.rope_theta == 1234.0 and cfg.rope_scaling is None
  assert config_from_hf({**LLAMA, "rope_scaling": {"type": "default"}}).rope_scaling is None
  assert config_from_hf(QWEN2).attention_bias is True and config_from_hf(QWEN2).head_dim is None
  assert config_from_hf(LLAMA).head_dim == 16 and "head_dim" not in config_to_hf(config_from_hf(QWEN2))
  assert config_from_hf({**LLAMA, "torch_dtype": "float16"}).param_dtype == "float32"
  for bad, match in [({**LLAMA, "model_type": "gpt2"}, "model_type"),
                     ({**LLAMA, "hidden_act": "gelu"}, "hidden_act"),
                     ({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
                     ({**QWEN2, "use_sliding_window": True}, "sliding"),
                     ({**LLAMA, "mlp_bias": True}, "mlp_bias")]:
    with pytest.raises(ValueError, match=match):
      config_from_hf(bad)


def test_bad_checkpoints_name_the_problem(tmp_path):
  weights = random_hf_weights(LLAMA)
  missing = {k: v for k, v in weights.items() if k != "model.layers.1.mlp.up_proj.weight"}
  write_checkpoint(tmp_path / "missing", LLAMA, missing)
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight is missing"):
    load_hf_checkpoint(tmp_path / "missing")
  wrong = dict(weights, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 32), np.float32)})
  write_checkpoint(tmp_path / "wrong", LLAMA, wrong)
  with pytest.raises(ValueError, match=r"k_proj\.weight: shape \(16, 32\), expected \(32, 32\)"):
    load_hf_checkpoint(tmp_path / "wrong")
  extra = dict(weights, **{"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)})
  write_checkpoint(tmp_path / "extra", LLAMA, extra)
  with pytest.raises(ValueError, match="unexpected tensors.*q_norm"):
    load_hf_checkpoint(tmp_path / "extra")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_hf_checkpoint(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text(json.dumps(LLAMA))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_hf_checkpoint(tmp_path / "empty")
  with pytest.raises(FileExistsError, match="overwrite"):
    save_hf_checkpoint(randomised(config_from_hf(LLAMA), seed=0), tmp_path / "wrong")
