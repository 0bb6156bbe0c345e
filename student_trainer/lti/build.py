"""The trainer's learn-to-init hooks: build the surgered student, fingerprint its teacher kernels.

`build_lti_model(train_cfg)` opens the teacher-parameter source, plans (failing
before anything is allocated), fetches only the planned tensors, builds the
student (fresh, or from `init_hf_checkpoint`) and applies the plan: LTI
projections when `lti.enabled`, and the run's `copy_from_teacher` (which also
works alone). It returns the model, the optimizer's `wrt` filter and the LTI
record that every checkpoint of an LTI run stores: the teacher source, the
fingerprint of the teacher kernels (C) and of the server's weights (remote),
so a restore fetches C again from the same place and refuses kernels that
differ. A copy-only run has no C and no record (None): its copies are
ordinary parameters, saved in its checkpoints.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from flax import nnx

from distill_core.checkpoints import arrays_fingerprint, load_model
from distill_core.model.transformer import Transformer
from student_trainer.lti.modules import TeacherKernel
from student_trainer.lti.surgery import Plan, TrainablePaths, apply_plan, make_plan
from student_trainer.lti.teacher import TeacherParams, open_teacher

if TYPE_CHECKING:
  from student_trainer.config import TrainConfig

log = logging.getLogger(__name__)


def plan_for(train_cfg: "TrainConfig", teacher: TeacherParams | None = None) -> tuple[Plan, TeacherParams]:
  """The surgery plan of a TrainConfig (`train_cfg.lti` on `train_cfg.model`); reads teacher shapes only."""
  teacher = teacher or open_teacher(train_cfg.lti, train_cfg.teacher.remote)
  return make_plan(train_cfg.model, train_cfg.lti, teacher, train_cfg.copy_from_teacher), teacher


def kernel_fingerprint(model: nnx.Module) -> str:
  """sha256 over the student's frozen teacher kernels (path, dtype, shape, bytes), sorted by path."""
  flat = sorted((".".join(map(str, p)), v[...]) for p, v in nnx.to_flat_state(nnx.state(model, TeacherKernel)))
  return arrays_fingerprint(flat)


def build_lti_model(train_cfg: "TrainConfig") -> tuple[Transformer, TrainablePaths, dict[str, Any] | None]:
  """(student, trainable filter, record) for a TrainConfig with `lti.enabled` or `copy_from_teacher`.

  The record is None without `lti.enabled` (nothing frozen to fetch again on resume).
  """
  plan, teacher = plan_for(train_cfg)
  log.info("%s plan:\n%s", "learn-to-init" if train_cfg.lti.enabled else "copy_from_teacher", plan.describe())
  arrays = teacher.fetch(plan.teacher_names())
  if train_cfg.init_hf_checkpoint:
    model = load_model(hf_checkpoint=train_cfg.init_hf_checkpoint, **train_cfg.model.runtime_fields())
  else:
    model = Transformer(train_cfg.model, rngs=nnx.Rngs(train_cfg.seed))
  wrt = apply_plan(model, plan, arrays)
  if not train_cfg.lti.enabled:
    return model, wrt, None
  record = {"teacher": teacher.record(), "kernel_fingerprint": kernel_fingerprint(model),
            "trainable": sorted(wrt.paths)}
  return model, wrt, record


def check_restored(saved: dict[str, Any] | None, current: dict[str, Any] | None, where: str) -> None:
  """Refuses to continue a checkpoint whose teacher kernels differ from the ones just loaded."""
  if not saved and not current:
    return
  if not saved or not current:
    raise ValueError(f"{where}: the checkpoint was {'not ' if not saved else ''}trained with learn-to-init "
                     f"but lti.enabled is {bool(current)}")
  if saved["kernel_fingerprint"] != current["kernel_fingerprint"]:
    raise ValueError(f"{where}: the teacher kernels from {current['teacher']} (fingerprint "
                     f"{current['kernel_fingerprint'][:16]}...) differ from those the checkpoint was trained "
                     f"with ({saved['teacher']}, {saved['kernel_fingerprint'][:16]}...)")
  if saved.get("trainable") != current.get("trainable"):
    raise ValueError(f"{where}: lti.train selects other parameters than the checkpoint's run did")
