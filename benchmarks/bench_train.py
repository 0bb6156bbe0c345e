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

The figures are recorded in the benchmark results file (benchmarks/results.py).
`--data` defaults to data/stdlib; it is prepared (`python -m distill_core.prepare`)
when missing.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from distill_core.config import load_config
from student_trainer.config import TrainConfig
from student_trainer.train import run


def overrides(name: str, data: str, out: Path, args, *extra: str) -> list[str]:
  return [f"run_dir={out / name}", f"data.path={data}", f"data.batch_size={args.batch_size}",
          f"steps={args.steps}", f"model={args.student}", f"logging.every_steps={args.interval}",
          "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0", "eval.batches=1",
          "checkpoint.every_steps=1000000", "checkpoint.async_save=false", "export_hf=false",
          "checkpoint.resume=false", *extra]


def throughput(run_dir: Path, name: str) -> float:
  from student_trainer.metrics import read_metrics
  rows = read_metrics(run_dir)
  rates = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][1:]  # drop the compile interval
  if not rates:
    raise SystemExit(f"{name}: too few steps for a measurement; raise --steps above --interval")
  return statistics.median(rates)


def ensure_data(path: str) -> None:
  """Prepares the default corpus into `path` when it holds no prepared dataset yet."""
  if not (Path(path) / "manifest.json").exists():
    from distill_core.prepare import PrepareConfig, prepare
    print(f"{path}: no prepared dataset, preparing it (python -m distill_core.prepare output_dir={path})",
          flush=True)
    prepare(PrepareConfig(output_dir=path))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default="data/stdlib", help="Prepared dataset (prepared here when missing).")
  parser.add_argument("--student", default="demo_student", help="Student model preset.")
  parser.add_argument("--teacher", default="demo_teacher", help="Teacher model preset (random weights).")
  parser.add_argument("--batch-size", type=int, default=8, help="Global batch size.")
  parser.add_argument("--steps", type=int, default=30, help="Steps per run, the first interval included.")
  parser.add_argument("--interval", type=int, default=5, help="Steps per throughput sample.")
  parser.add_argument("--top-k", type=int, default=64, help="Teacher top-k of both KD runs.")
  args = parser.parse_args(argv)
  ensure_data(args.data)
  from benchmarks.common import precompute_targets, run_from_memory
  from benchmarks.results import record
  kd = ("teacher.source=local", f"teacher.local.model={args.teacher}", f"loss.top_k={args.top_k}")
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp)
    run(load_config(TrainConfig, None, overrides("ce", args.data, out, args, "teacher.source=none")))
    ce = throughput(out / "ce", "ce")
    cfg = load_config(TrainConfig, None, overrides("kd_memory", args.data, out, args, *kd))
    run_from_memory(cfg, precompute_targets(cfg, args.steps))
    memory = throughput(out / "kd_memory", "kd_memory")
    run(load_config(TrainConfig, None, overrides("kd_local", args.data, out, args, *kd)))
    local = throughput(out / "kd_local", "kd_local")
  print(f"student {args.student}, teacher {args.teacher}, batch {args.batch_size}, k={args.top_k}")
  print(f"CE-only                : {ce:10.0f} tokens/s")
  print(f"KD, targets in memory  : {memory:10.0f} tokens/s   ratio to CE {memory / ce:.3f}")
  print(f"KD, local teacher      : {local:10.0f} tokens/s   ratio to CE {local / ce:.3f}")
  record({"ce_tokens_per_s": (ce, "tokens/s"), "kd_memory_tokens_per_s": (memory, "tokens/s"),
          "kd_local_tokens_per_s": (local, "tokens/s"), "kd_overhead_over_ce": (memory / ce, "ratio"),
          "kd_local_over_ce": (local / ce, "ratio")})
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
