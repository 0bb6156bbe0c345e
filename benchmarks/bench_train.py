"""Train-step throughput: CE-only vs distillation from a local (co-located) teacher.

    python -m benchmarks.bench_train [--student demo_student] [--teacher demo_teacher] [--steps 30]

Both runs use the same student, data and batch shape in one process. Throughput
is taken from the trainer's own `perf/tokens_per_s`, over the log intervals
after the first (which holds compilation). The ratio KD / CE is the price of
running the teacher forward next to the student.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from distill_core.config import load_config
from student_trainer.config import TrainConfig
from student_trainer.train import run


def measure(name: str, data: str, out: Path, args, *extra: str) -> float:
  overrides = [f"run_dir={out / name}", f"data.path={data}", f"data.batch_size={args.batch_size}",
               f"steps={args.steps}", f"model={args.student}", f"logging.every_steps={args.interval}",
               "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0", "eval.batches=1",
               "checkpoint.every_steps=1000000", "checkpoint.async_save=false", "export_hf=false",
               "checkpoint.resume=false", *extra]
  run(load_config(TrainConfig, None, overrides))
  rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
  rates = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][1:]  # drop the compile interval
  if not rates:
    raise SystemExit(f"{name}: too few steps for a measurement; raise --steps above --interval")
  return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--data", default="data/stdlib", help="Prepared dataset (python -m distill_core.prepare).")
  parser.add_argument("--student", default="demo_student", help="Student model preset.")
  parser.add_argument("--teacher", default="demo_teacher", help="Teacher model preset (random weights).")
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--interval", type=int, default=5, help="Steps per throughput sample.")
  parser.add_argument("--top-k", type=int, default=64)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp)
    ce = measure("ce", args.data, out, args, "teacher.source=none")
    kd = measure("kd_local", args.data, out, args, "teacher.source=local", f"teacher.local.model={args.teacher}",
                 f"loss.top_k={args.top_k}")
  print(f"student {args.student}, teacher {args.teacher}, batch {args.batch_size}, k={args.top_k}")
  print(f"CE-only          : {ce:10.0f} tokens/s")
  print(f"KD, local teacher: {kd:10.0f} tokens/s")
  print(f"ratio KD/CE      : {kd / ce:10.3f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
