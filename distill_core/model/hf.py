"""Hugging Face checkpoints: `config.json` + safetensors (single file or sharded with an index).

Import is a rename table plus a reshape: Hugging Face stores linear weights as
(out, in), we store (in, out) and split heads:

    q_proj.weight (H*D, E)   <-> q_proj.kernel (E, H, D)     (k/v: K heads)
    q_proj.bias   (H*D,)     <-> q_proj.bias   (H, D)
    o_proj.weight (E, H*D)   <-> o_proj.kernel (H, D, E)
    *_proj.weight (out, in)  <-> *_proj.kernel (in, out)     (MLP, lm_head)
    *.weight      (E,)       <-> *.scale / embedding         (norms, embeddings, as is)

Tensors are read one at a time with `safe_open`, so a large checkpoint is never
held twice in host memory; bf16 tensors arrive as `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from distill_core.model.config import ModelConfig, RopeScaling
from distill_core.model.transformer import Transformer

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_MODE = 0o644  # exported weights: readable by the (non-root) user a serving container runs as
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers that some old exports include


# ----------------------------------------------------------------------------- config.json


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
  """A `ModelConfig` from a Hugging Face `config.json` mapping (model_type llama or qwen2)."""
  model_type = hf.get("model_type")
  if model_type not in _ARCHITECTURES:
    raise ValueError(f"config.json: model_type {model_type!r} is not supported (use llama or qwen2)")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (only silu)")
  if hf.get("mlp_bias"):
    raise ValueError("config.json: mlp_bias=true is not supported")
  if model_type == "qwen2" and hf.get("use_sliding_window"):
    raise ValueError("config.json: use_sliding_window=true is not supported")
  rope = dict(hf.get("rope_parameters") or {})  # newer transformers nest rope settings here
  theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
  scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
  heads = hf["num_attention_heads"]
  dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"config.json: torch_dtype {dtype!r} is not supported")
  dtype = "bfloat16" if dtype == "bfloat16" else "float32"  # float16 weights load exactly as float32
  return ModelConfig(
      model_type=model_type,
      vocab_size=hf["vocab_size"],
      true_vocab_size=hf.get("true_vocab_size"),
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_hidden_layers=hf["num_hidden_layers"],
      num_attention_heads=heads,
      num_key_value_heads=hf.get("num_key_value_heads") or heads,
      head_dim=hf.get("head_dim"),  # kept as given, so config -> HF -> config is exact
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6 if model_type == "qwen2" else 1e-5),
      rope_theta=theta,
      rope_scaling=_rope_scaling_from_hf(scaling),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      dtype=dtype,
      param_dtype=dtype,
  )


def _rope_scaling_from_hf(scaling: dict[str, Any] | None) -> RopeScaling | None:
  if not scaling:
    return None
  kind = scaling.get("rope_type", scaling.get("type"))
  if kind == "default":
    return None
  if kind != "llama3":
    raise ValueError(f"config.json: rope_scaling type {kind!r} is not supported (only llama3)")
  keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
  missing = [k for k in keys if k not in scaling]
  if missing:
    raise ValueError(f"config.json: rope_scaling is missing {missing}")
  return RopeScaling(rope_type="llama3", **{k: scaling[k] for k in keys})


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The Hugging Face `config.json` mapping for `cfg` (`torch_dtype` = its param_dtype)."""
  if cfg.model_type == "qwen2" and not cfg.attention_bias:
    raise ValueError("qwen2 checkpoints always have q/k/v biases; set attention_bias=true or use llama")
  out: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[cfg.model_type]],
      "model_type": cfg.model_type,
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_hidden_layers,
      "num_attention_heads": cfg.num_attention_heads,
      "num_key_value_heads": cfg.num_key_value_heads,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": cfg.rope_scaling.model_dump() if cfg.rope_scaling else None,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "torch_dtype": cfg.param_dtype,
      "initializer_range": 0.02,
      "attention_dropout": 0.0,
      "use_cache": True,
  }
  if cfg.model_type == "llama":
    out.update(attention_bias=cfg.attention_bias, mlp_bias=False, pretraining_tp=1)
  else:
    out.update(use_sliding_window=False)
  if cfg.head_dim is not None:  # absent = hidden_size // num_attention_heads, as in transformers
    out["head_dim"] = cfg.head_dim
  if cfg.true_vocab_size is not None:
    out["true_vocab_size"] = cfg.true_vocab_size
  return out


