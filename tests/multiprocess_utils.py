"""Helpers for multi-process student tests: N real `python -m student_trainer` processes on CPU.

The processes meet through `jax.distributed` (coordinator on 127.0.0.1, gloo
collectives), each with its own virtual CPU devices, exactly as the hosts of a
slice would: the environment variables are the ones the Kubernetes manifests set.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Sequence

from server_utils import free_port

from distill_core import harness


class StudentProcesses:
  """`num` trainer processes of one run; `overrides` apply to all, `per_process[i]` to process i only."""

  def __init__(self, num: int, devices_each: int, overrides: Sequence[str], log_dir: Path, *,
               per_process: Sequence[Sequence[str]] = (), tag: str = "student"):
    self.log_paths = [log_dir / f"{tag}-{i}.log" for i in range(num)]
    port = free_port()
    self.procs: list[harness.ChildProcess] = []
    for i in range(num):
      env = {**harness.cpu_env(devices_each), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
             "JAX_NUM_PROCESSES": str(num), "JAX_PROCESS_ID": str(i)}
      extra = list(per_process[i]) if i < len(per_process) else []
      self.procs.append(harness.start_trainer([*overrides, *extra], self.log_paths[i], env=env, append=True))

  def logs(self, i: int) -> str:
    return self.procs[i].logs()

  def terminate(self) -> None:
    """SIGTERM to every process (as Kubernetes does to every pod of a preempted JobSet)."""
    for p in self.procs:
      p.terminate()

  def kill(self) -> None:
    for p in self.procs:
      p.kill()

  def wait(self, timeout: float) -> list[int]:
    """Exit codes; kills the processes left after `timeout` seconds and raises with their logs."""
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(max(deadline - time.monotonic(), 0.1)) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      raise AssertionError(f"student processes still running after {timeout} s:\n" + self.tails()) from None
    finally:
      self.kill()  # none is left running, whatever happened above

  def tails(self, chars: int = 3000) -> str:
    return "\n".join(f"--- process {i}:\n{self.logs(i)[-chars:]}" for i in range(len(self.procs)))


def metric_rows(run_dir: Path, key: str = "train/total_loss") -> list[dict]:
  """The rows of `<run_dir>/metrics.jsonl` that hold `key` (one per logged step)."""
  return harness.read_metrics(run_dir, key)
