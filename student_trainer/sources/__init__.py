"""Teacher sources: one batch in, `TeacherTargets` out (or None for CE-only).

`make_source` imports only the source the config names (each pulls in its own dependencies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from student_trainer.sources.common import feature_teacher_layers, teacher_state_names

if TYPE_CHECKING:
  from jax.sharding import Mesh
  from student_trainer.config import TrainConfig
  from student_trainer.sources.base import TeacherSource

__all__ = ["feature_teacher_layers", "make_source", "teacher_state_names"]


def make_source(cfg: "TrainConfig", mesh: "Mesh", rules, *, interrupt=None) -> "TeacherSource":
  """The source `cfg.teacher.source` names; `interrupt` (a threading.Event) stops its waits."""
  source = _make_source(cfg, mesh, rules, interrupt)
  source.interrupt = interrupt
  return source


def _make_source(cfg: "TrainConfig", mesh: "Mesh", rules, interrupt) -> "TeacherSource":
  kind = cfg.teacher.source
  if kind == "none":
    from student_trainer.sources.none import NoTeacher
    return NoTeacher()
  if kind == "local":
    from distill_core.checkpoints import load_model
    from student_trainer.sources.local import LocalTeacher
    local = cfg.teacher.local
    model = load_model(local.model, hf_checkpoint=local.hf_checkpoint, orbax_checkpoint=local.orbax_checkpoint,
                       seed=local.seed)
    if cfg.loss.ever_blockwise:
      from student_trainer.blockwise import check_blockwise
      check_blockwise(cfg.loss, student_layers=cfg.model.num_hidden_layers, student_width=cfg.model.hidden_size,
                      teacher_layers=model.cfg.num_hidden_layers, teacher_width=model.cfg.hidden_size,
                      where="the local teacher")
    layers = feature_teacher_layers(cfg, model.cfg.num_hidden_layers)
    return LocalTeacher(model, k=cfg.loss.request_k, value_dtype=cfg.teacher.value_dtype, mesh=mesh,
                        rules=rules, dense_logits=cfg.loss.use_dense, state_layers=layers,
                        state_names=teacher_state_names(cfg) if layers else (),
                        student_vocab_size=cfg.model.vocab_size, samples=cfg.loss.sampling,
                        chunk_size=cfg.loss.chunk_size)
  if kind == "remote":
    from student_trainer.sources.remote import RemoteTeacher
    return RemoteTeacher.from_train_config(cfg, mesh, interrupt=interrupt)
  if kind == "offline":
    import jax
    from student_trainer.sources.offline import OfflineTeacher
    return OfflineTeacher(cfg, mesh, shard_index=jax.process_index(), shard_count=jax.process_count())
  if kind == "cached":
    import jax
    from student_trainer.sources.cached import CachedTeacher
    source = CachedTeacher(cfg, mesh, process_index=jax.process_index())
    source.remote.interrupt = interrupt  # its remote part is what may wait
    return source
  raise ValueError(f"teacher.source: unknown source {kind!r}")