# ----------------------------------------------------------------------------- name table


def _layer_table(cfg: ModelConfig) -> list[tuple[str, str, str]]:
  """(our path inside a layer, Hugging Face suffix, conversion kind) for one decoder layer."""
  table = []
  for p in ("q_proj", "k_proj", "v_proj"):
    table.append((f"self_attn.{p}.kernel", f"self_attn.{p}.weight", "heads_kernel"))
    if cfg.attention_bias:
      table.append((f"self_attn.{p}.bias", f"self_attn.{p}.bias", "heads_bias"))
  table.append(("self_attn.o_proj.kernel", "self_attn.o_proj.weight", "out_kernel"))
  if cfg.attention_bias and cfg.model_type == "llama":
    table.append(("self_attn.o_proj.bias", "self_attn.o_proj.bias", "copy"))
  for p in ("gate_proj", "up_proj", "down_proj"):
    table.append((f"mlp.{p}.kernel", f"mlp.{p}.weight", "linear"))
  table.append(("input_layernorm.scale", "input_layernorm.weight", "copy"))
  table.append(("post_attention_layernorm.scale", "post_attention_layernorm.weight", "copy"))
  return table


def name_table(cfg: ModelConfig) -> list[tuple[str, str, str]]:
  """(unrolled parameter path, Hugging Face tensor name, kind), in Hugging Face file order."""
  table = [("embed_tokens.embedding", "model.embed_tokens.weight", "copy")]
  for i in range(cfg.num_hidden_layers):
    table += [(f"layers.{i}.{ours}", f"model.layers.{i}.{hf}", kind) for ours, hf, kind in _layer_table(cfg)]
  table.append(("norm.scale", "model.norm.weight", "copy"))
  if not cfg.tie_word_embeddings:
    table.append(("lm_head.kernel", "lm_head.weight", "linear"))
  return table


def to_hf_layout(kind: str, x: np.ndarray) -> np.ndarray:
  """Our array -> the Hugging Face tensor."""
  if kind == "heads_kernel":  # (E, H, D) -> (H*D, E)
    return x.reshape(x.shape[0], -1).T
  if kind == "heads_bias":  # (H, D) -> (H*D,)
    return x.reshape(-1)
  if kind == "out_kernel":  # (H, D, E) -> (E, H*D)
    return x.reshape(-1, x.shape[-1]).T
  if kind == "linear":  # (in, out) -> (out, in)
    return x.T
  return x


def from_hf_layout(kind: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """The Hugging Face tensor -> our array of `shape`; raises if the sizes do not fit."""
  expected = to_hf_layout(kind, np.empty(shape, np.int8)).shape
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f"shape {tuple(x.shape)}, expected {tuple(expected)}")
  if kind == "heads_kernel":
    return x.T.reshape(shape)
  if kind in ("out_kernel", "linear"):
    return x.T.reshape(shape)
  return x.reshape(shape)


# ----------------------------------------------------------------------------- loading


class _Reader:
  """Lazy tensor access over one safetensors file or an indexed set of shards."""

  def __init__(self, root: Path, stack: ExitStack):
    self._stack, self._open = stack, {}
    if (root / INDEX_FILE).is_file():
      index = json.loads((root / INDEX_FILE).read_text())
      if "weight_map" not in index:
        raise ValueError(f"{root / INDEX_FILE}: no 'weight_map'")
      self.files = {name: root / f for name, f in index["weight_map"].items()}
    elif (root / SINGLE_FILE).is_file():
      handle = self._handle(root / SINGLE_FILE)
      self.files = {name: root / SINGLE_FILE for name in handle.keys()}
    else:
      raise FileNotFoundError(f"{root}: neither {INDEX_FILE} nor {SINGLE_FILE} found")

  def _handle(self, file: Path):
    if file not in self._open:
      if not file.is_file():
        raise FileNotFoundError(f"checkpoint shard {file} (named in the index) does not exist")
      self._open[file] = self._stack.enter_context(safe_open(str(file), framework="numpy"))
    return self._open[file]

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise KeyError(name)
    return self._handle(self.files[name]).get_tensor(name)


