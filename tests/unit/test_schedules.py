"""The scalar schedules (built on optax's) against the formula they document, computed with NumPy, at every step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from student_trainer.schedules import ScheduleConfig

CASES = [
    dict(kind="linear", start=1.0, end=3.0, steps=10, delay=5),
    dict(kind="linear", start=0.9, end=0.1, steps=7, delay=0),
    dict(kind="linear", start=0.0, end=0.5, steps=3, delay=2),
    dict(kind="cosine", start=4.0, end=2.0, steps=8, delay=0),
    dict(kind="cosine", start=0.0, end=1.0, steps=13, delay=4),
    dict(kind="cosine", start=1.0, end=1e-3, steps=50, delay=1),
    dict(kind="constant", start=0.25),
]


def reference(cfg: dict, step: int) -> float:
  """The documented formula in float64, one step at a time."""
  start, end = cfg["start"], cfg.get("end", cfg["start"])
  if cfg["kind"] == "constant":
    return start
  frac = min(max((step - cfg.get("delay", 0)) / cfg["steps"], 0.0), 1.0)
  shape = frac if cfg["kind"] == "linear" else 0.5 * (1.0 - math.cos(math.pi * frac))
  return start + (end - start) * shape


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['kind']}-{c['start']}-{c.get('end')}")
def test_schedule_values_at_every_step(case):
  schedule = ScheduleConfig(**case)
  steps = range(case.get("delay", 0) + case.get("steps", 0) + 6)
  want = np.array([reference(case, s) for s in steps])
  host = [schedule.value(s) for s in steps]
  assert all(type(v) is float for v in host)
  np.testing.assert_allclose(host, want, rtol=1e-14, atol=1e-15)
  assert host[0] == case["start"] and host[-1] == case.get("end", case["start"])  # the ends exactly
  assert [schedule.value(np.int64(s)) for s in steps] == host
  traced = jax.jit(jax.vmap(schedule.value))(jnp.arange(len(want), dtype=jnp.int32))
  assert traced.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(traced), want, rtol=2e-6, atol=2e-7)
  np.testing.assert_allclose(np.asarray(jax.vmap(schedule.schedule())(jnp.arange(len(want)))), want, rtol=2e-6,
                             atol=2e-7)
