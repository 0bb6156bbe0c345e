"""What every teacher source shares: the teacher layers and states the losses read, and placing host
targets on the trainer's mesh."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill_core.sharding import batch_sharding
from distill_core.targets import TeacherTargets
from student_trainer.blockwise import state_names_needed

if TYPE_CHECKING:
  from student_trainer.config import TrainConfig


def feature_teacher_layers(cfg: "TrainConfig", teacher_layers: int) -> tuple[int, ...]:
  """Teacher layers whose states the losses read (the mapped layers; empty when no loss reads states)."""
  if not teacher_state_names(cfg):
    return ()
  _, layers = cfg.loss.layer_pairs(cfg.model.num_hidden_layers, teacher_layers)
  return tuple(sorted(set(layers)))


def teacher_state_names(cfg: "TrainConfig") -> tuple[str, ...]:
  """State names the losses read at those layers: attn_in and attn_out for blockwise, attn_out for beta > 0."""
  return state_names_needed(cfg.loss)



def place_targets(targets: TeacherTargets, mesh: Mesh) -> TeacherTargets:
  """Host targets -> global arrays on `mesh`, split along B (axis 1 of the (L, B, T, E) states)."""
  states = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None, None))
  replicated = NamedSharding(mesh, PartitionSpec())

  def put(sharding, x):
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  placed = targets.map_rows(lambda x, axis: put(states if axis else batch_sharding(mesh, np.ndim(x)), x))
  return placed.map_shared(lambda x: put(replicated, x))
