"""Runs every benchmark with its defaults, one after another (`make bench`).

    python -m benchmarks.run_all                                   # all of them
    python -m benchmarks.run_all benchmarks.bench_server benchmarks.bench_streaming   # only these

Each benchmark measures its own ratios within one run (interleaved rounds);
running them in separate processes keeps one's compiled programs and threads
out of another's measurement. Each records its figures in
benchmarks/results/latest.json and re-renders the README and docs tables from
it; a last `python -m benchmarks.report` checks nothing was left stale.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

BENCHMARKS = ("benchmarks.bench_train", "benchmarks.bench_server", "benchmarks.bench_streaming", "benchmarks.bench_lti",
              "benchmarks.bench_faults", "benchmarks.bench_offline", "benchmarks.bench_blockwise",
              "benchmarks.bench_sampled", "benchmarks.bench_on_policy")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("modules", nargs="*", metavar="MODULE",
                      help=f"benchmarks to run, in this order (default: all of {', '.join(BENCHMARKS)})")
  modules = parser.parse_args(argv).modules or BENCHMARKS
  unknown = [m for m in modules if m not in BENCHMARKS]
  if unknown:
    parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
  failed = []
  for module in modules:
    print(f"\n=== {module}", flush=True)
    if subprocess.run([sys.executable, "-m", module]).returncode:
      failed.append(module)
  print("\n=== benchmarks.report", flush=True)
  if subprocess.run([sys.executable, "-m", "benchmarks.report"]).returncode:
    failed.append("benchmarks.report")
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  raise SystemExit(main())
