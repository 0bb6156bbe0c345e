"""What every teacher source shares: what the run needs from its teacher (`teacher_needs`, derived once
from the config), the teacher layers and states the losses read, and placing host targets on the
trainer's mesh."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill_core.data import load_manifest
from distill_core.needs import Needs
from distill_core.records import Manifest
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



def teacher_needs(cfg: "TrainConfig", data: Manifest | None = None) -> Needs:
  """What the run needs from its teacher, whatever the source: from the losses (k, value dtype, the
  constant loss temperature stored answers must hold, layers, states, samples), the model and the
  prepared dataset `data` (read from data.path when not given)."""
  data = load_manifest(cfg.data.path) if data is None else data
  low, high = cfg.loss.temperature.bounds()
  return Needs(k=cfg.loss.request_k, value_dtype=cfg.teacher.value_dtype, vocab_size=cfg.model.real_vocab_size,
               data_vocab_size=data.vocab_size, seq_len=data.seq_len,
               batch_rows=cfg.data.batch_size // jax.process_count(),
               tokenizer_fingerprint=data.tokenizer_fingerprint, hidden_size=cfg.model.hidden_size,
               feature_layers=functools.partial(feature_teacher_layers, cfg), state_names=teacher_state_names(cfg),
               samples=cfg.loss.sampling, temperatures=(low,) if low == high else (),
               dataset_fingerprint=data.dataset_fingerprint)


def place_targets(targets: TeacherTargets, mesh: Mesh) -> TeacherTargets:
  """Host targets -> global arrays on `mesh`, split along B (axis 1 of the (L, B, T, E) states)."""
  states = NamedSharding(mesh, PartitionSpec(None, ("data", "fsdp"), None, None))
  replicated = NamedSharding(mesh, PartitionSpec())

  def put(sharding, x):
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  placed = targets.map_rows(lambda x, axis: put(states if axis else batch_sharding(mesh, np.ndim(x)), x))
  return placed.map_shared(lambda x: put(replicated, x))
