"""The training state (student model + optimizer) as one sharded pytree."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from distill_core.checkpoints import load_model
from distill_core.model.hf import save_hf_checkpoint
from distill_core.model.transformer import Transformer
from distill_core.sharding import state_shardings
from student_trainer.config import TrainConfig
from student_trainer.distributed import barrier
from student_trainer.lti.build import build_lti_model
from student_trainer.lti.modules import TeacherKernel
from student_trainer.optim import build_optimizer
from student_trainer.plain_model import collapse_model


@dataclasses.dataclass
class TrainState:
  """`graphdef` + `params` (the nnx.State of `(model, optimizer)`) + their shardings.

  With learn-to-init, `params` also holds the frozen teacher kernels; they are
  not checkpointed (`saved()`), and `lti` records where they came from.
  """

  graphdef: nnx.GraphDef
  params: nnx.State
  shardings: Any
  lti: dict[str, Any] | None = None

  def _split(self, tree):
    if self.lti is None:
      return tree, None
    return nnx.split_state(tree, nnx.Not(TeacherKernel), TeacherKernel)

  def saved(self) -> nnx.State:
    """What a checkpoint holds: everything except the teacher kernels."""
    return self._split(self.params)[0]

  def abstract(self) -> Any:
    """ShapeDtypeStructs with shardings of `saved()`: the restore target for checkpoints."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        self.saved(), self._split(self.shardings)[0])

  def replace(self, params: nnx.State) -> "TrainState":
    """This state with `params` (a restored `saved()` tree; the teacher kernels are kept)."""
    if self.lti is not None:
      params = nnx.merge_state(params, self._split(self.params)[1])
    return dataclasses.replace(self, params=params)

  def model(self) -> Transformer:
    model, _ = nnx.merge(self.graphdef, self.params)
    return model

  @property
  def step(self) -> int:
    _, optimizer = nnx.merge(self.graphdef, self.params)
    return int(optimizer.step.get_value())


def create_train_state(cfg: TrainConfig, mesh: Mesh, rules) -> TrainState:
  """Initialises model and optimizer directly into their shardings (no host copy)."""
  tx = build_optimizer(cfg.optim, cfg.steps)
  if cfg.from_teacher:
    model, wrt, record = build_lti_model(cfg)
    graphdef, params = nnx.split((model, nnx.Optimizer(model, tx, wrt=wrt)))
    shardings = state_shardings(params, mesh, rules)
    return TrainState(graphdef, jax.device_put(params, shardings), shardings, lti=record)

  fresh = _fresh(cfg, tx)
  graphdef, abstract = nnx.split(nnx.eval_shape(fresh))
  shardings = state_shardings(abstract, mesh, rules)
  if cfg.init_hf_checkpoint:
    model = load_model(hf_checkpoint=cfg.init_hf_checkpoint, **cfg.model.runtime_fields())
    if model.cfg.model_copy(update={"true_vocab_size": cfg.model.true_vocab_size}) != cfg.model:
      raise ValueError(f"init_hf_checkpoint {cfg.init_hf_checkpoint}: its architecture differs from `model`")
    _, params = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    params = jax.device_put(params, shardings)
  else:
    params = jax.jit(lambda: nnx.split(fresh())[1], out_shardings=shardings)()
  return TrainState(graphdef, params, shardings)


def _fresh(cfg: TrainConfig, tx):
  def fresh():
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
  return fresh


def abstract_train_state(cfg: TrainConfig, mesh: Mesh, rules) -> TrainState:
  """The (model, optimizer) state of a plain student as `jax.ShapeDtypeStruct`s with their shardings.

  Nothing is allocated: the step can be compiled for `mesh` (e.g. a TPU topology's
  compile-only devices) to read its memory and FLOPs (`benchmarks.bench_scale`).
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(_fresh(cfg, build_optimizer(cfg.optim, cfg.steps))))
  shardings = state_shardings(abstract, mesh, rules)
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  return TrainState(graphdef, params, shardings)


def export_student(state: TrainState, path: str | Path, tokenizer_file: str | Path | None = None) -> Path:
  """Writes the student as a Hugging Face checkpoint directory (with its tokenizer.json, if given).

  A learn-to-init student is collapsed first (plain kernels, no LTI parameters).

  Collective when there are several processes: every process takes part in
  gathering each parameter (one at a time, so a host holds at most one whole
  tensor beyond its shards) and process 0 writes the files.
  """
  path = Path(path)
  model = collapse_model(state.model())
  if jax.process_count() == 1:
    save_hf_checkpoint(model, path, overwrite=True)
  else:
    save_hf_checkpoint(model, path, overwrite=True, write=jax.process_index() == 0,
                       fetch=lambda x: multihost_utils.process_allgather(x, tiled=True))
    barrier("distill-export")  # the export is complete when any process returns
  if jax.process_index() == 0 and tokenizer_file is not None and Path(tokenizer_file).is_file():
    shutil.copyfile(tokenizer_file, path / "tokenizer.json")
  return path
