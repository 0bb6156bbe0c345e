"""Train-step throughput: CE-only vs sparse KD from targets in memory vs a local (co-located) teacher.

    python -m benchmarks.bench_train [--student demo_student] [--teacher demo_teacher] [--steps 30]

All three runs use the same student, data and batch shape in one process.
Throughput is taken from the trainer's own `perf/tokens_per_s`, over the log
intervals after the first (which holds compilation).

- CE only: no teacher.
- KD from memory: the teacher's targets for every batch are computed first and
  handed to the train loop from memory, so the run pays only for the sparse KD
  loss; `kd_overhead_over_ce` = this / CE only (the physical limit is 1.0).
- KD with a local teacher: the teacher's forward runs next to the student's;
  `kd_local_over_ce` = this / CE only.

The three runs are interleaved over `--rounds` rounds (CE, memory, local, CE,
...), so a neighbour's load on a shared machine hits both sides of each ratio
alike; each ratio is the median of its rounds' ratios, recorded with the lowest
and highest round (benchmarks.common.paired_ratio). The figures are recorded in
the benchmark results file (benchmarks/results.py).
`--data` defaults to data/stdlib; it is prepared (`python -m distill_core.prepare`)
when missing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from benchmarks.common import interleaved, paired_ratio, precompute_targets, run_from_memory
from benchmarks.results import record
from distill_core.config import load_config
from distill_core.harness import ensure_corpus, read_metrics
from student_trainer.config import TrainConfig
from student_trainer.train import run


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The module docstring as written, and every option's default."""


def overrides(name: str, data: str, out: Path, args, *extra: str) -> list[str]:
  return [f"run_dir={out / name}", f"data.path={data}", f"data.batch_size={args.batch_size}",
          f"steps={args.steps}", f"model={args.student}", f"logging.every_steps={args.interval}",
          "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0", "eval.batches=1",
          "checkpoint.every_steps=1000000", "checkpoint.async_save=false", "export_hf=false",
          "checkpoint.resume=false", *extra]


def throughput(run_dir: Path, name: str) -> float:
  rates = [r["perf/tokens_per_s"] for r in read_metrics(run_dir, "perf/tokens_per_s")][1:]  # drop the compile interval
  if not rates:
    raise SystemExit(f"{name}: too few steps for a measurement; raise --steps above --interval")
  return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
  parser.add_argument("--data", default="data/stdlib", help="Prepared dataset (prepared here when missing).")
  parser.add_argument("--student", default="demo_student", help="Student model preset.")
  parser.add_argument("--teacher", default="demo_teacher", help="Teacher model preset (random weights).")
  parser.add_argument("--batch-size", type=int, default=8, help="Global batch size.")
  parser.add_argument("--steps", type=int, default=30, help="Steps per run, the first interval included.")
  parser.add_argument("--interval", type=int, default=5, help="Steps per throughput sample.")
  parser.add_argument("--top-k", type=int, default=64, help="Teacher top-k of both KD runs.")
  parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of the three runs.")
  args = parser.parse_args(argv)
  ensure_corpus(args.data)
  kd = ("teacher.source=local", f"teacher.local.model={args.teacher}", f"loss.top_k={args.top_k}")
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp)
    configs = {name: load_config(TrainConfig, None, overrides(name, args.data, out, args, *extra))
               for name, extra in (("ce", ("teacher.source=none",)), ("kd_memory", kd), ("kd_local", kd))}
    targets = precompute_targets(configs["kd_memory"], args.steps)

    def measure(name: str):
      def once() -> float:
        shutil.rmtree(out / name, ignore_errors=True)  # a fresh run: no checkpoint, no earlier round's metrics
        if name == "kd_memory":
          run_from_memory(configs[name], list(targets))
        else:
          run(configs[name])
        return throughput(out / name, name)
      return once

    rounds = interleaved({name: measure(name) for name in configs}, args.rounds)
  ce, memory, local = (statistics.median(rounds[name]) for name in configs)
  overhead = paired_ratio(rounds["kd_memory"], rounds["ce"], limit=1.0,
                          why="the KD step does the CE step's work and more")
  colocated = paired_ratio(rounds["kd_local"], rounds["ce"], limit=1.0,
                           why="the local-teacher step does the CE step's work and the teacher's forward")
  print(f"student {args.student}, teacher {args.teacher}, batch {args.batch_size}, k={args.top_k}, "
        f"{args.rounds} interleaved rounds (medians; ratios: median of the rounds' ratios [lowest, highest])")
  print(f"CE-only                : {ce:10.0f} tokens/s")
  print(f"KD, targets in memory  : {memory:10.0f} tokens/s   ratio to CE {overhead.value:.3f} "
        f"[{overhead.low:.3f}, {overhead.high:.3f}]")
  print(f"KD, local teacher      : {local:10.0f} tokens/s   ratio to CE {colocated.value:.3f} "
        f"[{colocated.low:.3f}, {colocated.high:.3f}]")
  for ratio in (overhead, colocated):
    if ratio.note:
      print(f"note: {ratio.note}")
  record({"ce_tokens_per_s": (ce, "tokens/s"), "kd_memory_tokens_per_s": (memory, "tokens/s"),
          "kd_local_tokens_per_s": (local, "tokens/s"), "kd_overhead_over_ce": (overhead, "ratio"),
          "kd_local_over_ce": (colocated, "ratio")})
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
