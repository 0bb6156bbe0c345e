"""Helpers for multi-process student tests: N real `python -m student_trainer` processes on CPU.

The processes meet through `jax.distributed` (coordinator on 127.0.0.1, gloo
collectives), each with its own virtual CPU devices, exactly as the hosts of a
slice would: the environment variables are the ones the Kubernetes manifests set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from server_utils import REPO, free_port


class StudentProcesses:
  """`num` trainer processes of one run; `overrides` apply to all, `per_process[i]` to process i only."""

  def __init__(self, num: int, devices_each: int, overrides: Sequence[str], log_dir: Path, *,
               per_process: Sequence[Sequence[str]] = (), tag: str = "student"):
    self.log_paths = [log_dir / f"{tag}-{i}.log" for i in range(num)]
    port = free_port()
    self.procs: list[subprocess.Popen] = []
    self._logs = []
    for i in range(num):
      env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                 XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}",
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num), JAX_PROCESS_ID=str(i))
      extra = list(per_process[i]) if i < len(per_process) else []
      log = open(self.log_paths[i], "ab")  # noqa: SIM115 - closed in wait()
      self._logs.append(log)
      self.procs.append(subprocess.Popen([sys.executable, "-m", "student_trainer", *overrides, *extra],
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))

  def logs(self, i: int) -> str:
    return self.log_paths[i].read_text(errors="replace")

  def terminate(self) -> None:
    """SIGTERM to every process (as Kubernetes does to every pod of a preempted JobSet)."""
    for p in self.procs:
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()

  def wait(self, timeout: float) -> list[int]:
    """Exit codes; kills the processes left after `timeout` seconds and raises with their logs."""
    deadline = time.monotonic() + timeout
    try:
      for p in self.procs:
        p.wait(max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"student processes still running after {timeout} s:\n" + self.tails()) from None
    finally:
      for p in self.procs:
        if p.poll() is None:
          p.kill()
          p.wait()
      for log in self._logs:
        log.close()
    return [p.returncode for p in self.procs]

  def tails(self, chars: int = 3000) -> str:
    return "\n".join(f"--- process {i}:\n{self.logs(i)[-chars:]}" for i in range(len(self.procs)))


def metric_rows(run_dir: Path, key: str = "train/total_loss") -> list[dict]:
  """The rows of `<run_dir>/metrics.jsonl` that hold `key` (one per logged step)."""
  path = Path(run_dir) / "metrics.jsonl"
  if not path.is_file():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # a line being written right now
      continue
    if key in row:
      rows.append(row)
  return rows
