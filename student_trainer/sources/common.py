"""What every teacher source shares: what the student asks of a teacher (`Student`, and from it the run's
`Needs`), the teacher layers and states the losses read, and placing host targets on the trainer's mesh."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill_core.data import DataConfig, load_manifest
from distill_core.model.config import ModelConfig
from distill_core.needs import Needs
from distill_core.parts import BY_NAME, PARTS
from distill_core.records import Manifest
from distill_core.sharding import batch_sharding
from distill_core.targets import TeacherTargets
from student_trainer.blockwise import check_blockwise, state_names_needed
from student_trainer.losses import LossConfig
from student_trainer.on_policy import teacher_parts


@dataclasses.dataclass(frozen=True)
class Student:
  """The student's side of a run, as every source reads it besides its own options: the student's model,
  its losses (what they read of the teacher), its data, and the dtype it asks teacher values in."""

  model: ModelConfig
  loss: LossConfig
  data: DataConfig
  value_dtype: str  # teacher.value_dtype
  # Ids per position whose teacher logits the on-policy losses read (the sampled token and the student's
  # generation.score_student_topk ids); 0 when the loss reads none.
  given_ids_per_position: int = 0

  @classmethod
  def of(cls, train_cfg) -> "Student":
    """The student side of a `student_trainer.config.TrainConfig` (the config imports this module, so it is
    not named here)."""
    given = 1 + train_cfg.generation.score_student_topk if train_cfg.loss.scores_given_ids else 0
    return cls(model=train_cfg.model, loss=train_cfg.loss, data=train_cfg.data,
               value_dtype=train_cfg.teacher.value_dtype, given_ids_per_position=given)

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

  def needs(self, data: Manifest | None = None) -> Needs:
    """What the run needs from its teacher, whatever the source: from the losses (k, value dtype, the
    constant loss temperature stored answers must hold, layers, states, samples, how many given ids per
    position the teacher's logits are read at), the model and the prepared dataset `data` (read from data.path when not given)."""
    data = load_manifest(self.data.path) if data is None else data
    low, high = self.loss.temperature.bounds()
    return Needs(k=self.loss.request_k, value_dtype=self.value_dtype, vocab_size=self.model.real_vocab_size,
                 data_vocab_size=data.vocab_size, seq_len=data.seq_len,
                 batch_rows=self.data.batch_size // jax.process_count(),
                 tokenizer_fingerprint=data.tokenizer_fingerprint, hidden_size=self.model.hidden_size,
                 feature_layers=self.feature_layers, state_names=self.state_names,
                 samples=self.loss.sampling, temperatures=(low,) if low == high else (),
                 dataset_fingerprint=data.dataset_fingerprint,
                 parts=teacher_parts(self.given_ids_per_position))


def check_part_inputs(batch, part_inputs: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
  """A batch's part inputs (`TeacherSource.submit`), each part's checked against the batch (`Part.check_inputs`,
  ValueError naming the field); keys no registered part takes are refused."""
  inputs = dict(part_inputs or {})
  unknown = [key for key in inputs if key.split(".", 1)[0] not in BY_NAME]
  if unknown:
    raise ValueError(f"part_inputs: {unknown[0]!r} is not an input of a registered teacher-target part")
  for part in PARTS:
    part.check_inputs(inputs, batch)
  return inputs


def place_targets(targets: TeacherTargets, mesh: Mesh) -> TeacherTargets:
  """Host targets -> global arrays on `mesh`, split along B (axis 1 of the (L, B, T, E) states)."""
  states = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None, None))
  replicated = NamedSharding(mesh, PartitionSpec())

  def put(sharding, x):
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  placed = targets.map_rows(lambda x, axis: put(states if axis else batch_sharding(mesh, np.ndim(x)), x))
  return placed.map_shared(lambda x: put(replicated, x))
