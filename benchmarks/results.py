"""The benchmark results file: every published figure, with how it was measured.

Each benchmark calls `record` with the figures it measured in one run. They
are merged by key into `benchmarks/results/latest.json`; each entry holds the
value, its unit, the command that measured it, the git commit, the date and a
description of the machine. `python -m benchmarks.report` renders the file
into the Markdown tables of the README and docs, so no figure is typed by hand.

A ratio of two timings is recorded as a `Ratio` (`benchmarks.common.paired_ratio`):
the median over interleaved rounds (A, B, A, B, ...) with the lowest and highest
round, so one noisy minute does not decide the figure. A ratio whose median
lies above its physical limit is refused unless it carries a note saying why.

Recording into the committed file re-renders the README and docs tables
(`benchmarks.report`), so running one benchmark leaves a consistent checkout.
`DISTILL_BENCH_RESULTS=path` writes elsewhere and renders nothing (tests use it
so that they never touch the committed file).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from benchmarks import report
from benchmarks.report import LATEST, RESULTS_DIR
ENV_PATH = "DISTILL_BENCH_RESULTS"


@dataclass(frozen=True)
class Ratio:
  """A ratio measured over interleaved rounds: the median, the lowest and highest round, the round count.

  `limit` is the ratio's physical upper bound (None: unbounded); a median above
  it needs a `note` saying why, or the ratio is refused.
  """

  value: float
  low: float
  high: float
  rounds: int
  limit: float | None = None
  note: str | None = None

  def __post_init__(self):
    if not self.low <= self.value <= self.high:
      raise ValueError(f"ratio median {self.value} outside its rounds' range [{self.low}, {self.high}]")
    if self.limit is not None and self.value > self.limit and not self.note:
      raise ValueError(f"ratio {self.value:.4g} is above its physical limit {self.limit} and no note says why")


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
  jax = sys.modules.get("jax")
  if jax is not None:  # only describe devices a benchmark already initialised: importing jax here would start one
    devices = jax.devices()
    if devices and devices[0].platform != "cpu":
      accelerator = f"{len(devices)} x {devices[0].device_kind}"
  return {"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
          else os.cpu_count(), "accelerator": accelerator}


def _changed_outside_outputs(paths: list[str], repo: Path | None = None) -> bool:
  """Whether any changed tracked file differs from HEAD in more than what the benchmarks write.

  The benchmarks write the results files and the rendered tables of the README
  and docs; a change limited to those is their own output, not a change of the
  code that measured.
  """
  repo = repo or report.REPO
  documents = {str(p.relative_to(repo)) for p in report.documents(repo)}
  for path in paths:
    if path.startswith("benchmarks/results/"):
      continue
    if path not in documents:
      return True
    head = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=repo, text=True, capture_output=True, timeout=10)
    now = repo / path
    if head.returncode or not now.exists():
      return True
    if report.MARKER.sub("", head.stdout) != report.MARKER.sub("", now.read_text()):
      return True
  return False


def git_commit() -> str | None:
  """The short HEAD commit, `+dirty` when tracked files differ in more than the benchmarks' own output."""
  try:
    out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=RESULTS_DIR.parent, text=True,
                         capture_output=True, timeout=10)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if out.returncode:
    return None
  changed = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=RESULTS_DIR.parent,
                           text=True, capture_output=True, timeout=10).stdout.split()
  return out.stdout.strip() + ("+dirty" if _changed_outside_outputs(changed) else "")


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


def record(figures: Mapping[str, tuple[float | Ratio, str]], *, command: str | None = None,
           path: Path | None = None, commit: str | None = None) -> dict[str, dict]:
  """Merges `{key: (value or Ratio, unit)}` into the results file; returns the entries written.

  The read-merge-write runs under an exclusive lock, and the file is replaced
  atomically, so benchmarks running side by side never lose each other's keys.
  A `Ratio` adds `low`, `high`, `rounds` (and `limit`, `note` where set) to its entry.
  Writing the committed file re-renders the README and docs tables from it.
  `commit`: the commit measured, where a benchmark measures a clean clone rather than this checkout.
  """
  path = path or results_path()
  path.parent.mkdir(parents=True, exist_ok=True)
  stamp = {"command": command or invocation(), "commit": commit or git_commit(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine()}
  entries = {}
  for key, (value, unit) in figures.items():
    spread = {}
    if isinstance(value, Ratio):
      spread = {"low": value.low, "high": value.high, "rounds": value.rounds}
      spread.update({name: getattr(value, name) for name in ("limit", "note") if getattr(value, name) is not None})
      value = value.value
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
      raise ValueError(f"benchmark figure {key!r} is not finite: {value}")
    entries[key] = {"value": value, "unit": unit, **spread, **stamp}
  with open(path.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    merged = load(path)
    merged.update(entries)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(merged.items())), indent=2) + "\n")
    os.replace(tmp, path)
  for key, entry in entries.items():
    print(f"recorded {key} = {entry['value']:.6g} {entry['unit']}  ({path})", flush=True)
  if path.resolve() == LATEST.resolve():
    report.main([])  # the committed tables follow the committed results
  return entries
