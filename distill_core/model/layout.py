"""Moving weights between the scanned and unrolled layer layouts; logical axis names.

Layout conversion works on whatever the layers hold, so a model whose
projections were swapped for other modules converts too, provided every layer
has the same structure. Arrays are shared or stacked, never re-initialised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from distill_core.model.layers import LAYERS_AXIS
from distill_core.model.transformer import Transformer

_SHARED = ("embed_tokens", "norm", "lm_head")


def _set_layer_axis(state: nnx.State, add: bool) -> None:
  """Adds (or removes) the leading `layers` name in every variable's `out_sharding`."""
  for path, var in nnx.to_flat_state(state):
    axes = var.get_metadata().get("out_sharding")
    if not axes:
      continue
    if add:
      var.set_metadata(out_sharding=(LAYERS_AXIS,) + tuple(axes))
    else:
      if axes[0] != LAYERS_AXIS:
        raise ValueError(f"layer variable {'.'.join(map(str, path))} has axes {axes}, expected a "
                         f"leading {LAYERS_AXIS!r} axis")
      var.set_metadata(out_sharding=tuple(axes[1:]))


def stack_layers(layers: nnx.List) -> nnx.Module:
  """Unrolled layers -> one module whose arrays have a leading (L,) axis."""
  parts = [nnx.split(layer) for layer in layers]
  graphdef = parts[0][0]
  for i, (other, _) in enumerate(parts[1:], start=1):
    if other != graphdef:
      raise ValueError(f"layer {i} differs in structure from layer 0; only identical layers can be "
                       "stacked (swap the same module type into every layer)")
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[state for _, state in parts])
  _set_layer_axis(stacked, add=True)
  return nnx.merge(graphdef, stacked)


def unstack_layers(layers: nnx.Module, num_layers: int) -> nnx.List:
  """One stacked module -> a list of `num_layers` modules (views of each layer's slice)."""
  graphdef, state = nnx.split(layers)
  for path, var in nnx.to_flat_state(state):
    if var.shape[:1] != (num_layers,):
      raise ValueError(f"layer variable {'.'.join(map(str, path))} of shape {var.shape} has no "
                       f"leading axis of size {num_layers}")
  out = []
  for i in range(num_layers):
    sliced = jax.tree.map(lambda x, i=i: x[i], state)
    _set_layer_axis(sliced, add=False)
    out.append(nnx.merge(graphdef, sliced))
  return nnx.List(out)


def convert_layout(model: Transformer, scan_layers: bool) -> Transformer:
  """The same weights in the other layer layout (returns `model` when already there).

  The result shares the embedding, final norm and head arrays with `model`.
  """
  if model.cfg.scan_layers == scan_layers:
    return model
  cfg = model.cfg.model_copy(update={"scan_layers": scan_layers})
  new = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # structure only, no memory
  for name in _SHARED:
    part = getattr(model, name)
    setattr(new, name, None if part is None else nnx.clone(part))
  new.layers = (stack_layers(model.layers) if scan_layers
                else unstack_layers(model.layers, cfg.num_hidden_layers))
  return new


def to_scanned(model: Transformer) -> Transformer:
  """`convert_layout(model, scan_layers=True)`."""
  return convert_layout(model, True)


def to_unrolled(model: Transformer) -> Transformer:
  """`convert_layout(model, scan_layers=False)`."""
  return convert_layout(model, False)


def logical_axes(model: nnx.Module) -> dict[str, tuple[str, ...]]:
  """{"layers.0.self_attn.q_proj.kernel": ("embed", "q_heads", "head_dim"), ...} for every Param.

  For a tree of `PartitionSpec`s with these names use
  `nnx.get_partition_spec(nnx.state(model, nnx.Param))`.
  """
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    out[".".join(map(str, path))] = tuple(var.get_metadata().get("out_sharding") or ())
  return out
