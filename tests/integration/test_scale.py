"""The start-up check that stops what would not fit: a teacher server and a trainer as child processes,
each stopped with one line before it serves or trains."""

from __future__ import annotations

import subprocess
import sys

import pytest
from server_utils import REPO, free_port, one_device_env


@pytest.fixture
def child_env():
  return one_device_env()


def test_server_start_that_would_not_fit_stops_with_one_line(child_env):
  out = subprocess.run([sys.executable, "-m", "teacher_server", "model.preset=tiny", f"address=127.0.0.1:{free_port()}",
                        f"metrics_address=127.0.0.1:{free_port()}", "batcher.buckets=[[8,32]]", "limits.selectable_layers=[]",
                        "mesh.device_memory_bytes=65536"],
                       cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  lines = [line for line in out.stderr.splitlines() if "needs" in line]
  assert len(lines) == 1, out.stderr[-2000:]
  assert "cannot start: teacher engine bucket 8x32 needs" in lines[0]
  assert "but 0.00 GiB is available (mesh.device_memory_bytes)" in lines[0] and "a smaller bucket" in lines[0]
  assert "Traceback" not in out.stderr


def test_trainer_that_would_not_fit_stops_before_its_first_step(tiny_dataset, tmp_path, child_env):
  out = subprocess.run([sys.executable, "-m", "student_trainer", f"data.path={tiny_dataset}", "model=tiny",
                        f"run_dir={tmp_path}", "steps=2", "data.batch_size=8", "logging.progress=false",
                        "mesh.device_memory_bytes=65536"],
                       cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert errors == [line for line in out.stderr.splitlines() if "needs" in line] and len(errors) == 1
  assert errors[0].startswith("error: train kd step (batch 8x32 over 1 devices, grad_accum 1) needs ")
  assert "available (mesh.device_memory_bytes)" in errors[0] and "model.remat" in errors[0]
  assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text().strip()
