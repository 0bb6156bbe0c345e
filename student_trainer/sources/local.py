"""The teacher in the student's own process: the co-located (MaxText-style) baseline.

The teacher forward, top-k, logsumexp, (for kd_mode sampled) the samples and any other part a
batch's part inputs ask for (the on-policy losses' ids to score) run
in one jitted function under `stop_gradient`; only the targets stay on the device. `submit` dispatches the
forward for an upcoming batch right away (JAX dispatch is asynchronous), so it
overlaps with the previous train step where the device allows.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from distill_core.checkpoints import load_model
from distill_core.data import Batch
from distill_core.model.transformer import Transformer
from distill_core.parts import BY_NAME, PARTS, ordered
from distill_core.sampling import split_u64
from distill_core.sharding import shard_batch, state_shardings
from distill_core.targets import DenseHead, TeacherTargets, compute_targets_from_hidden
from student_trainer.errors import RunError
from student_trainer.sources.base import TeacherSource
from student_trainer.sources.common import Student, check_part_inputs


class LocalTeacher(TeacherSource):
  """Runs a frozen teacher model next to the student.

  `chunk_size` (the run's loss.chunk_size): positions per block of the teacher's lm_head, top-k,
  logsumexp and draws (`compute_targets_from_hidden`); 0 or None: whole rows.
  """

  name = "local"
  lookahead = 1

  @classmethod
  def create(cls, local_cfg, *, student: Student, mesh: Mesh, rules, interrupt) -> "LocalTeacher":
    """The registry's constructor (`registry.py`): loads the teacher `teacher.local` names (a
    `LocalTeacherConfig`) and checks it against the student."""
    del interrupt  # nothing here waits
    model = load_model(local_cfg.model, hf_checkpoint=local_cfg.hf_checkpoint,
                       orbax_checkpoint=local_cfg.orbax_checkpoint, seed=local_cfg.seed)
    layers = student.teacher_layers(layers=model.cfg.num_hidden_layers, width=model.cfg.hidden_size,
                                    where="the local teacher")
    loss_cfg = student.loss
    return cls(model, k=loss_cfg.request_k, value_dtype=student.value_dtype, mesh=mesh, rules=rules,
               dense_logits=loss_cfg.use_dense, state_layers=layers, state_names=student.state_names if layers else (),
               student_vocab_size=student.model.vocab_size, samples=loss_cfg.sampling,
               chunk_size=loss_cfg.chunk_size)

  def __init__(self, model: Transformer, *, k: int, value_dtype: str, mesh: Mesh, rules,
               dense_logits: bool = False, state_layers: tuple[int, ...] = (),
               state_names: tuple[str, ...] = (), student_vocab_size: int | None = None,
               chunk_size: int | None = None, **part_requests):
    """`part_requests`: the requests of the other teacher-target parts asked for, by part name (None: none)."""
    unknown = [name for name in part_requests if name not in BY_NAME]
    if unknown:
      raise TypeError(f"LocalTeacher: no teacher-target part named {unknown[0]!r}")
    if student_vocab_size is not None and model.cfg.real_vocab_size > student_vocab_size:
      raise RunError(f"teacher.local: the teacher's vocabulary ({model.cfg.real_vocab_size}) is larger than "
                       f"the student's ({student_vocab_size}); they must share a tokenizer")
    if dense_logits and student_vocab_size is not None and model.cfg.vocab_size != student_vocab_size:
      raise RunError(f"loss.use_dense: teacher logits have {model.cfg.vocab_size} columns, the student's "
                       f"{student_vocab_size}; dense KD needs equal (padded) vocabularies")
    self.model_cfg = model.cfg
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    self._state = jax.device_put(state, shardings)
    self._dense_head = None  # with dense_logits: the teacher's lm_head, applied per chunk inside kd_dense
    if dense_logits:
      weight, tied = nnx.merge(graphdef, self._state).lm_head_weights()
      self._dense_head = DenseHead(weight, tied=tied, dtype=model.cfg.dtype)
    self._mesh = mesh
    self._pending: collections.deque[TeacherTargets] = collections.deque()
    self._layers, self._names = tuple(state_layers), tuple(state_names)
    self._forward = functools.partial(_teacher_targets, graphdef, k=k, value_dtype=value_dtype,
                                      true_vocab_size=model.cfg.real_vocab_size, dense_logits=dense_logits,
                                      parts=ordered(part_requests), chunk_size=chunk_size)
    self._fns: dict[tuple[str, ...], Callable] = {}  # state names -> jitted forward (one per objective of a run)

  def compute(self, batch: Batch, temperature: float, states: tuple[str, ...] | None = None,
              part_inputs: Mapping[str, np.ndarray] | None = None) -> TeacherTargets:
    names = self._names if states is None else tuple(n for n in self._names if n in states)
    if names not in self._fns:
      self._fns[names] = jax.jit(functools.partial(self._forward, state_layers=self._layers if names else (),
                                                   state_names=names))
    given = check_part_inputs(batch, part_inputs)  # per row: split along B like the batch
    *inputs, given = shard_batch((batch.tokens, batch.positions, batch.segment_ids, split_u64(batch.example_ids),
                                  given), self._mesh)
    targets = self._fns[names](self._state, *inputs, jnp.asarray([temperature], jnp.float32), given)
    return targets if self._dense_head is None else targets.replace(dense_head=self._dense_head)

  def submit(self, batch: Batch, temperature: float, states: tuple[str, ...] | None = None,
             part_inputs: Mapping[str, np.ndarray] | None = None) -> None:
    # dispatched now, runs asynchronously
    self._pending.append(self.compute(batch, temperature, states, part_inputs))

  def next(self) -> TeacherTargets:
    if not self._pending:
      raise RuntimeError("next() called with no submitted batch")
    return self._pending.popleft()


def _teacher_targets(graphdef, state, tokens, positions, segment_ids, example_ids, temperatures, part_inputs, *, k,
                     value_dtype, true_vocab_size, dense_logits, state_layers, state_names,
                     parts: tuple, chunk_size: int | None) -> TeacherTargets:
  model = nnx.merge(graphdef, jax.lax.stop_gradient(state))
  out = model.hidden_states(tokens, positions, segment_ids, state_layers=state_layers, state_names=state_names)
  requested = {key: value for name, request in parts
               for key, value in BY_NAME[name].compute_kwargs(request, example_ids=example_ids).items()}
  for part in PARTS:  # a batch's own inputs (the ids the on-policy losses score), per block of positions
    requested.update(part.input_args(part_inputs))
  # The lm_head, top-k, logsumexp and draws run per block of chunk_size positions.
  targets = compute_targets_from_hidden(
      out.hidden, model.logits_from_hidden, chunk_size=chunk_size, k=k, temperatures=temperatures,
      true_vocab_size=true_vocab_size, value_dtype=value_dtype, states=out.states if state_layers else None,
      state_layers=state_layers, **requested)
  if dense_logits:  # kd_dense forms the dense teacher logits per chunk: dense_head(dense_hidden)
    targets = targets.replace(dense_hidden=out.hidden)
  return targets
