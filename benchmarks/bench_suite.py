"""How long the test suite takes on a fresh clone: `make test-unit` and `make test`, as a developer runs them.

    python -m benchmarks.bench_suite                     # clone HEAD, `make setup`, then time both targets
    python -m benchmarks.bench_suite --venv .venv        # reuse this environment instead of installing one
    python -m benchmarks.bench_suite --dry-run           # clone and print what would run (`make -n`), time nothing
    python -m benchmarks.bench_suite --venv .venv --cold-cache --baseline 03cf9b1 --rounds 2
                                                         # `make test` against an older commit's, interleaved

The current commit (HEAD, not uncommitted changes) is cloned into a temporary
directory. Its environment is either installed there with `make setup` (the
first step of both targets on a fresh machine; timed, printed, never recorded:
it measures the network as much as the project) or, with `--venv`, an existing
one linked in (make is told not to rebuild it). Then `make test-unit` and
`make test` run one after the other in the clone, each timed from start to
exit. Both share the machine's JAX compilation cache, as a developer's runs do
(`--cold-cache` gives each run an empty one instead, as on a fresh machine). The
walls and the test counts pytest reports are recorded in the benchmark results
file (benchmarks/results.py); a failing target records nothing.

`--baseline REV` clones that commit too, in the same way and with the same
environment, and times its `make test` (only that target) beside HEAD's in
interleaved rounds (`--rounds`; the order alternates, baseline first in the
first round) so that both see the same machine: the ratio of the walls is
recorded as the median over rounds with its spread, and each side's wall as
its median. Figures measured with `--cold-cache` are keyed `suite_cold_*`,
beside the `suite_*` ones of a machine that has run the suite before.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import paired_ratio
from benchmarks.results import record

REPO = Path(__file__).resolve().parent.parent
STAMP = ".venv/.installed"  # the Makefile's install stamp, relative to the checkout
LINKED = ["-o", STAMP]  # make's flags for a linked environment: never rebuild (nor reinstall into) it
TARGETS = ("test-unit", "test")
SUMMARY = re.compile(r"^=* ?(?P<counts>(?:\d+ \w+(?:, )?)+) in [\d.]+s", re.M)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--venv", default=None,
                 help="an installed environment to link in as the clone's .venv (none: `make setup` installs one)")
  p.add_argument("--cold-cache", action="store_true",
                 help="give each run an empty JAX compilation cache instead of this machine's (a fresh machine)")
  p.add_argument("--baseline", default=None, metavar="REV",
                 help="also time `make test` of this commit (a fresh clone, the same environment), interleaved "
                      "with HEAD's, and record HEAD's wall over the baseline's")
  p.add_argument("--rounds", type=int, default=1,
                 help="timed `make test` runs of each side (with --baseline: interleaved rounds, order alternating)")
  p.add_argument("--dry-run", action="store_true",
                 help="clone and print the commands each target would run (`make -n`); time and record nothing")
  return p.parse_args(argv)


def pytest_counts(output: str) -> dict[str, int]:
  """{outcome: count} from pytest's last summary line (`12 passed, 3 skipped, 4 deselected in 5.67s`)."""
  found = SUMMARY.findall(output)
  if not found:
    raise ValueError(f"no pytest summary line in the output:\n{output[-2000:]}")
  return {word: int(number) for number, word in re.findall(r"(\d+) (\w+)", found[-1])}


def run_order(sides: list[str], rounds: int) -> list[str]:
  """The sides' runs, round after round, the order alternating: the last side first in the first round
  (the baseline, listed after HEAD), so neither always runs on the machine the other just warmed."""
  return [side for i in range(rounds) for side in (sides if i % 2 else sides[::-1])]


def resolve(rev: str, option: str = "--baseline") -> str:
  """The full commit id of `rev` in this repository; a clear error naming `option` when there is none."""
  out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=REPO, text=True,
                       capture_output=True)
  if out.returncode:
    raise SystemExit(f"bench_suite: {option} {rev[:80]!r}: no such commit in {REPO}")
  return out.stdout.strip()


def clone(into: Path, commit: str, name: str = "checkout") -> Path:
  checkout = into / name
  subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(checkout)], check=True)
  subprocess.run(["git", "checkout", "--quiet", commit], cwd=checkout, check=True)
  return checkout


def link_or_install(checkout: Path, venv: Path | None) -> list[str]:
  """Links `venv` in as the checkout's .venv (make's flags then keep make from rebuilding it), or runs
  `make setup` there (timed, printed, not recorded). Returns the flags for every later make."""
  if venv is None:
    setup_wall, _ = make(checkout, "setup")
    print(f"make setup in {checkout.name}: {setup_wall:.0f} s (not recorded)", flush=True)
    return []
  (checkout / ".venv").symlink_to(venv)
  return list(LINKED)


