"""Scalar schedules (alpha, beta, temperature) counted in optimizer steps.

A schedule holds `start` for `delay` steps, moves to `end` over `steps` steps
(linearly or along a half cosine) and holds `end` afterwards:

  frac(step) = clip((step - delay) / steps, 0, 1)
  linear:   start + (end - start) * frac
  cosine:   start + (end - start) * (1 - cos(pi * frac)) / 2
  constant: start

`value(step)` accepts a Python / NumPy integer (returns a float, e.g. for the
trainer choosing the temperature of a batch it will request later) or a traced
JAX integer (returns a float32 array inside a jitted train step).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Callable, Literal

import jax.numpy as jnp
import numpy as np
import pydantic
from pydantic import Field

from distill_core.config import ConfigBase

# frac in [0, 1] -> fraction of the way from start to end; `xp` is numpy or jax.numpy.
_SHAPES: dict[str, Callable[[Any, Any], Any]] = {
    "linear": lambda frac, xp: frac,
    "cosine": lambda frac, xp: 0.5 * (1.0 - xp.cos(math.pi * frac)),
}


class ScheduleConfig(ConfigBase):
  """A scalar that may change with the optimizer step. A bare number means constant."""

  kind: Literal["constant", "linear", "cosine"] = Field("constant", description="Shape of the transition.")
  start: float = Field(..., description="Value at step 0 (and during `delay`).")
  end: float | None = Field(None, description="Value after the transition; None = start.")
  steps: int = Field(0, ge=0, description="Length of the transition in optimizer steps "
                                          "(> 0 unless constant).")
  delay: int = Field(0, ge=0, description="Optimizer steps held at `start` before the transition begins.")

  @pydantic.model_validator(mode="after")
  def _check(self) -> "ScheduleConfig":
    if self.kind != "constant" and self.steps <= 0:
      raise ValueError(f"steps must be > 0 for a {self.kind} schedule")
    return self

  @property
  def final(self) -> float:
    return self.start if self.end is None or self.kind == "constant" else self.end

  def bounds(self) -> tuple[float, float]:
    """(smallest, largest) value the schedule takes."""
    return min(self.start, self.final), max(self.start, self.final)

  def value(self, step: Any) -> Any:
    """The value at optimizer `step` (Python float for host ints, f32 array for JAX arrays)."""
    if self.kind == "constant":
      return self.start if _is_host(step) else jnp.asarray(self.start, jnp.float32)
    xp = np if _is_host(step) else jnp
    frac = xp.clip((xp.asarray(step, dtype=xp.float32 if xp is jnp else np.float64) - self.delay)
                   / self.steps, 0.0, 1.0)
    out = self.start + (self.final - self.start) * _SHAPES[self.kind](frac, xp)
    return float(out) if xp is np else out.astype(jnp.float32)


def _is_host(step: Any) -> bool:
  return isinstance(step, (int, np.integer)) or (isinstance(step, np.ndarray) and step.ndim == 0)


def _number_to_constant(value: Any) -> Any:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return {"kind": "constant", "start": float(value)}
  return value


# A schedule field that also accepts a plain number (`temperature: 2.0`).
Schedule = Annotated[ScheduleConfig, pydantic.BeforeValidator(_number_to_constant)]


def constant(value: float) -> ScheduleConfig:
  """A constant schedule."""
  return ScheduleConfig(kind="constant", start=value)
