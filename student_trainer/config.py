"""The student trainer's run configuration (YAML + `key=value` overrides)."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import pydantic
from pydantic import Field

from distill_core.config import ConfigBase
from distill_core.data import DataConfig
from distill_core.generation import GenerationConfig
from distill_core.model.config import ModelConfig, ModelConfigOrPreset
from distill_core.sharding import MeshConfig
from distill_core.stream.config import StreamClientConfig
from student_trainer.distributed import DistributedConfig
from student_trainer.losses import LossConfig
from student_trainer.lti.config import LTIConfig, PathRule
from student_trainer.policy import policy_names
from student_trainer.sources import SourceKind, Student, source_kind, source_names

log = logging.getLogger(__name__)

# What `python -m student_trainer` with no arguments trains on (prepared on first use).
DEFAULT_DATA_PATH = "data/stdlib_tiny"
DEFAULT_PREPARE_CONFIG = "configs/prepare_tiny.yaml"


class OptimConfig(ConfigBase):
  """AdamW with linear warmup and cosine decay, global-norm clipping."""

  learning_rate: float = Field(3e-3, gt=0, description="Peak learning rate.")
  warmup_steps: int = Field(20, ge=0, description="Linear warmup from 0 to the peak, in optimizer steps.")
  decay_steps: int | None = Field(None, ge=1, description="Cosine decay length; None = run.steps.")
  end_lr_fraction: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
  weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
  b1: float = Field(0.9, gt=0, lt=1, description="Adam beta1.")
  b2: float = Field(0.95, gt=0, lt=1, description="Adam beta2.")
  eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
  clip_norm: float | None = Field(1.0, gt=0, description="Global gradient-norm clip; None disables.")
  grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (data.batch_size must divide).")
  on_nonfinite: Literal["skip", "stop"] = Field(
      "skip", description="A step whose loss or gradient is not finite never updates the model: 'skip' "
      "drops that batch (counted in train/nonfinite_steps, warned), 'stop' checkpoints what is trained "
      "and ends the run with an error naming the step.")


class SourceOptions(ConfigBase):
  """The options of one kind of teacher source (`teacher.<name>`), as the run's checks ask them."""

  def missing(self) -> str | None:
    """What these options lack for their source to start (a message naming the field), or None."""
    return None

  def known_teacher(self) -> tuple[ModelConfig, str] | None:
    """(the teacher's architecture, the option that names it) when these options alone decide it, so the
    run is checked against it before anything loads; None otherwise."""
    return None


class LocalTeacherConfig(SourceOptions):
  """A teacher run inside the student's own process (the co-located baseline)."""

  model: Annotated[ModelConfig | None, ModelConfigOrPreset] = Field(
      None, description="Teacher architecture (preset name or mapping); ignored when hf_checkpoint is set.")
  hf_checkpoint: str | None = Field(None, description="Hugging Face checkpoint directory of the teacher.")
  orbax_checkpoint: str | None = Field(None, description="Orbax checkpoint directory holding the teacher state.")
  seed: int = Field(0, description="Seed of a randomly initialised teacher (tests only).")

  def missing(self) -> str | None:
    if not (self.model or self.hf_checkpoint):
      return "teacher.local: set model (a preset) or hf_checkpoint for the local teacher"
    return None

  def known_teacher(self) -> tuple[ModelConfig, str] | None:
    return (self.model, "teacher.local.model") if self.model is not None and not self.hf_checkpoint else None


class RemoteTeacherConfig(StreamClientConfig, SourceOptions):
  """A teacher server (one or several replicas) answering over gRPC streams (addresses, reconnects,
  failover and TLS/token options inherited from distill_core.stream.config)."""

  window: int = Field(8, ge=1, description="Prefetch window: batches sent to the teacher ahead of the one "
                      "being trained on.")
  timeout_s: float = Field(120.0, gt=0, description="After this long without teacher progress on an unanswered "
                           "batch, on_timeout applies (and `wait` warns again at this interval).")
  on_timeout: str = Field("wait", description="Fallback policy: 'wait' (keep waiting, warn loudly), "
                          "'ce_only' (overdue batches train on cross-entropy alone, counted and logged) or "
                          "'cached_shards' (overdue batches found in teacher.cached.path are served from it, "
                          "the rest get teacher.cached.secondary).")
  rows_per_request: int | None = Field(
      None, ge=1, description="Rows of a batch per request (null: as many as the server's limits allow); "
      "smaller requests spread one batch over several replicas.")
  state_dtype: Literal["float32", "bfloat16"] = Field(
      "bfloat16", description="dtype of streamed layer states (float32 doubles their bytes).")
  pack_ids: bool = Field(True, description="Ask for bit-packed top-k ids (lossless, fewer bytes).")

  @pydantic.field_validator("on_timeout")
  @classmethod
  def _check_policy(cls, value: str) -> str:
    if value not in policy_names():
      raise ValueError(f"unknown policy {value!r} (known: {', '.join(policy_names())})")
    return value


