"""How long the test suite takes on a fresh clone: `make test-unit` and `make test`, as a developer runs them.

    python -m benchmarks.bench_suite                     # clone HEAD, `make setup`, then time both targets
    python -m benchmarks.bench_suite --venv .venv        # reuse this environment instead of installing one
    python -m benchmarks.bench_suite --dry-run           # clone and print what would run (`make -n`), time nothing

The current commit (HEAD, not uncommitted changes) is cloned into a temporary
directory. Its environment is either installed there with `make setup` (the
first step of both targets on a fresh machine; timed, printed, never recorded:
it measures the network as much as the project) or, with `--venv`, an existing
one linked in (make is told not to rebuild it). Then `make test-unit` and
`make test` run one after the other in the clone, each timed from start to
exit. Both share the machine's JAX compilation cache, as a developer's runs do
(`--cold-cache` gives each target an empty one instead). The walls and the
test counts pytest reports are recorded in the benchmark results file
(benchmarks/results.py); a failing target records nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.results import record

REPO = Path(__file__).resolve().parent.parent
STAMP = ".venv/.installed"  # the Makefile's install stamp, relative to the checkout
TARGETS = {"test-unit": "suite_unit", "test": "suite_full"}
SUMMARY = re.compile(r"^=* ?(?P<counts>(?:\d+ \w+(?:, )?)+) in [\d.]+s", re.M)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--venv", default=None,
                 help="an installed environment to link in as the clone's .venv (none: `make setup` installs one)")
  p.add_argument("--cold-cache", action="store_true",
                 help="give each target an empty JAX compilation cache instead of this machine's")
  p.add_argument("--dry-run", action="store_true",
                 help="clone and print the commands each target would run (`make -n`); time and record nothing")
  return p.parse_args(argv)


def pytest_counts(output: str) -> dict[str, int]:
  """{outcome: count} from pytest's last summary line (`12 passed, 3 skipped, 4 deselected in 5.67s`)."""
  found = SUMMARY.findall(output)
  if not found:
    raise ValueError(f"no pytest summary line in the output:\n{output[-2000:]}")
  return {word: int(number) for number, word in re.findall(r"(\d+) (\w+)", found[-1])}


def clone(into: Path) -> Path:
  checkout = into / "checkout"
  subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(REPO), str(checkout)], check=True)
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, text=True, capture_output=True, check=True).stdout
  subprocess.run(["git", "checkout", "--quiet", head.strip()], cwd=checkout, check=True)
  return checkout


def make(checkout: Path, target: str, *flags: str, env: dict[str, str] | None = None) -> tuple[float, str]:
  """(wall seconds, output) of `make TARGET` in `checkout`; raises with the output's tail when it fails."""
  start = time.monotonic()
  out = subprocess.run(["make", *flags, target], cwd=checkout, env=env, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
  wall = time.monotonic() - start
  if out.returncode:
    raise RuntimeError(f"`make {target}` failed with {out.returncode} after {wall:.0f} s:\n{out.stdout[-4000:]}")
  return wall, out.stdout


def main(argv=None) -> int:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="bench_suite_") as tmp:
    checkout = clone(Path(tmp))
    flags: list[str] = []
    if args.venv:
      venv = Path(args.venv).resolve()
      if not (venv / "bin" / "python").exists():
        print(f"--venv {args.venv}: no bin/python there", file=sys.stderr)
        return 2
      (checkout / ".venv").symlink_to(venv)
      flags = ["-o", STAMP]  # linked, not installed: never rebuild (and never reinstall into) that environment
    if args.dry_run:
      for target in TARGETS:
        print(f"$ make {' '.join([*flags, target])}   # in {checkout}")
        print(subprocess.run(["make", "-n", *flags, target], cwd=checkout, text=True, capture_output=True,
                             check=True).stdout.rstrip())
      return 0
    if not args.venv:
      setup_wall, _ = make(checkout, "setup")
      print(f"make setup: {setup_wall:.0f} s (not recorded)", flush=True)
    figures: dict[str, tuple[float, str]] = {}
    for target, key in TARGETS.items():
      env = dict(os.environ)
      if args.cold_cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(Path(tmp) / f"jax-cache-{target}")
      wall, output = make(checkout, target, *flags, env=env)
      counts = pytest_counts(output)
      print(f"make {target}: {wall:.0f} s, {counts}", flush=True)
      figures[f"{key}_wall_s"] = (wall, "s")
      figures[f"{key}_tests"] = (counts.get("passed", 0), "tests")
  record(figures)
  return 0


if __name__ == "__main__":
  sys.exit(main())
