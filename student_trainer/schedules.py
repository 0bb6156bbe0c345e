"""Scalar schedules (alpha, beta, temperature) counted in optimizer steps, built on optax's schedules.

A schedule holds `start` for `delay` steps, moves to `end` over `steps` steps
(linearly or along a half cosine) and holds `end` afterwards:

  frac(step) = clip((step - delay) / steps, 0, 1)
  linear:   start + (end - start) * frac
  cosine:   start + (end - start) * (1 - cos(pi * frac)) / 2
  constant: start

(`optax.linear_schedule` with `transition_begin=delay`; a constant `start` joined at `delay` to
`end + optax.cosine_decay_schedule(start - end, steps)`.)

`value(step)` accepts a Python / NumPy integer (returns a float computed in float64, e.g. for the
trainer choosing the temperature of a batch it will request later) or a traced JAX integer (returns a
float32 array inside a jitted train step).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pydantic
from pydantic import Field

from distill_core.config import ConfigBase


def _optax_schedule(kind: str, start: float, end: float, steps: int, delay: int) -> optax.Schedule:
  """The optax schedule of a `ScheduleConfig` with these fields (`end` already resolved)."""
  if kind == "constant":
    return optax.constant_schedule(start)
  if kind == "linear":
    return optax.linear_schedule(start, end, steps, transition_begin=delay)
  decay = optax.cosine_decay_schedule(start - end, steps)  # (start - end) * (1 + cos(pi * frac)) / 2
  return optax.join_schedules([optax.constant_schedule(start), lambda count: end + decay(count)], [delay])


@functools.lru_cache(maxsize=4096)
def _host_value(kind: str, start: float, end: float, steps: int, delay: int, step: int) -> float:
  """The schedule at a host step, in float64 (the trainer asks for each step's values a few times)."""
  with jax.enable_x64(True):
    return float(_optax_schedule(kind, start, end, steps, delay)(np.float64(step)))


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

  def schedule(self) -> optax.Schedule:
    """This schedule as an optax schedule (a function of the step count)."""
    return _optax_schedule(self.kind, self.start, self.final, self.steps, self.delay)

  def value(self, step: Any) -> Any:
    """The value at optimizer `step` (Python float for host ints, f32 array for JAX arrays)."""
    if _is_host(step):
      if self.kind == "constant" or step <= self.delay:
        return self.start
      if step >= self.delay + self.steps:
        return self.final
      return _host_value(self.kind, self.start, self.final, self.steps, self.delay, int(step))
    return jnp.asarray(self.schedule()(jnp.asarray(step, jnp.float32)), jnp.float32)


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