class OfflineTeacherConfig(SourceOptions):
  """Answers dumped once by `python -m teacher_server.dump`, read by example id (docs/offline.md)."""

  path: str | None = Field(None, description="Answers directory (has manifest.json); local path or etils.epath URL.")
  read_threads: int = Field(2, ge=1, description="grain threads reading and decoding answer records.")
  prefetch: int = Field(4, ge=0, description="Batches of answers grain reads ahead.")
  lookahead: int = Field(2, ge=0, description="Batches submitted ahead of the one being trained on.")
  verify_shards: bool = Field(True, description="Check every shard's sha256 against the manifest when opened.")
  on_missing: Literal["error", "ce_only"] = Field(
      "error", description="An example id with no stored answer: 'error' stops naming it; 'ce_only' trains "
      "that batch on cross-entropy alone (logged and counted).")
  follow: bool = Field(False, description="Train from a dump still being written: on ids not yet stored, "
                       "re-read the manifest every follow_poll_s and wait (logged) instead of failing.")
  follow_poll_s: float = Field(2.0, gt=0, description="How often a following reader re-reads the manifest.")
  follow_timeout_s: float | None = Field(
      None, gt=0, description="Give up (on_missing applies) after waiting this long for an id (null: never).")
  weights_fingerprint: str | None = Field(
      None, description="Refuse answers from any other teacher (its weights fingerprint, from GetInfo or a "
      "manifest); null: accept the stored teacher.")
  allow_teacher_change: bool = Field(False, description="Resume from a checkpoint trained on answers of "
                                     "different teacher weights (refused by default).")

  def missing(self) -> str | None:
    return None if self.path else "teacher.offline.path: required when teacher.source is offline"


class CachedTeacherConfig(SourceOptions):
  """The remote teacher with a disk cache of its answers (docs/offline.md)."""

  path: str | None = Field(None, description="Cache directory (the answers format; created when missing).")
  records_per_shard: int = Field(256, ge=1, description="Answers per cache shard; a crash loses at most the "
                                 "unfinished shard.")
  secondary: Literal["wait", "ce_only"] = Field(
      "ce_only", description="With on_timeout=cached_shards: what overdue batches the cache cannot serve get.")
  verify_shards: bool = Field(True, description="Check every cache shard's sha256 when opened.")

  def missing(self) -> str | None:
    return None if self.path else "teacher.cached.path: required by the cached source and the cached_shards policy"


class TeacherConfig(ConfigBase):
  """Where teacher targets come from."""

  source: str = Field(
      "none", description=f"One of {'|'.join(source_names())}. 'none': plain CE training; 'local': teacher "
      "forward in this process; 'remote': stream batches to a teacher server (see teacher.remote); 'offline': "
      "answers dumped to shards (teacher.offline); 'cached': remote, with every answer kept in "
      "teacher.cached.path and cached example ids read from disk.")
  value_dtype: Literal["float16", "bfloat16", "float32"] = Field(
      "float16", description="dtype of the top-k logit values (f16 recommended: docs/losses.md, "
      "'The teacher-target contract').")
  local: LocalTeacherConfig = Field(default_factory=LocalTeacherConfig, description="Options of the local source.")
  remote: RemoteTeacherConfig = Field(default_factory=RemoteTeacherConfig,
                                      description="Options of the remote source (and of cached).")
  offline: OfflineTeacherConfig = Field(default_factory=OfflineTeacherConfig,
                                        description="Options of the offline source.")
  cached: CachedTeacherConfig = Field(default_factory=CachedTeacherConfig,
                                      description="Options of the cached source and the cached_shards policy.")

  @pydantic.field_validator("source")
  @classmethod
  def _check_source(cls, value: str) -> str:
    source_kind(value)  # ValueError naming the known sources
    return value

  @property
  def kind(self) -> SourceKind:
    """What the source `source` names is and can do (`sources/registry.py`)."""
    return source_kind(self.source)

  @property
  def own_options(self) -> SourceOptions | None:
    """The source's own sub-config (`teacher.<source>`); None for a source without options."""
    options = self.kind.sub_configs(self)
    return options[0] if options else None


