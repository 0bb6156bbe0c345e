"""An LTI student as a plain student: each LTI projection's effective kernel becomes a plain kernel.

The run-free part of `python -m student_trainer.collapse` (`collapse.py`), also
used by `state.export_student`; it knows nothing of runs or checkpoints.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from distill_core.checkpoints import abstract_model
from distill_core.model.transformer import Transformer
from student_trainer.lti.modules import LTIProj, locate


def has_lti(model: nnx.Module) -> bool:
  """Whether `model` has any learn-to-init projection."""
  return any(isinstance(node, LTIProj) for _, node in nnx.iter_graph(model))


def collapse_model(model: Transformer) -> Transformer:
  """The same function with plain projections (returns `model` itself when it has no LTI projection)."""
  if not has_lti(model):
    return model
  cfg = model.cfg
  graphdef, state = nnx.split(abstract_model(cfg))
  dtype = jnp.dtype(cfg.param_dtype)
  for path, var in nnx.to_flat_state(state):
    holder, attr = locate(model, ".".join(map(str, path)))
    if isinstance(holder, LTIProj):
      value = holder.kernel(layered=cfg.scan_layers) if attr == "kernel" else getattr(holder, attr)[...]
    else:
      value = getattr(holder, attr)[...]
    var.set_value(jnp.asarray(value).astype(dtype if jnp.issubdtype(value.dtype, jnp.floating) else value.dtype))
  return nnx.merge(graphdef, state)
