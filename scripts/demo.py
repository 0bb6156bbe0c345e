"""End-to-end demo on built-in defaults (run by `make demo`).

1. prepare: tokenizer + packed dataset from this Python's standard library;
2. inspect: model sizes and one forward pass on a held-out batch;
3. pretrain the small demo teacher with cross-entropy (`teacher.source=none`);
4. serve it: start the teacher server on a loopback port, wait for health;
5. distil the demo student from it over gRPC (`teacher.source=remote`);
6. train the same student on cross-entropy alone (same data, seed, steps): the baseline;
7. summary: teacher, distilled student and CE-only student on held-out data, and
   a PNG of their loss curves, all in the run directory.

Every stage runs the project's own command line exactly as a user would, so
the printed commands can be copied. Stages that already finished are reused:
the prepared corpus, the teacher when its settings and the code that trains it
are unchanged (otherwise its trainer resumes from its checkpoints), and the
students' trainer resumes from theirs, so a second run is quick.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from distill_core import harness
from distill_core.config import build, resolve_preset
from distill_core.data import DataConfig, load_manifest, make_eval_iterator
from distill_core.harness import last_metrics, read_metrics
from distill_core.logs import add_log_level_argument, setup_logging
from distill_core.model.config import ModelConfig
from distill_core.model.transformer import count_params, create_model
from student_trainer import losses

ROOT = harness.REPO


def banner(text: str) -> None:
  print(f"\n{'=' * 78}\n== {text}\n{'=' * 78}", flush=True)


def inspect(data_dir: Path) -> dict[str, float]:
  """Model sizes and one forward pass of the (untrained) teacher on a held-out batch."""
  manifest = load_manifest(data_dir)
  for split, info in manifest.splits.items():
    print(f"  {split:5s}: {info.files} files, {info.tokens:,} tokens, {info.examples:,} examples "
          f"of {manifest.seq_len} tokens")
  print(f"  vocabulary: {manifest.vocab_size} (tokenizer {manifest.tokenizer_fingerprint[:16]})")
  sizes, models = {}, {}
  for name in ("demo_teacher", "demo_student"):
    cfg = build(ModelConfig, resolve_preset(name))
    models[name] = create_model(cfg, seed=0)
    sizes[name] = count_params(models[name])
    print(f"  {name}: {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, {sizes[name]:,} parameters")
  it = make_eval_iterator(DataConfig(path=str(data_dir), batch_size=4))
  batch = next(it)
  it.close()
  out = models["demo_teacher"](batch.tokens, batch.positions, batch.segment_ids)
  ce, _ = losses.ce(out.logits, batch.targets, batch.loss_mask)
  loss = float(ce.mean())
  print(f"  forward on a held-out batch {tuple(batch.tokens.shape)} -> logits {tuple(out.logits.shape)}, "
        f"CE of the untrained teacher {loss:.3f} (ln V = {np.log(manifest.vocab_size):.3f})")
  return {"untrained_ce": loss, **{f"params/{k}": v for k, v in sizes.items()}}


def serve_teacher(hf_dir: Path, tokenizer: Path, log_path: Path) -> harness.ServerProcess:
  """The teacher server on a free loopback port, serving."""
  return harness.TeacherServerProcess(["model.source=hf", f"model.path={hf_dir}", f"tokenizer_path={tokenizer}",
                                 "batcher.buckets=[[8,256]]", "limits.max_k=64"], log_path, show=True
                                ).wait_serving(timeout=300)


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
  """{metric: [(step, value)]} for the train and eval CE of a run."""
  out: dict[str, list[tuple[int, float]]] = {"train/ce_loss": [], "eval/ce_loss": []}
  for row in read_metrics(run_dir):
    for key in out:
      if key in row:
        out[key].append((int(row["step"]), float(row[key])))
  return out


def plot_curves(runs: dict[str, Path], teacher_ce: float, path: Path) -> Path:
  """Train and held-out CE of each student against steps, with the teacher's held-out CE as a line."""
  # matplotlib is heavy (about half a second) and only this plot needs it; Agg is chosen before pyplot loads
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
  for (label, run_dir), color in zip(runs.items(), ("tab:blue", "tab:orange")):
    c = curves(run_dir)
    if c["train/ce_loss"]:
      ax.plot(*zip(*c["train/ce_loss"]), color=color, alpha=0.45, lw=1, label=f"{label}: train CE")
    if c["eval/ce_loss"]:
      ax.plot(*zip(*c["eval/ce_loss"]), color=color, marker="o", lw=2, label=f"{label}: held-out CE")
  ax.axhline(teacher_ce, color="black", ls="--", lw=1, label=f"teacher held-out CE ({teacher_ce:.2f})")
  ax.set_xlabel("student optimizer step")
  ax.set_ylabel("cross-entropy (nats/token)")
  ax.set_title("demo: distilled student vs the same student trained on CE alone")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def shares_cores() -> bool:
  """Whether the demo's teacher server and student ran on the same CPU cores (no accelerator, no pinning)."""
  return all(d.platform == "cpu" for d in jax.devices())


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """The docstring as written, and every option's default."""


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
  parser.add_argument("--teacher-steps", type=int, default=200, help="CE pretraining steps of the teacher.")
  parser.add_argument("--student-steps", type=int, default=100, help="Distillation steps of the student.")
  parser.add_argument("--run-dir", default="runs/demo", help="Where the demo's runs go.")
  parser.add_argument("--data-dir", default="data/stdlib", help="Prepared dataset directory.")
  add_log_level_argument(parser, "Logging level of the demo's own lines")
  args = parser.parse_args(argv)
  setup_logging(level=args.log_level)
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  try:
    return _demo(args)
  except subprocess.CalledProcessError as e:  # the stage printed its own one-line reason above
    print(f"\ndemo: stopped, `{shlex.join(str(a) for a in e.cmd[1:4])} ...` exited with code {e.returncode} "
          "(its message is above)", file=sys.stderr)
    return 1