class TrainGenerationConfig(GenerationConfig):
  """The student's samples for on-policy steps (loss.on_policy_fraction > 0; docs/on_policy.md)."""

  staleness: int = Field(1, ge=1, description="The batch of step m is sampled with the parameters after m - s "
                         "optimizer steps (the first s steps of a run: the initial ones), so generation for "
                         "step n + s runs while step n trains.")


class CheckpointConfig(ConfigBase):
  """Orbax checkpoints of model, optimizer, data iterator and teacher cursor."""

  directory: str | None = Field(None, description="Checkpoint directory; None = <run_dir>/checkpoints.")
  every_steps: int = Field(100, ge=1, description="Save every N optimizer steps.")
  keep: int = Field(3, ge=1, description="Keep the last N checkpoints.")
  resume: bool = Field(True, description="Resume from the latest checkpoint in the directory, if any.")
  async_save: bool = Field(True, description="Write checkpoints in the background.")
  allow_changes: list[str] = Field(
      default_factory=list, description="Config fields (dotted names or prefixes such as optim, or '*') "
      "allowed to differ from the checkpoint's on resume; any other change is refused, naming the field. "
      "steps may always grow.")


class EvalConfig(ConfigBase):
  """Periodic evaluation on the held-out split."""

  every_steps: int = Field(50, ge=0, description="Evaluate every N steps (0 = only at the end).")
  batches: int = Field(8, ge=1, description="Held-out batches per evaluation.")


class LoggingConfig(ConfigBase):
  """Where metrics go."""

  every_steps: int = Field(10, ge=1, description="Write metrics every N steps.")
  jsonl: bool = Field(True, description="Append metrics to <run_dir>/metrics.jsonl.")
  tensorboard: bool = Field(True, description="Write TensorBoard event files to <run_dir>/tensorboard.")
  progress: bool = Field(True, description="Show a progress bar (timestamped log lines instead when "
                         "stderr is not a terminal).")
  example_ids: bool = Field(False, description="Append each trained step's example ids to "
                            "<run_dir>/example_ids.jsonl (a debug log on disk, for auditing the data order).")


