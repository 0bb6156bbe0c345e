"""The student trainer's run configuration (YAML + `key=value` overrides)."""

from __future__ import annotations

from typing import Annotated, Literal

import pydantic
from pydantic import Field

from distill_core.config import ConfigBase
from distill_core.data import DataConfig
from distill_core.model.config import ModelConfig, ModelConfigOrPreset
from distill_core.sharding import MeshConfig
from student_trainer.losses import LossConfig


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


class LocalTeacherConfig(ConfigBase):
  """A teacher run inside the student's own process (the co-located baseline)."""

  model: Annotated[ModelConfig | None, ModelConfigOrPreset] = Field(
      None, description="Teacher architecture (preset name or mapping); ignored when hf_checkpoint is set.")
  hf_checkpoint: str | None = Field(None, description="Hugging Face checkpoint directory of the teacher.")
  orbax_checkpoint: str | None = Field(None, description="Orbax checkpoint directory holding the teacher state.")
  seed: int = Field(0, description="Seed of a randomly initialised teacher (tests only).")


class TeacherConfig(ConfigBase):
  """Where teacher targets come from."""

  source: Literal["none", "local"] = Field(
      "none", description="'none': plain CE training; 'local': teacher forward in this process.")
  value_dtype: Literal["float16", "bfloat16", "float32"] = Field(
      "float16", description="dtype of the top-k logit values (f16 recommended, see DESIGN 'Precision').")
  local: LocalTeacherConfig = Field(default_factory=LocalTeacherConfig, description="Options of the local source.")


class CheckpointConfig(ConfigBase):
  """Orbax checkpoints of model, optimizer, data iterator and teacher cursor."""

  directory: str | None = Field(None, description="Checkpoint directory; None = <run_dir>/checkpoints.")
  every_steps: int = Field(100, ge=1, description="Save every N optimizer steps.")
  keep: int = Field(3, ge=1, description="Keep the last N checkpoints.")
  resume: bool = Field(True, description="Resume from the latest checkpoint in the directory, if any.")
  async_save: bool = Field(True, description="Write checkpoints in the background.")


class EvalConfig(ConfigBase):
  """Periodic evaluation on the held-out split."""

  every_steps: int = Field(50, ge=0, description="Evaluate every N steps (0 = only at the end).")
  batches: int = Field(8, ge=1, description="Held-out batches per evaluation.")


class LoggingConfig(ConfigBase):
  """Where metrics go."""

  every_steps: int = Field(10, ge=1, description="Write metrics every N steps.")
  jsonl: bool = Field(True, description="Append metrics to <run_dir>/metrics.jsonl.")
  tensorboard: bool = Field(True, description="Write TensorBoard event files to <run_dir>/tensorboard.")
  progress: bool = Field(True, description="Show a progress bar (off automatically when not a terminal).")


class TrainConfig(ConfigBase):
  """A student training run."""

  run_dir: str = Field("runs/student", description="Directory for metrics, checkpoints and exports.")
  steps: int = Field(200, ge=1, description="Optimizer steps to train.")
  seed: int = Field(0, description="Seed of the student initialisation.")
  model: Annotated[ModelConfig, ModelConfigOrPreset] = Field(
      "tiny", description="Student architecture (preset name or mapping).", validate_default=True)
  init_hf_checkpoint: str | None = Field(None, description="Start the student from this HF checkpoint.")
  data: DataConfig = Field(..., description="Training data pipeline.")
  teacher: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher targets.")
  loss: LossConfig = Field(default_factory=LossConfig, description="Loss terms and their weights.")
  optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer.")
  mesh: MeshConfig = Field(default_factory=MeshConfig, description="Device mesh and sharding rules.")
  checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
  eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
  logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics output.")
  export_hf: bool = Field(True, description="Export the final student to <run_dir>/hf in Hugging Face format.")

  @pydantic.model_validator(mode="after")
  def _check(self) -> "TrainConfig":
    if self.data.batch_size % self.optim.grad_accum:
      raise ValueError(f"data.batch_size ({self.data.batch_size}) must be divisible by "
                       f"optim.grad_accum ({self.optim.grad_accum})")
    if self.teacher.source == "local" and not (self.teacher.local.model or self.teacher.local.hf_checkpoint):
      raise ValueError("teacher.local: set model (a preset) or hf_checkpoint for the local teacher")
    return self
