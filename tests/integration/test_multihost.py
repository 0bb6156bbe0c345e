"""The student as two real `jax.distributed` processes (4 virtual CPU devices each) vs one with 8.

Same global batch, same config: the per-step losses agree within a relative
1e-5 (rows of a global batch are summed in another order across processes)
and the final parameters (the collective Hugging Face export) within
rtol 1e-4 / atol 1e-5, against a real teacher-server process and against the
local teacher. SIGTERM to both processes mid-run, then a restart of both,
continues bit-exactly: the same losses and parameters as the uninterrupted
two-process run. A fatal error on one process ends both.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from multiprocess_utils import StudentProcesses, metric_rows
from remote_utils import TeacherProcess, wait_serving
from safetensors.numpy import load_file
from server_utils import free_port

from distill_core.config import load_config
from student_trainer.config import TrainConfig

STEPS = 16
TEACHER_SEED = 3
LOSS_KEYS = ("train/total_loss", "train/ce_loss", "train/kd_loss", "train/teacher_tail_mass")


def overrides(dataset, run_dir, *extra) -> list[str]:
  return [f"run_dir={run_dir}", f"data.path={dataset}", "data.batch_size=8", f"steps={STEPS}",
          "logging.every_steps=1", "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0",
          "eval.batches=1", "checkpoint.every_steps=100", "checkpoint.async_save=false", "mesh.data=-1",
          "optim.warmup_steps=2", "optim.learning_rate=1e-2", "loss.top_k=8", "loss.alpha=0.7",
          "distributed.heartbeat_timeout_s=30", *extra]


def local_teacher() -> list[str]:
  return ["teacher.source=local", "teacher.local.model=tiny", f"teacher.local.seed={TEACHER_SEED}"]


def remote_teacher(address: str) -> list[str]:
  return ["teacher.source=remote", f"teacher.remote.address={address}", "teacher.remote.window=3",
          "teacher.remote.timeout_s=120"]


def reference(dataset, run_dir, *extra):
  """The same run in this pytest process: one process, the 8 virtual devices of conftest.py."""
  from student_trainer.train import run
  return run(load_config(TrainConfig, None, overrides(dataset, run_dir, *extra)))


def weights(run_dir) -> dict[str, np.ndarray]:
  return load_file(str(run_dir / "hf" / "model.safetensors"))


def assert_same_run(run_dir, ref_dir, *, exact: bool) -> None:
  rows, ref = metric_rows(run_dir), metric_rows(ref_dir)
  assert [r["step"] for r in rows] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
  for key in LOSS_KEYS:
    got, want = [r[key] for r in rows], [r[key] for r in ref]
    if exact:
      assert got == want, key
    else:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=key)
  got, want = weights(run_dir), weights(ref_dir)
  assert sorted(got) == sorted(want)
  for name in want:
    if exact:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    else:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def launch(dataset, run_dir, log_dir, *extra, tag="student", per_process=()) -> StudentProcesses:
  return StudentProcesses(2, 4, overrides(dataset, run_dir, *extra), log_dir, tag=tag, per_process=per_process)


def check_finished(students: StudentProcesses, timeout: float = 300) -> None:
  codes = students.wait(timeout)
  assert codes == [0, 0], students.tails()
  for i in range(2):
    assert f"finished at step {STEPS}" in students.logs(i)


@pytest.fixture(scope="module")
def teacher(tiny_dataset, tmp_path_factory):
  server = TeacherProcess(free_port(), ["model.source=preset", "model.preset=tiny", f"model.seed={TEACHER_SEED}",
                                        "batcher.buckets=[[4,32],[8,32]]", "limits.max_k=16",
                                        "batcher.max_wait_ms=2"],
                          tmp_path_factory.mktemp("teacher") / "teacher.log")
  yield server
  server.stop()


def test_two_processes_match_one_and_resume_bit_exactly(tiny_dataset, teacher, tmp_path):
  # One process with 8 devices (while the teacher server starts), then two processes with 4 each.
  reference(tiny_dataset, tmp_path / "local1", *local_teacher())
  wait_serving(teacher)
  reference(tiny_dataset, tmp_path / "remote1", *remote_teacher(teacher.address))
  check_finished(launch(tiny_dataset, tmp_path / "remote2", tmp_path, *remote_teacher(teacher.address),
                        tag="remote"))
  check_finished(launch(tiny_dataset, tmp_path / "local2", tmp_path, *local_teacher(), tag="local"))
  assert_same_run(tmp_path / "remote2", tmp_path / "remote1", exact=False)
  assert_same_run(tmp_path / "local2", tmp_path / "local1", exact=False)
  # Only process 0 writes metrics; both processes' throughput is in them (summed).
  rows = metric_rows(tmp_path / "remote2")
  assert all(r["teacher/requests_total"] > 0 for r in rows[1:])

  # SIGTERM to both processes mid-run, restart both: bit-exact continuation.
  run_dir = tmp_path / "resumed"
  first = launch(tiny_dataset, run_dir, tmp_path, *local_teacher(), tag="first")
  deadline = time.monotonic() + 300
  while len(metric_rows(run_dir)) < 2:
    assert time.monotonic() < deadline and all(p.poll() is None for p in first.procs), first.tails()
    time.sleep(0.02)
  first.terminate()
  assert first.wait(300) == [0, 0], first.tails()
  stopped = [r["step"] for r in metric_rows(run_dir)][-1]
  assert stopped < STEPS, "the run ended before SIGTERM arrived"
  for i in range(2):
    assert f"stopped early (preempted) at step {stopped}" in first.logs(i), first.tails()
  second = launch(tiny_dataset, run_dir, tmp_path, *local_teacher(), tag="second")
  check_finished(second)
  for i in range(2):
    assert f"resumed from step {stopped}" in second.logs(i)
  assert_same_run(run_dir, tmp_path / "local2", exact=True)


def test_fatal_error_on_one_process_ends_both(tiny_dataset, teacher, tmp_path):
  # Process 1 asks the teacher for more top-k than it serves: a fatal mismatch on that process only,
  # while process 0 connects and goes on into the first collective.
  students = launch(tiny_dataset, tmp_path / "run", tmp_path, *remote_teacher(teacher.address),
                    per_process=[[], ["loss.top_k=32"]])
  codes = students.wait(180)
  assert codes[1] == 1 and codes[0] == 3, students.tails()
  assert "top_k" in students.logs(1) and "fatal error" in students.logs(1)
  assert "stopping because another process failed (process 1:" in students.logs(0), students.tails()


def test_fallback_on_one_process_is_logged_on_every_process(tiny_dataset, teacher, tmp_path):
  # Process 1's teacher address has nobody listening: with ce_only, its batches fall back, so every
  # process trains them on CE alone (one step program for all) and says so in its own log.
  dead = f"127.0.0.1:{free_port()}"
  students = launch(tiny_dataset, tmp_path / "run", tmp_path, *remote_teacher(teacher.address), "steps=3",
                    "teacher.remote.on_timeout=ce_only", "teacher.remote.timeout_s=1", "export_hf=false",
                    per_process=[[], [f"teacher.remote.address={dead}"]])
  assert students.wait(300) == [0, 0], students.tails()
  for i in range(2):
    assert "trains on CE only on every process: no teacher answer on process(es) [1]" in students.logs(i)
  rows = metric_rows(tmp_path / "run")
  assert [r["step"] for r in rows] == [1, 2, 3]
  assert all("train/kd_loss" not in r for r in rows) and rows[-1]["teacher/fallback_batches"] == 1
  assert rows[-1]["teacher/peer_fallbacks_total"] == 3 and rows[-1]["teacher/fallbacks_total"] == 3
