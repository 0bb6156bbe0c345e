"""What every teacher source shares: what the student asks of a teacher, the teacher layers and states the
losses read, and placing host targets on the trainer's mesh."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill_core.data import DataConfig
from distill_core.model.config import ModelConfig
from distill_core.sharding import batch_sharding
from distill_core.targets import TeacherTargets
from student_trainer.blockwise import check_blockwise, state_names_needed
from student_trainer.losses import LossConfig

if TYPE_CHECKING:
  from student_trainer.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Student:
  """The student's side of a run, as every source reads it besides its own options: the student's model,
  its losses (what they read of the teacher), its data, and the dtype it asks teacher values in."""

  model: ModelConfig
  loss: LossConfig
  data: DataConfig
  value_dtype: str  # teacher.value_dtype

  @classmethod
  def of(cls, train_cfg: "TrainConfig") -> "Student":
    return cls(model=train_cfg.model, loss=train_cfg.loss, data=train_cfg.data,
               value_dtype=train_cfg.teacher.value_dtype)

  @property
  def state_names(self) -> tuple[str, ...]:
    """State names the losses read at the teacher's layers: attn_in and attn_out for blockwise, attn_out for
    beta > 0, none otherwise."""
    return state_names_needed(self.loss)

  def feature_layers(self, teacher_layers: int) -> tuple[int, ...]:
    """Teacher layers whose states the losses read (the mapped layers; empty when no loss reads states)."""
    if not self.state_names:
      return ()
    _, layers = self.loss.layer_pairs(self.model.num_hidden_layers, teacher_layers)
    return tuple(sorted(set(layers)))

  def teacher_layers(self, *, layers: int, width: int, where: str) -> tuple[int, ...]:
    """`feature_layers` of a teacher of `layers` layers and `width` wide, once it is known (a model, a
    manifest, a config); with loss.blockwise first the check that this teacher fits the student block by
    block (ValueError naming the fields and values; `where` names the teacher's fields)."""
    if self.loss.ever_blockwise:
      check_blockwise(self.loss, student_layers=self.model.num_hidden_layers, student_width=self.model.hidden_size,
                      teacher_layers=layers, teacher_width=width, where=where)
    return self.feature_layers(layers)


def place_targets(targets: TeacherTargets, mesh: Mesh) -> TeacherTargets:
  """Host targets -> global arrays on `mesh`, split along B (axis 1 of the (L, B, T, E) states)."""
  states = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None, None))
  replicated = NamedSharding(mesh, PartitionSpec())

  def put(sharding, x):
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  placed = targets.map_rows(lambda x, axis: put(states if axis else batch_sharding(mesh, np.ndim(x)), x))
  tau = targets.sample_temperature
  return placed.replace(temperatures=put(replicated, targets.temperatures),
                        sample_temperature=None if tau is None else put(replicated, tau))
