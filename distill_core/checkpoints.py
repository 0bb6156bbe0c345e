"""Loading and saving whole models: Hugging Face directories, Orbax directories, presets.

An Orbax model directory holds `model_config.json` (the `ModelConfig`) and a
`state/` checkpoint of the model's `nnx.State` written by Orbax's
StandardCheckpointer. Both the teacher server and the trainer load models
through `load_model`, so every model source behaves the same on both sides.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from distill_core.config import build
from distill_core.model.config import ModelConfig
from distill_core.model.hf import load_hf_checkpoint
from distill_core.model.layout import convert_layout
from distill_core.model.transformer import Transformer, create_model

_CONFIG_FILE = "model_config.json"


def save_model_orbax(model: Transformer, path: str | Path) -> Path:
  """Writes `model` as an Orbax model directory (config + state); returns the path."""
  path = Path(path).resolve()
  path.mkdir(parents=True, exist_ok=True)
  (path / _CONFIG_FILE).write_text(model.cfg.model_dump_json(indent=2))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "state", nnx.state(model), force=True)
  return path


def load_model_orbax(path: str | Path, **overrides) -> Transformer:
  """Restores a model written by `save_model_orbax`; `overrides` adjust the ModelConfig
  (for example `scan_layers` or `dtype`; the parameter shapes must not change)."""
  path = Path(path).resolve()
  cfg_file = path / _CONFIG_FILE
  if not cfg_file.is_file():
    raise FileNotFoundError(f"{path} is not an Orbax model directory (missing {_CONFIG_FILE})")
  data = json.loads(cfg_file.read_text())
  saved_cfg = build(ModelConfig, data, source=str(cfg_file))
  cfg = build(ModelConfig, {**data, **overrides}, source=str(cfg_file))
  # Restore in the saved layout, then convert, so layout overrides work on any checkpoint.
  abstract = abstract_model(saved_cfg)
  graphdef, abstract_state = nnx.split(abstract)
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(path / "state", abstract_state)
  model = nnx.merge(graphdef, state)
  if cfg != saved_cfg:
    model = _with_config(model, cfg)
  return model


def _with_config(model: Transformer, cfg: ModelConfig) -> Transformer:
  """The same weights under `cfg` (layer layout, dtypes, remat: nothing that changes shapes)."""
  model = convert_layout(model, cfg.scan_layers)
  graphdef, _ = nnx.split(abstract_model(cfg))
  dtype = jnp.dtype(cfg.param_dtype)
  state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, nnx.state(model))
  return nnx.merge(graphdef, state)


def load_model(model: ModelConfig | None = None, *, hf_checkpoint: str | None = None,
               orbax_checkpoint: str | None = None, seed: int = 0, **overrides) -> Transformer:
  """One entry point for every model source: HF dir, Orbax dir, or a fresh preset."""
  sources = [s for s in (hf_checkpoint, orbax_checkpoint) if s]
  if len(sources) > 1:
    raise ValueError("give at most one of hf_checkpoint and orbax_checkpoint")
  if hf_checkpoint:
    return load_hf_checkpoint(hf_checkpoint, **overrides)
  if orbax_checkpoint:
    return load_model_orbax(orbax_checkpoint, **overrides)
  if model is None:
    raise ValueError("no model source: give a model config, hf_checkpoint or orbax_checkpoint")
  if overrides:
    model = model.model_copy(update=overrides)
  return create_model(model, seed=seed)


def abstract_model(cfg: ModelConfig) -> Transformer:
  """The model's structure with `jax.ShapeDtypeStruct` leaves: nothing is allocated."""
  return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))



def arrays_fingerprint(items: Iterable[tuple[str, object]]) -> str:
  """sha256 over each (name, array)'s name, dtype, shape and little-endian bytes, in the order given.

  The teacher's weights fingerprint is this over every parameter sorted by name;
  learn-to-init records it over the teacher kernels it uses.
  """
  digest = hashlib.sha256()
  for name, value in items:
    value = np.asarray(jax.device_get(value))
    digest.update(f"{name}|{value.dtype.name}|{list(value.shape)}\n".encode())
    digest.update(np.ascontiguousarray(value).tobytes())  # little-endian hosts (x86, ARM)
  return digest.hexdigest()
