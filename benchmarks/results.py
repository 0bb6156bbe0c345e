"""The benchmark results file: every published figure, with how it was measured.

Each benchmark calls `record` with the figures it measured in one run. They
are merged by key into `benchmarks/results/latest.json`; each entry holds the
value, its unit, the command that measured it, the git commit, the date and a
description of the machine. `python -m benchmarks.report` renders the file
into the Markdown tables of the README and docs, so no figure is typed by hand.

`DISTILL_BENCH_RESULTS=path` writes elsewhere (tests use it so that they never
touch the committed file).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Mapping

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATEST = RESULTS_DIR / "latest.json"
ENV_PATH = "DISTILL_BENCH_RESULTS"


def results_path() -> Path:
  """Where `record` writes: $DISTILL_BENCH_RESULTS, else benchmarks/results/latest.json."""
  return Path(os.environ.get(ENV_PATH) or LATEST)


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, object]:
  """CPU model, cores and accelerator (None on a CPU-only machine) of this process."""
  accelerator = None
  if "jax" in sys.modules:  # only describe devices a benchmark already initialised
    import jax
    devices = jax.devices()
    if devices and devices[0].platform != "cpu":
      accelerator = f"{len(devices)} x {devices[0].device_kind}"
  return {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count(), "accelerator": accelerator}


def git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=RESULTS_DIR.parent, text=True,
                         capture_output=True, timeout=10)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if out.returncode:
    return None
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=RESULTS_DIR.parent,
                         text=True, capture_output=True, timeout=10).stdout.strip()
  return out.stdout.strip() + ("+dirty" if dirty else "")


def invocation() -> str:
  """The command line of this process as a user would type it (`python -m module args`)."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  head = ["python", "-m", spec.name] if spec and spec.name else ["python", *sys.argv[:1]]
  return shlex.join(head + sys.argv[1:])


def load(path: Path | None = None) -> dict[str, dict]:
  path = path or results_path()
  if not path.exists():
    return {}
  return json.loads(path.read_text())


def record(figures: Mapping[str, tuple[float, str]], *, command: str | None = None,
           path: Path | None = None) -> dict[str, dict]:
  """Merges `{key: (value, unit)}` into the results file; returns the entries written.

  The read-merge-write runs under an exclusive lock, and the file is replaced
  atomically, so benchmarks running side by side never lose each other's keys.
  """
  path = path or results_path()
  path.parent.mkdir(parents=True, exist_ok=True)
  stamp = {"command": command or invocation(), "commit": git_commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine()}
  entries = {}
  for key, (value, unit) in figures.items():
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
      raise ValueError(f"benchmark figure {key!r} is not finite: {value}")
    entries[key] = {"value": value, "unit": unit, **stamp}
  with open(path.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    merged = load(path)
    merged.update(entries)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=2) + "\n")
    os.replace(tmp, path)
  for key, entry in entries.items():
    print(f"recorded {key} = {entry['value']:.6g} {entry['unit']}  ({path})", flush=True)
  return entries
