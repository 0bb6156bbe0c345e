"""The model of a `benchmarks.bench_scale` case: its config from a preset, its parameters and analytic FLOPs.

`benchmarks.bench_scale` compiles the case's programs for TPU slices and
`benchmarks.scale_device` measures them on a local accelerator; both count the
model's FLOPs per token here, so the compiled and measured figures share one
reference.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from distill_core import checkpoints
from distill_core.config import build, resolve_preset
from distill_core.model.config import ModelConfig


def remat_override(value: str) -> dict[str, Any]:
  """`--remat` as the model's `remat` field takes it: a bool today, a policy name where the field is a string."""
  field = ModelConfig.model_fields.get("remat")
  if field is None:
    return {}
  if field.annotation is bool:
    return {"remat": value not in ("none", "false", "off", "no")}
  return {"remat": value}


def model_config(preset: str, overrides: dict[str, Any]):
  return build(ModelConfig, {**resolve_preset(preset), **overrides}, source=f"model preset {preset}")


def param_count(cfg) -> int:
  """Parameters of the model (embedding and head included), from its shapes."""
  state = nnx.state(checkpoints.abstract_model(cfg), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def analytic_flops_per_token(cfg, seq_len: int, *, train: bool, remat: bool) -> float:
  """Model FLOPs per token: 2 x (matmul parameters) + 4·L·T·H·D attention per forward (the full T x T
  score matrix, as dense attention computes it: PaLM's 6N + 12·L·H·D·T convention for a train step);
  a train step is 3 forwards, plus one more forward of the layers when they are rematerialised."""
  e, h, kv, d, i = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head,
                    cfg.intermediate_size)
  per_layer = e * h * d + 2 * e * kv * d + h * d * e + 3 * e * i  # q, k, v, o, gate, up, down
  layers = cfg.num_hidden_layers * (2 * per_layer + 4 * seq_len * h * d)
  head = 2 * e * cfg.vocab_size
  forward = layers + head
  if not train:
    return float(forward)
  return float(3 * forward + (layers if remat else 0))


def is_remat(cfg) -> bool:
  value = getattr(cfg, "remat", False)
  return bool(value) and value not in ("none", "false")
