"""A Llama-family decoder (Llama 2/3, Qwen2) in Flax NNX.

Shapes: B batch, T sequence, E hidden_size, H query heads, K kv heads, D head
dim, V vocab_size, L layers. Parameter names follow Hugging Face, so checkpoint
import is a rename table (see `hf.py`):

    embed_tokens.embedding                 (V, E)
    layers[i].input_layernorm.scale        (E,)
    layers[i].self_attn.{q,k,v}_proj.kernel (E, H|K, D)  (+ bias (H|K, D))
    layers[i].self_attn.o_proj.kernel      (H, D, E)
    layers[i].post_attention_layernorm.scale (E,)
    layers[i].mlp.{gate,up}_proj.kernel    (E, F);  mlp.down_proj.kernel (F, E)
    norm.scale                             (E,)
    lm_head.kernel                         (E, V)   (absent when embeddings are tied)

With `scan_layers` the layers are one `DecoderLayer` whose parameters carry a
leading (L,) axis, applied with `nnx.scan`; otherwise `layers` is a list.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from distill_core.model.attention import Attention
from distill_core.model.config import ModelConfig
from distill_core.model.layers import LAYERS_AXIS, MLP, Embed, Linear, RMSNorm
from distill_core.model.rope import inverse_frequencies, rope_tables

STATE_NAMES = ("attn_in", "attn_out")


class ModelOutput(NamedTuple):
  """Forward result. logits (B, T, V) float32; states[name] (len(state_layers), B, T, E)."""

  logits: jax.Array
  states: dict[str, jax.Array]


class HiddenOutput(NamedTuple):
  """`Transformer.hidden_states` result. hidden (B, T, E) after the final norm; states as in ModelOutput."""

  hidden: jax.Array
  states: dict[str, jax.Array]


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    e = cfg.hidden_size
    norm_kw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(e, **norm_kw)
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(e, **norm_kw)
    self.mlp = MLP(e, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, segment_ids, inject=None, use_inject=None):
    """x (B, T, E) -> (x, {"attn_in": (B, T, E), "attn_out": (B, T, E)}).

    `inject` (B, T, E) replaces the attention input (query and key/value side);
    with a boolean scalar `use_inject` it replaces it only where that is true.
    """
    attn_in = self.input_layernorm(x)
    if inject is not None:
      inject = inject.astype(attn_in.dtype)
      attn_in = inject if use_inject is None else jnp.where(use_inject, inject, attn_in)
    attn_out = checkpoint_name(self.self_attn(attn_in, cos, sin, segment_ids), "attn_out")
    x = x + attn_out
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, {"attn_in": attn_in, "attn_out": attn_out}


def _call_layer(layer, x, cos, sin, segment_ids, inject, use_inject):
  return layer(x, cos, sin, segment_ids, inject, use_inject)


# `ModelConfig.remat` -> the `jax.checkpoint` policy of each layer (names from `checkpoint_name` above
# and in attention.py); "none" does not wrap the layer at all.
REMAT_POLICIES = {
    "full": None,  # save nothing but the layer's inputs
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
    "save_qkv_attn_out": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attn_out"),
}


def stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> DecoderLayer:
  """One DecoderLayer whose parameters have a leading (L,) axis named `layers`."""

  @nnx.split_rngs(splits=cfg.num_hidden_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
  def create(rngs: nnx.Rngs) -> DecoderLayer:
    return DecoderLayer(cfg, rngs=rngs)

  return create(rngs)


class Transformer(nnx.Module):
  """Decoder-only language model; `cfg` is its `ModelConfig`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    # Validated afresh: `model_copy(update=...)` skips validators (e.g. the mapping of `remat: true`).
    self.cfg = type(cfg).model_validate(cfg.model_dump())
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    e, v = cfg.hidden_size, cfg.vocab_size
    self.embed_tokens = Embed(v, e, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if cfg.scan_layers:
      self.layers = stacked_layers(cfg, rngs)
    else:
      self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(e, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    Linear(e, v, ("embed", "vocab"), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                           out_dtype=jnp.float32))

  def hidden_states(self, tokens, positions=None, segment_ids=None, *,
                    state_layers: Sequence[int] = (), state_names: Sequence[str] = STATE_NAMES,
                    inject_attn_in: dict[int, jax.Array] | None = None) -> HiddenOutput:
    """Runs the model up to the final norm (no lm_head: `logits_from_hidden` applies it).

    Args:
      tokens: (B, T) int token ids.
      positions: (B, T) int rotary positions; default arange(T) in every row.
      segment_ids: (B, T) int packed-sequence ids, 0 = padding; default all ones.
      state_layers: layers whose states to return, in this order (no repeats).
      state_names: which states: "attn_in" (after input_layernorm) and/or "attn_out"
        (after o_proj, before the residual add).
      inject_attn_in: {layer: (B, T, E)} replaces that layer's attention input.

    Returns:
      HiddenOutput(hidden (B, T, E) after the final norm, states {name: (len(state_layers), B, T, E)}).
    """
    cfg = self.cfg
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be a (B, T) integer array, got {tokens.dtype}{tokens.shape}")
    b, t = tokens.shape
    positions = _int_bt(positions, b, t, "positions", jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)))
    segment_ids = _int_bt(segment_ids, b, t, "segment_ids", jnp.ones((b, t), jnp.int32))
    state_layers, state_names = _check_states(state_layers, state_names, cfg.num_hidden_layers)
    inject = _check_inject(inject_attn_in or {}, cfg.num_hidden_layers, (b, t, cfg.hidden_size))

    x = self.embed_tokens(tokens)  # (B, T, E)
    inv_freq = inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = rope_tables(positions, inv_freq)  # (B, T, D) each
    run = self._run_scanned if cfg.scan_layers else self._run_unrolled
    x, states = run(x, cos, sin, segment_ids, state_layers, state_names, inject)
    x = self.norm(x)
    return HiddenOutput(x, states)  # (B, T, E)

  def __call__(self, tokens, positions=None, segment_ids=None, **kwargs) -> ModelOutput:
    """Runs the model: `hidden_states` (same arguments), then the lm_head.

    Returns:
      ModelOutput(logits (B, T, V) float32, states {name: (len(state_layers), B, T, E)}).
    """
    hidden, states = self.hidden_states(tokens, positions, segment_ids, **kwargs)
    return ModelOutput(self.logits_from_hidden(hidden), states)

  def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
    """The lm_head (or the tied embedding): hidden (B, T, E) after the final norm -> logits (B, T, V) f32.

    Per chunk of positions this is how the engine and the fused losses avoid whole (B, T, V) logits.
    """
    logits = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
    return logits.astype(jnp.float32)

  def lm_head_weights(self) -> tuple[jax.Array, bool]:
    """(lm_head kernel (E, V), False), or (the tied embedding (V, E), True): what logits_from_hidden uses."""
    if self.lm_head is None:
      return self.embed_tokens.embedding[...], True
    return self.lm_head.kernel[...], False

  def _layer_fn(self):
    if self.cfg.remat == "none":
      return _call_layer
    return nnx.remat(_call_layer, policy=REMAT_POLICIES[self.cfg.remat])

  def _run_unrolled(self, x, cos, sin, segment_ids, state_layers, state_names, inject):
    call = self._layer_fn()
    kept = {}
    for i, layer in enumerate(self.layers):
      x, states = call(layer, x, cos, sin, segment_ids, inject.get(i), None)
      if i in state_layers:
        kept[i] = states
    states = {n: jnp.stack([kept[i][n] for i in state_layers]) for n in state_names} if state_layers else {}
    return x, states

  def _run_scanned(self, x, cos, sin, segment_ids, state_layers, state_names, inject):
    n_layers = self.cfg.num_hidden_layers
    call = self._layer_fn()
    # Per-layer slot into the stacked injections / kept states; -1 = none.
    inject_slot = np.full((n_layers,), -1, np.int32)
    for j, i in enumerate(sorted(inject)):
      inject_slot[i] = j
    inject_stack = jnp.stack([inject[i] for i in sorted(inject)]) if inject else None  # (N, B, T, E)
    state_slot = np.full((n_layers,), -1, np.int32)
    for j, i in enumerate(state_layers):
      state_slot[i] = j
    kept = {n: jnp.zeros((len(state_layers),) + x.shape, x.dtype) for n in state_names} if state_layers else {}

    @nnx.scan(in_axes=(nnx.Carry, 0, 0, 0, None, None, None, None), out_axes=nnx.Carry,
              transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
    def body(carry, layer, inj_slot, st_slot, cos, sin, segment_ids, inject_stack):
      x, kept = carry
      inj = use = None
      if inject_stack is not None:
        inj, use = inject_stack[jnp.maximum(inj_slot, 0)], inj_slot >= 0
      x, states = call(layer, x, cos, sin, segment_ids, inj, use)
      j = jnp.maximum(st_slot, 0)
      kept = {n: jax.lax.dynamic_update_index_in_dim(buf, jnp.where(st_slot >= 0, states[n], buf[j]), j, 0)
              for n, buf in kept.items()}
      return x, kept

    return body((x, kept), self.layers, jnp.asarray(inject_slot), jnp.asarray(state_slot),
                cos, sin, segment_ids, inject_stack)


def _int_bt(value, b: int, t: int, name: str, default: jax.Array) -> jax.Array:
  if value is None:
    return default
  value = jnp.asarray(value)
  if value.shape != (b, t) or not jnp.issubdtype(value.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of shape {(b, t)}, got {value.dtype}{value.shape}")
  return value


def _check_states(layers, names, n_layers: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
  layers, names = tuple(int(i) for i in layers), tuple(names)
  bad = [i for i in layers if not 0 <= i < n_layers]
  if bad:
    raise ValueError(f"state_layers {bad} out of range for a model with {n_layers} layers")
  if len(set(layers)) != len(layers):
    raise ValueError(f"state_layers has repeats: {layers}")
  unknown = [n for n in names if n not in STATE_NAMES]
  if unknown or len(set(names)) != len(names):
    raise ValueError(f"state_names {names} must be distinct names from {STATE_NAMES}")
  if layers and not names:
    raise ValueError("state_layers given but state_names is empty")
  return layers, names


def _check_inject(inject: dict, n_layers: int, shape: tuple[int, int, int]) -> dict[int, jax.Array]:
  out = {}
  for i, value in inject.items():
    if not 0 <= int(i) < n_layers:
      raise ValueError(f"inject_attn_in layer {i} out of range for a model with {n_layers} layers")
    value = jnp.asarray(value)
    if value.shape != shape:
      raise ValueError(f"inject_attn_in[{i}] must have shape {shape} (B, T, E), got {value.shape}")
    out[int(i)] = value
  return out


def create_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """A randomly initialised model (normal(0.02) kernels, unit norms, zero biases)."""
  return Transformer(cfg, rngs=nnx.Rngs(seed))


def count_params(model: nnx.Module) -> int:
  """Number of parameter values (`nnx.Param`); works on `nnx.eval_shape` models too."""
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in leaves))