class TrainConfig(ConfigBase):
  """A student training run."""

  run_dir: str = Field("runs/student", description="Directory for metrics, checkpoints and exports.")
  steps: int = Field(200, ge=1, description="Optimizer steps to train.")
  seed: int = Field(0, description="Seed of the student initialisation.")
  model: Annotated[ModelConfig, ModelConfigOrPreset] = Field(
      "tiny", description="Student architecture (preset name or mapping).", validate_default=True)
  init_hf_checkpoint: str | None = Field(None, description="Start the student from this HF checkpoint.")
  data: DataConfig = Field(default_factory=lambda: DataConfig(path=DEFAULT_DATA_PATH), description=(
      f"Training data pipeline. The default path {DEFAULT_DATA_PATH} is prepared on first use from "
      f"{DEFAULT_PREPARE_CONFIG} (the standard library, vocabulary 384, fits the default tiny model)."))
  teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher targets.")
  loss: LossConfig = Field(default_factory=LossConfig, description="Loss terms and their weights.")
  generation: TrainGenerationConfig = Field(
      default_factory=TrainGenerationConfig, description="Sampling from the student for on-policy steps "
      "(read only when loss.on_policy_fraction > 0).")
  optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
  mesh: MeshConfig = Field(default_factory=MeshConfig, description="Device mesh and sharding rules.")
  distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                         description="Multi-process runs (jax.distributed): timeouts.")
  checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
  eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
  logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics output.")
  export_hf: bool = Field(True, description="Export the final student to <run_dir>/hf in Hugging Face format.")
  lti: LTIConfig = Field(default_factory=LTIConfig, description="Learn-to-init (see docs/lti.md).")
  copy_from_teacher: list[PathRule] = Field(
      default_factory=list, description="Teacher tensors copied into the student when it is built (shapes must "
      "match), with or without learn-to-init: read from lti.kernels_from / lti.kernels_path, student layer j "
      r"from teacher layer lti.layer_map[j], e.g. {student: '^(embed_tokens\.embedding|norm\.scale)$'}. "
      "Every parameter trains unless lti.enabled (then lti.train applies). See docs/lti.md.")

  @pydantic.model_validator(mode="before")
  @classmethod
  def _moved_keys(cls, data):
    """`lti.copy_from_teacher` (before copying worked without learn-to-init) loads as `copy_from_teacher`."""
    lti = data.get("lti") if isinstance(data, dict) else None
    if isinstance(lti, dict) and "copy_from_teacher" in lti:
      if "copy_from_teacher" in data:
        raise ValueError("lti.copy_from_teacher moved to the top-level key copy_from_teacher; give only that one")
      log.warning("lti.copy_from_teacher is now the top-level key copy_from_teacher "
                  "(loaded as that; rename it in the config)")
      lti = dict(lti)
      data = {**data, "lti": lti, "copy_from_teacher": lti.pop("copy_from_teacher")}
    return data

  @pydantic.model_validator(mode="after")
  def _check(self) -> "TrainConfig":
    if self.data.batch_size % self.optim.grad_accum:
      raise ValueError(f"data.batch_size ({self.data.batch_size}) must be divisible by "
                       f"optim.grad_accum ({self.optim.grad_accum})")
    own = self.teacher.own_options
    if own is not None and (problem := own.missing()):
      raise ValueError(problem)
    if self.teacher.remote.on_timeout == "cached_shards" and (problem := self.teacher.cached.missing()):
      raise ValueError(problem)
    if self.copy_from_teacher and self.lti.kernels_from is None:
      raise ValueError("copy_from_teacher: needs lti.kernels_from (hf, orbax or remote), where the teacher's "
                       "tensors are read")
    if self.copy_from_teacher and self.lti.kernels_from in ("hf", "orbax") and not self.lti.kernels_path:
      raise ValueError(f"copy_from_teacher: needs lti.kernels_path for lti.kernels_from={self.lti.kernels_from}")
    if self.loss.ever_blockwise:
      self._check_blockwise()
    if self.loss.on_policy_fraction > 0:
      self._check_on_policy()
    return self

  def _check_on_policy(self) -> None:
    """Generated rows are new text under a corpus example id: only a teacher that scores each batch as sent
    can answer them (not stored answers, nor a cache keyed by example id)."""
    kind = self.teacher.kind
    if not kind.scores_new_text:
      able = ", ".join(name for name in source_names() if source_kind(name).scores_new_text)
      raise ValueError(f"loss.on_policy_fraction: generated batches need a teacher that scores them as they "
                       f"are sent (teacher.source {able}), not {kind.name!r}")
    if "remote" in kind.options and self.teacher.remote.on_timeout == "cached_shards":
      raise ValueError("loss.on_policy_fraction: teacher.remote.on_timeout cached_shards serves stored "
                       "answers by example id, which do not match generated rows; use wait or ce_only")

  @property
  def from_teacher(self) -> bool:
    """Whether the student is built from teacher tensors (learn-to-init, copies, or both)."""
    return self.lti.enabled or bool(self.copy_from_teacher)

  def _check_blockwise(self) -> None:
    """What can be known before any teacher is loaded or reached (sources check the rest when they start)."""
    if not self.teacher.kind.teacher:
      raise ValueError(f"loss.blockwise: needs a teacher's layer states, but teacher.source is "
                       f"{self.teacher.source!r}")
    own = self.teacher.own_options
    known = own.known_teacher() if own is not None else None
    if known is not None:
      teacher, where = known
      Student.of(self).teacher_layers(layers=teacher.num_hidden_layers, width=teacher.hidden_size, where=where)
    else:  # the teacher's depth is not known yet: check what the student side alone decides
      try:
        self.loss.layer_pairs(self.model.num_hidden_layers, max(self.loss.layer_map or [0]) + 1
                              if self.loss.layer_map is not None else self.model.num_hidden_layers)
      except ValueError as e:
        raise ValueError(f"loss.blockwise: loss.layer_map {self.loss.layer_map} does not fit model."
                         f"num_hidden_layers {self.model.num_hidden_layers}: {e}") from None