def make(checkout: Path, target: str, *flags: str, env: dict[str, str] | None = None,
         failed_tests_ok: bool = False) -> tuple[float, str]:
  """(wall seconds, output) of `make TARGET` in `checkout`; raises with the output's tail when it fails.

  `failed_tests_ok`: a run whose tests ran to the end with some failing (pytest's exit code 1, a
  summary line printed) still counts; the caller reads the failures from the counts."""
  start = time.monotonic()
  out = subprocess.run(["make", *flags, target], cwd=checkout, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
  wall = time.monotonic() - start
  ran_through = failed_tests_ok and SUMMARY.search(out.stdout) and "failed" in pytest_counts(out.stdout)
  if out.returncode and not ran_through:
    raise RuntimeError(f"`make {target}` failed with {out.returncode} after {wall:.0f} s:\n{out.stdout[-4000:]}")
  return wall, out.stdout


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.rounds < 1:
    print(f"bench_suite: --rounds {args.rounds}: at least 1", file=sys.stderr)
    return 2
  venv = None
  if args.venv:
    venv = Path(args.venv).resolve()
    if not (venv / "bin" / "python").exists():
      print(f"--venv {args.venv}: no bin/python there", file=sys.stderr)
      return 2
  head = resolve("HEAD", "the checkout's")
  base = resolve(args.baseline) if args.baseline else None
  with tempfile.TemporaryDirectory(prefix="bench_suite_") as tmp:
    runs = 0

    def timed(checkout: Path, target: str, flags: list[str], **kw) -> tuple[float, dict[str, int]]:
      nonlocal runs
      runs += 1
      env = dict(os.environ)
      if args.cold_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(Path(tmp) / f"jax-cache-{runs}")
      wall, output = make(checkout, target, *flags, env=env, **kw)
      counts = pytest_counts(output)
      print(f"make {target} in {checkout.name}: {wall:.0f} s, {counts}", flush=True)
      return wall, counts

    checkout = clone(Path(tmp), head)
    if args.dry_run:
      flags = list(LINKED) if venv else []
      for target in TARGETS:
        print(f"$ make {' '.join([*flags, target])}   # in {checkout}")
        print(subprocess.run(["make", "-n", *flags, target], cwd=checkout, text=True, capture_output=True,
                             check=True).stdout.rstrip())
      return 0
    flags = link_or_install(checkout, venv)
    sides = {"head": (checkout, flags)}
    if base:
      old = clone(Path(tmp), base, name=f"baseline-{base[:12]}")
      sides["baseline"] = (old, link_or_install(old, venv))

    prefix = "suite_cold" if args.cold_cache else "suite"  # a fresh machine's figures beside a developer's
    figures: dict[str, tuple[object, str]] = {}
    if not base:  # the baseline comparison times `make test` alone (an older commit may lack the split)
      wall, counts = timed(checkout, "test-unit", flags)
      figures[f"{prefix}_unit_wall_s"] = (wall, "s")
      figures[f"{prefix}_unit_tests"] = (counts.get("passed", 0), "tests")
    walls: dict[str, list[float]] = {side: [] for side in sides}
    passed: dict[str, int] = {}
    failed = 0
    for side in run_order(list(sides), args.rounds):
      where, side_flags = sides[side]
      # An older commit may hold a test that fails on this machine: its suite still ran to the end.
      wall, counts = timed(where, "test", side_flags, failed_tests_ok=side == "baseline")
      walls[side].append(wall)
      passed[side] = counts.get("passed", 0)
      if side == "baseline":
        failed = max(failed, counts.get("failed", 0))
    figures[f"{prefix}_full_wall_s"] = (statistics.median(walls["head"]), "s")
    figures[f"{prefix}_full_tests"] = (passed["head"], "tests")
    if base:
      figures[f"{prefix}_baseline_full_wall_s"] = (statistics.median(walls["baseline"]), "s")
      figures[f"{prefix}_baseline_full_tests"] = (passed["baseline"], "tests")
      figures[f"{prefix}_baseline_full_failed"] = (failed, "tests")
      figures[f"{prefix}_full_over_baseline"] = (paired_ratio(walls["head"], walls["baseline"]), "ratio")
      print(f"make test: HEAD {walls['head']} s, baseline {base[:12]} {walls['baseline']} s", flush=True)
  record(figures, commit=head[:12])  # the clone's commit: edits to this checkout meanwhile measured nothing
  return 0


if __name__ == "__main__":
  sys.exit(main())
