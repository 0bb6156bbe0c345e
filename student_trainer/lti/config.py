"""The learn-to-init section of a training run (`lti:` in the YAML)."""

from __future__ import annotations

import re
from typing import Literal

import pydantic
from pydantic import Field

from distill_core.config import ConfigBase

# Every attention projection of every layer (unrolled or scanned).
ALL_PROJECTIONS = r"self_attn\.(q|k|v|o)_proj\.kernel$"


def _check_regex(value: str, what: str) -> str:
  try:
    re.compile(value)
  except re.error as e:
    raise ValueError(f"{what} {value!r} is not a valid regular expression: {e}") from None
  return value


class PathRule(ConfigBase):
  """A student path pattern and where its teacher tensor lives."""

  student: str = Field(..., description="Regex (re.search) over student parameter paths, e.g. "
                       r"'layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.kernel$'.")
  teacher: str | None = Field(
      None, description=r"Teacher path as a match.expand template over the student match (e.g. "
      r"'layers.\1.mlp.up_proj.kernel'); null = the student's own path, with lti.layer_map applied.")

  @pydantic.field_validator("student")
  @classmethod
  def _regex(cls, value: str) -> str:
    return _check_regex(value, "student pattern")


class ShareRule(ConfigBase):
  """Ties student parameters: every path matching `param` becomes the variable at `to`."""

  param: str = Field(..., description=r"Regex over student parameter paths (e.g. 'layers\.\d+\.self_attn\.k_proj\.a$').")
  to: str = Field(..., description=r"The path they all share, as a match.expand template (e.g. "
                  "'layers.0.self_attn.k_proj.a').")

  @pydantic.field_validator("param")
  @classmethod
  def _regex(cls, value: str) -> str:
    return _check_regex(value, "share pattern")


class LTIConfig(ConfigBase):
  """Learn-to-init: student attention projections computed from frozen teacher kernels.

  Applied in this order: `projections` (which become LTI), `share` (tie student
  parameters), then the run's top-level `copy_from_teacher` (copy teacher weights), `train`.
  Paths are the student's parameter paths joined by dots, as GetParameters names them:
  `layers.3.self_attn.q_proj.kernel` unrolled, `layers.self_attn.q_proj.kernel` (the whole
  stack) with scanned layers. `kernels_from`, `kernels_path`, `parameters_token_file` and
  `layer_map` also say where `copy_from_teacher` reads, with or without `enabled`.
  """

  enabled: bool = Field(False, description="Build the student with LTI projections (needs kernels_from).")
  kernels_from: Literal["hf", "orbax", "remote"] | None = Field(
      None, description="Where the teacher kernels (and the tensors of the run's copy_from_teacher) come "
      "from: a local Hugging Face or Orbax teacher "
      "checkpoint (kernels_path), or the teacher server's GetParameters (teacher.remote's address and "
      "credentials; the server must run with serve_parameters=true).")
  kernels_path: str | None = Field(None, description="Teacher checkpoint directory for kernels_from hf/orbax.")
  parameters_token_file: str | None = Field(
      None, description="kernels_from remote: file holding the server's GetParameters token (its "
      "security.parameters_token); null = teacher.remote's token.")
  map: Literal["factorised", "general"] = Field(
      "factorised", description="Learnable map: factorised A (Ht,Hs) and B (Dt,Ds), or a general W (Ht,Dt,Hs,Ds).")
  a_init: Literal["select", "average"] = Field(
      "select", description="Initial head map A: 'select' evenly spaced teacher heads (GQA groups kept), "
      "'average' contiguous buckets of teacher heads.")
  b_init: Literal["identity", "svd"] = Field(
      "identity", description="Initial head-dim map B: 'identity' truncated identity keeping rotary pairs, "
      "'svd' top singular directions of the teacher's value kernel for value/output (q/k keep identity).")
  projections: list[PathRule] = Field(
      default_factory=lambda: [PathRule(student=ALL_PROJECTIONS)],
      description="Which projection kernels become LTI (patterns over '...{q,k,v,o}_proj.kernel' paths) "
      "and which teacher kernel each starts from.")
  layer_map: list[int] | None = Field(
      None, description="Teacher layer of each student layer, for rules without a teacher template "
      "(e.g. [1, 3] for a 2-layer student of a 4-layer teacher); null = the same index.")
  share: list[ShareRule] = Field(default_factory=list, description="Student parameters to tie, applied after "
                                 "the projections.")
  train: list[str] = Field(
      default_factory=lambda: [".*"], description="Regexes over student parameter paths the optimizer "
      "updates; every other parameter is frozen (C is never trainable).")
  collapse_at_end: bool = Field(True, description="At the end of the run write <run_dir>/collapsed (Orbax) and "
                                "export the collapsed student as <run_dir>/hf.")

  @pydantic.field_validator("train")
  @classmethod
  def _regexes(cls, value: list[str]) -> list[str]:
    return [_check_regex(v, "train pattern") for v in value]

  @pydantic.model_validator(mode="after")
  def _check(self) -> "LTIConfig":
    if self.enabled:
      if self.kernels_from is None:
        raise ValueError("lti.kernels_from: required when lti.enabled (hf, orbax or remote)")
      if self.kernels_from in ("hf", "orbax") and not self.kernels_path:
        raise ValueError(f"lti.kernels_path: required for kernels_from={self.kernels_from}")
      if not self.projections:
        raise ValueError("lti.projections: give at least one rule")
    return self
