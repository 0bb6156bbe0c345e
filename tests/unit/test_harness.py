"""The harness's child environments (the process-level parts are in tests/integration/test_harness.py)."""

from __future__ import annotations

from distill_core import harness


def test_cpu_env_replaces_the_device_count_and_keeps_the_other_xla_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  assert harness.cpu_env(2) == {
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2"}
  monkeypatch.delenv("XLA_FLAGS")
  assert harness.cpu_env() == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
