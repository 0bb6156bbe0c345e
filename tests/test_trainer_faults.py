"""Faults of real clusters, seen from the student: hung replicas, preemption while waiting, bad answers.

Each fault is produced for real: a teacher process whose engine hangs or corrupts its answers
(tests/fake_teacher.py), a trainer process that gets SIGTERM while it waits for a teacher.
"""

from __future__ import annotations

import threading
import time

import jax
import pytest
from remote_utils import TeacherProcess, fake_batch, fake_requirements, wait_serving
from server_utils import free_port

from distill_core.config import build
from distill_core.sharding import MeshConfig, make_mesh
from student_trainer.config import RemoteTeacherConfig
from student_trainer.sources.policy import CEOnlyPolicy
from student_trainer.sources.remote import RemoteTeacher


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(MeshConfig(data=jax.device_count()))


def drive(source, batches, results: list) -> None:
  """Submits every batch, then collects the answers in order (like the trainer's feeder)."""
  for batch in batches:
    source.submit(batch, 1.0)
  for _ in batches:
    results.append(source.next())


def test_hung_replica_process_with_default_backoff_falls_back(mesh, tmp_path):
  """A teacher process whose engine takes 8 s per batch while health and GetInfo still answer.

  `request_timeout_s` drops its stream after 0.5 s and the client reconnects; reconnecting is
  not progress, so the policy's `timeout_s` (1.5 s) expires and `ce_only` takes the batches,
  with the default reconnect backoff (which a test must not stretch to hide the problem).
  """
  hung = TeacherProcess(free_port(), [], tmp_path / "hung.log", fake=["--delay-s", "8", "--buckets", "8x16"])
  try:
    wait_serving(hung)
    cfg = build(RemoteTeacherConfig, dict(address=hung.address, window=2, timeout_s=1.5, request_timeout_s=0.5,
                                          on_timeout="ce_only"))
    defaults = RemoteTeacherConfig()
    assert (cfg.backoff_initial_s, cfg.backoff_max_s) == (defaults.backoff_initial_s, defaults.backoff_max_s)
    with RemoteTeacher(cfg, fake_requirements(), mesh=mesh, policy=CEOnlyPolicy()) as source:
      results: list = []
      worker = threading.Thread(target=drive, args=(source, [fake_batch(i) for i in range(2)], results),
                                daemon=True)
      worker.start()
      worker.join(60)  # the hung engine answers after 8 s at the earliest; before the fix: never
      assert not worker.is_alive(), f"next() still blocked after 60 s: {source.metrics()}"
      metrics = source.metrics()
  finally:
    hung.kill()
  assert results == [None, None]
  assert metrics["fallbacks_total"] == 2 and metrics["requests_total"] == 0
  assert metrics["failovers_total"] >= 1  # the hung stream was dropped