def _in_repo(path: Path) -> Path:
  """`path` relative to the checkout where it lies inside it: every stage runs there, and the configs it
  writes then match the README's commands (`data.path=data/stdlib`), which can resume the demo's runs."""
  path = (ROOT / path).resolve()
  return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def _demo(args: argparse.Namespace) -> int:
  os.chdir(ROOT)  # every stage runs in the checkout; paths below are relative to it where they lie inside
  run_dir, data_dir = _in_repo(Path(args.run_dir)), _in_repo(Path(args.data_dir))
  t0 = time.perf_counter()
  timings: dict[str, float] = {}

  banner("1/6 prepare the corpus (Python standard library) and the tokenizer")
  t = time.perf_counter()
  harness.ensure_corpus(data_dir)
  timings["prepare"] = time.perf_counter() - t

  banner("2/6 inspect: model sizes and a forward pass on a held-out batch")
  facts = inspect(data_dir)

  banner(f"3/6 pretrain the demo teacher ({args.teacher_steps} steps of cross-entropy)")
  t = time.perf_counter()
  teacher_dir = run_dir / "teacher"
  teacher_hf = harness.ensure_demo_teacher(teacher_dir, data_dir, args.teacher_steps)
  timings["teacher"] = time.perf_counter() - t

  banner("4/6 serve the teacher over gRPC on a loopback port")
  student_dir = run_dir / "student"
  student_dir.mkdir(parents=True, exist_ok=True)
  with serve_teacher(teacher_hf, data_dir / "tokenizer.json", run_dir / "teacher_server.log") as server:
    banner(f"5/6 distil the demo student from the served teacher ({args.student_steps} steps)")
    t = time.perf_counter()
    harness.run_trainer(["--config", "configs/demo/student.yaml", f"run_dir={student_dir}",
                         f"steps={args.student_steps}", f"data.path={data_dir}",
                         f"teacher.remote.address={server.address}"])
    timings["student"] = time.perf_counter() - t

  banner(f"6/6 the baseline: the same student on cross-entropy alone ({args.student_steps} steps)")
  t = time.perf_counter()
  baseline_dir = run_dir / "student_ce"
  harness.run_trainer(["--config", "configs/demo/student_ce.yaml", f"run_dir={baseline_dir}",
                       f"steps={args.student_steps}", f"data.path={data_dir}"])
  timings["baseline"] = time.perf_counter() - t

  teacher, student, baseline = last_metrics(teacher_dir), last_metrics(student_dir), last_metrics(baseline_dir)
  nan = float("nan")
  teacher_ce, student_ce = teacher.get("eval/ce_loss", nan), student.get("eval/ce_loss", nan)
  baseline_ce = baseline.get("eval/ce_loss", nan)
  png = plot_curves({"distilled student": student_dir, "CE-only student": baseline_dir}, teacher_ce,
                    run_dir / "loss_curves.png")
  banner("summary")
  print(f"  corpus: {data_dir}   untrained CE {facts['untrained_ce']:.3f}")
  print(f"  teacher ({facts['params/demo_teacher']:,} params, {args.teacher_steps} steps): held-out CE "
        f"{teacher_ce:.3f}, {teacher.get('perf/tokens_per_s', 0):,.0f} tokens/s")
  print(f"  held-out CE after {args.student_steps} student steps ({facts['params/demo_student']:,} params):")
  print(f"    distilled from the teacher  {student_ce:.3f}   (held-out KD to the teacher "
        f"{student.get('eval/kd_loss', nan):.3f})")
  print(f"    CE-only baseline            {baseline_ce:.3f}   (distillation: {baseline_ce - student_ce:+.3f} nats)")
  print(f"    teacher                     {teacher_ce:.3f}")
  print(f"  training: teacher tail mass {student.get('train/teacher_tail_mass', nan):.3f}, student "
        f"{student.get('perf/tokens_per_s', 0):,.0f} tokens/s, teacher wait fraction "
        f"{student.get('perf/teacher_wait_fraction', nan):.3f}")
  if student.get("perf/teacher_wait_fraction", 0.0) > 0.1 and shares_cores():
    print(f"  note: the teacher server and the student share this machine's {os.cpu_count()} CPU cores, so the "
          "wait fraction measures their contention, not a teacher on its own accelerator")
  print(f"  loss curves: {png}")
  print(f"  student checkpoint (Hugging Face format): {student_dir / 'hf'}; everything is under {run_dir}")
  print("  time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        + f", total {time.perf_counter() - t0:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
