"""Runs every benchmark with its defaults, one after another (`make bench`).

Each benchmark measures its own ratios within one run; running them in
separate processes keeps one's compiled programs and threads out of another's
measurement. Each records its figures in benchmarks/results/latest.json; at the
end the README and docs tables are rendered from it (`python -m benchmarks.report`).
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("benchmarks.bench_train", "benchmarks.bench_server", "benchmarks.bench_streaming", "benchmarks.bench_lti",
              "benchmarks.bench_faults", "benchmarks.bench_offline", "benchmarks.bench_blockwise",
              "benchmarks.bench_sampled")


def main() -> int:
  failed = []
  for module in BENCHMARKS:
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