def load_hf_checkpoint(path: str | os.PathLike, *, scan_layers: bool = False, dtype: str | None = None,
                       param_dtype: str | None = None, **overrides: Any) -> Transformer:
  """Loads a Hugging Face Llama/Qwen2 checkpoint directory into a `Transformer`.

  Args:
    path: directory with config.json and model.safetensors (or sharded files + index).
    scan_layers: layer layout of the returned model.
    dtype, param_dtype: compute / storage dtype; default the checkpoint's torch_dtype.
    **overrides: other `ModelConfig` fields (e.g. remat=True, true_vocab_size=...).
  """
  root = Path(path)
  if not (root / CONFIG_FILE).is_file():
    raise FileNotFoundError(f"{root}: no {CONFIG_FILE}")
  cfg = config_from_hf(json.loads((root / CONFIG_FILE).read_text()))
  updates = dict(overrides, scan_layers=scan_layers)
  updates.update({k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None})
  cfg = ModelConfig.model_validate({**cfg.model_dump(), **updates})
  target = jnp.dtype(cfg.param_dtype)

  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  variables = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
  with ExitStack() as stack:
    reader = _Reader(root, stack)
    used = set()

    def read(ours: str, hf_name: str, kind: str, shape: tuple[int, ...]) -> np.ndarray:
      try:
        x = reader.get(hf_name)
      except KeyError:
        raise ValueError(f"{root}: tensor {hf_name} is missing (needed for {ours})") from None
      used.add(hf_name)
      try:
        return from_hf_layout(kind, x, shape).astype(target)
      except ValueError as e:
        raise ValueError(f"{root}: tensor {hf_name}: {e}") from None

    if cfg.scan_layers:
      for ours, hf, kind in _layer_table(cfg):
        var = variables.pop(f"layers.{ours}")
        stacked = np.empty(var.shape, target)
        for i in range(cfg.num_hidden_layers):
          stacked[i] = read(f"layers.{i}.{ours}", f"model.layers.{i}.{hf}", kind, var.shape[1:])
        var.set_value(jnp.asarray(stacked))
    for ours, hf, kind in name_table(cfg):
      if ours in variables:
        var = variables.pop(ours)
        var.set_value(jnp.asarray(read(ours, hf, kind, var.shape)))
    if variables:
      raise ValueError(f"model parameters without a checkpoint tensor: {sorted(variables)}")
    ignored = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    extra = sorted(n for n in reader.files if n not in used and n not in ignored
                   and not n.endswith(_IGNORED_SUFFIXES))
    if extra:
      raise ValueError(f"{root}: unexpected tensors for a {cfg.model_type} model: {extra[:8]}"
                       + (f" and {len(extra) - 8} more" if len(extra) > 8 else ""))
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- saving


