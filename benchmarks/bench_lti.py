"""Learn-to-init on the demo pair: first-step and step-N loss of a random student vs LTI-initialised ones.

    python -m benchmarks.bench_lti                  # 40 steps per row, 9 rows (about 30 minutes on 2 CPU cores)
    python -m benchmarks.bench_lti --steps 20       # shorter

The demo student (configs/models/demo_student.yaml) is distilled from the demo
teacher (runs/demo/teacher/hf, trained with configs/demo/teacher.yaml as
`make demo` does, unless a finished one with the same settings and code is
there) with the same data, seed, optimizer and KD loss (local teacher, `tail`,
k = 64, alpha = 0.7), once per row:

- `random`: the student's usual random initialisation;
- `select_identity`, `average_identity`, `select_svd`: LTI with that A / B
  initialisation (A: head selection or averaging; B: truncated rotary identity
  or top singular directions), with the layer map and the copies (embedding,
  norms) of configs/demo/lti.yaml, everything trainable;
- `general`: the general map W, started equal to select/identity;
- `narrow_*`: the same for a narrower student (3 query heads, 1 kv head, head
  dim 16 instead of 2, 1, 32): the demo student has fewer heads than the
  teacher, so the A choices differ there, but equal head dims, where the B
  choices start as the same function; head dim 16 makes them differ.

It records, per row, the CE and KD loss of the first step (the initialisation,
measured on the first batch before any update) and of step N (the mean of the
last 5 steps), in nats per token, into benchmarks/results/latest.json (keys
`lti_<row>_{first,final}_{ce,kd}`, defined in benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.bench_train import HelpFormatter
from benchmarks.results import record
from distill_core import harness

ROWS = {
    "random": [],
    "select_identity": ["lti.a_init=select", "lti.b_init=identity"],
    "average_identity": ["lti.a_init=average", "lti.b_init=identity"],
    "select_svd": ["lti.a_init=select", "lti.b_init=svd"],
    "general": ["lti.map=general"],
}
# The demo pair has equal head dims, where every B choice starts as the same function; a narrower
# student (3 query heads, 1 kv head, head dim 16) makes them differ.
NARROW = ["model.preset=demo_student", "model.num_attention_heads=3", "model.num_key_value_heads=1",
          "model.head_dim=16"]
ROWS.update({f"narrow_{name}": NARROW + ROWS[name] for name in ("random", "select_identity", "average_identity",
                                                                 "select_svd")})
TAIL = 5  # steps averaged for the step-N figure


def lti_overrides(teacher_hf: Path) -> list[str]:
  """The LTI part of configs/demo/lti.yaml with the kernels read from the teacher's HF directory."""
  return ["--config", "configs/demo/lti.yaml", "lti.kernels_from=hf", f"lti.kernels_path={teacher_hf}"]


def run_row(name: str, extra: list[str], args, teacher_hf: Path) -> dict[str, float]:
  run_dir = Path(args.out) / name
  if name.endswith("random"):
    base = ["--config", "configs/demo/student_local.yaml"]
  else:
    base = lti_overrides(teacher_hf)
  overrides = [f"run_dir={run_dir}", f"data.path={args.data}", f"steps={args.steps}", "logging.every_steps=1",
               "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0", "eval.batches=2",
               f"checkpoint.every_steps={args.steps}", "checkpoint.resume=false", "export_hf=false",
               "teacher.source=local", f"teacher.local.hf_checkpoint={teacher_hf}", "lti.collapse_at_end=false",
               *extra]
  if run_dir.exists():
    shutil.rmtree(run_dir)
  run_dir.mkdir(parents=True)
  harness.run_trainer([*base, *overrides], log_path=run_dir / "train.log")
  rows = harness.read_metrics(run_dir, "train/kd_loss")
  if len(rows) < args.steps:
    raise SystemExit(f"{name}: {len(rows)} logged steps, expected {args.steps}")
  last = rows[-TAIL:]
  return {"first_ce": rows[0]["train/ce_loss"], "first_kd": rows[0]["train/kd_loss"],
          "final_ce": sum(r["train/ce_loss"] for r in last) / len(last),
          "final_kd": sum(r["train/kd_loss"] for r in last) / len(last)}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
  parser.add_argument("--data", default="data/stdlib", help="Prepared dataset (prepared here when missing).")
  parser.add_argument("--teacher", default="runs/demo/teacher",
                      help="Run directory of the demo teacher (trained with configs/demo/teacher.yaml, as `make demo` "
                      "does, unless a finished one with the same settings and code is there); its HF export is "
                      "<teacher>/hf.")
  parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per row (N of 'step N').")
  parser.add_argument("--rows", default=",".join(ROWS), help=f"Comma-separated rows out of {', '.join(ROWS)}.")
  parser.add_argument("--out", default="runs/bench_lti", help="Directory for the runs.")
  args = parser.parse_args(argv)
  if args.steps <= TAIL:
    parser.error(f"--steps must exceed {TAIL}")
  rows = args.rows.split(",")
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
  harness.ensure_corpus(args.data)
  teacher_hf = harness.ensure_demo_teacher(args.teacher, args.data)
  figures = {}
  print(f"{'row':<18} {'first CE':>9} {'first KD':>9} {f'step {args.steps} CE':>11} {f'step {args.steps} KD':>11}")
  for name in rows:
    m = run_row(name, ROWS[name], args, teacher_hf)
    print(f"{name:<18} {m['first_ce']:9.3f} {m['first_kd']:9.3f} {m['final_ce']:11.3f} {m['final_kd']:11.3f}",
          flush=True)
    figures.update({f"lti_{name}_{k}": (v, "nats") for k, v in m.items()})
  figures["lti_steps"] = (float(args.steps), "steps")
  record(figures)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