def _hf_tensors(model: Transformer, fetch: Callable[[Any], np.ndarray] = np.asarray
                ) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, tensor), fetching one parameter at a time to the host with `fetch`.

  Unrolled models follow Hugging Face file order; scanned models go parameter by
  parameter (each stacked array is fetched once), which loaders do not mind.
  """
  cfg = model.cfg
  params = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  table = name_table(cfg)
  if not cfg.scan_layers:
    for ours, hf, kind in table:
      yield hf, np.ascontiguousarray(to_hf_layout(kind, fetch(params[ours][...])))
    return
  outer = [row for row in table if not row[0].startswith("layers.")]  # embedding first, then the rest
  for ours, hf, kind in outer[:1]:
    yield hf, np.ascontiguousarray(to_hf_layout(kind, fetch(params[ours][...])))
  for ours, hf, kind in _layer_table(cfg):
    stacked = fetch(params[f"layers.{ours}"][...])  # (L, ...)
    for i in range(cfg.num_hidden_layers):
      yield f"model.layers.{i}.{hf}", np.ascontiguousarray(to_hf_layout(kind, stacked[i]))
  for ours, hf, kind in outer[1:]:
    yield hf, np.ascontiguousarray(to_hf_layout(kind, fetch(params[ours][...])))


def save_hf_checkpoint(model: Transformer, path: str | os.PathLike, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                       fetch: Callable[[Any], np.ndarray] = np.asarray, write: bool = True) -> None:
  """Writes config.json and the weights (in param_dtype) as safetensors.

  One `model.safetensors` when everything fits in `max_shard_bytes`, else
  `model-0000i-of-0000N.safetensors` shards plus `model.safetensors.index.json`.
  An existing checkpoint in `path` is replaced only with `overwrite=True`.

  `fetch` brings one parameter to the host (a collective gather when parameters
  are sharded over several processes: every process then calls this, and only
  the one with `write=True` touches the files).
  """
  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
  if not write:
    for _ in _hf_tensors(model, fetch):  # take part in every gather, in the same order
      pass
    return
  root = Path(path)
  root.mkdir(parents=True, exist_ok=True)
  old = [p for p in root.iterdir() if p.name in (SINGLE_FILE, INDEX_FILE, CONFIG_FILE)
         or (p.name.startswith("model-") and p.name.endswith(".safetensors"))]
  if old and not overwrite:
    raise FileExistsError(f"{root} already holds a checkpoint ({old[0].name}); pass overwrite=True")
  for p in old:
    p.unlink()

  shards: list[list[str]] = [[]]
  current: dict[str, np.ndarray] = {}
  size = total = 0
  temp_names = []

  def flush():
    name = f".tmp-shard-{len(temp_names):05d}.safetensors"
    save_file(current, str(root / name), metadata={"format": "pt"})
    os.chmod(root / name, WEIGHTS_MODE)  # safetensors writes 0600: a non-root server must read it
    temp_names.append(name)

  for name, tensor in _hf_tensors(model, fetch):
    if current and size + tensor.nbytes > max_shard_bytes:
      flush()
      current, size = {}, 0
      shards.append([])
    current[name] = tensor
    shards[-1].append(name)
    size += tensor.nbytes
    total += tensor.nbytes
  flush()

  if len(temp_names) == 1:
    os.replace(root / temp_names[0], root / SINGLE_FILE)
  else:
    n = len(temp_names)
    weight_map = {}
    for i, (temp, names) in enumerate(zip(temp_names, shards), start=1):
      final = f"model-{i:05d}-of-{n:05d}.safetensors"
      os.replace(root / temp, root / final)
      weight_map.update({name: final for name in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  (root / CONFIG_FILE).write_text(json.dumps(config_to_hf(model.cfg), indent=2) + "\n")


def read_hf_parameters(path: str | os.PathLike, names: list[str]) -> dict[str, np.ndarray]:
  """Only the named parameters (unrolled paths such as `layers.0.self_attn.q_proj.kernel`) of a
  Hugging Face checkpoint, in our layout and the checkpoint's dtype; nothing else is read."""
  root = Path(path)
  cfg = config_from_hf(json.loads((root / CONFIG_FILE).read_text()))
  table = {ours: (hf, kind) for ours, hf, kind in name_table(cfg)}
  unknown = [n for n in names if n not in table]
  if unknown:
    raise KeyError(f"{root}: no parameters {unknown[:8]} in a {cfg.model_type} checkpoint")
  shapes = hf_parameter_shapes(cfg)
  out = {}
  with ExitStack() as stack:
    reader = _Reader(root, stack)
    for name in names:
      hf, kind = table[name]
      try:
        out[name] = from_hf_layout(kind, reader.get(hf), shapes[name])
      except KeyError:
        raise ValueError(f"{root}: tensor {hf} is missing (needed for {name})") from None
  return out


def hf_parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Unrolled parameter path -> shape, for every tensor of `name_table(cfg)` (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg.model_copy(update={"scan_layers": False}), rngs=nnx.Rngs(0)))
  return {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
