"""Student throughput with streamed teacher targets vs targets in memory vs a co-located teacher.

    python -m benchmarks.bench_streaming                          # demo_student vs demo_teacher, B=8, T=128
    python -m benchmarks.bench_streaming --student tiny --teacher tiny --seq-len 32 --steps 40

Three runs of the real trainer (`student_trainer.train.run`) on the same
student, data and teacher weights, each in its own child process:

(a) in memory: the teacher's targets for every batch are computed first and
    handed to the train loop from memory: the upper bound for any source.
(b) remote: `python -m teacher_server` in another process; the trainer streams
    its batches with the `remote` source (prefetch window `--window`).
(c) local: the teacher runs inside the trainer's process (the co-located,
    MaxText-style baseline).

Cores: where the machine allows (`os.sched_setaffinity`), the available cores
are split in two halves: (a) and the student of (b) run on the first half,
the teacher server of (b) on the second, and (c) gets all of them (the same
hardware as (b) in total; `--local-cores student` gives it only the student's
half, like a teacher sharing the student's accelerator). The split is printed. Throughput is measured after
the first log interval (compilation), over the remaining ones.

The three runs are interleaved over `--rounds` rounds ((a), (b), (c), (a), (b),
(c), ...; the teacher server stays up), so a neighbour's load on a shared
machine hits every side of a ratio alike; each ratio is the median of its
rounds' ratios, recorded with the lowest and highest round
(benchmarks.common.paired_ratio).

Prints tokens/s of each run (median over rounds), b/a (streaming efficiency,
at most 1), b/c (remote over co-located: above 1 when the teacher on its own
cores beats the co-located one, below 1 when it does not) and the teacher wait
fraction of (b).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import (interleaved, measured_intervals, paired_ratio, precompute_targets, run_from_memory,
                               weighted)
from benchmarks.results import record
from distill_core import harness
from distill_core.config import build, load_config, resolve_preset
from distill_core.harness import pinned
from distill_core.model.config import ModelConfig
from distill_core.prepare import PrepareConfig, prepare
from student_trainer import train
from student_trainer.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent
PHASES = ("memory", "remote", "local")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--student", default="demo_student", help="student model preset (configs/models)")
  p.add_argument("--teacher", default="demo_teacher", help="teacher model preset (same vocabulary)")
  p.add_argument("--batch", type=int, default=8, help="global batch B")
  p.add_argument("--seq-len", type=int, default=128, help="sequence length T of the prepared data")
  p.add_argument("--k", type=int, default=64, help="top-k teacher ids per position")
  p.add_argument("--window", type=int, default=4, help="prefetch window of the remote source")
  p.add_argument("--log-every", type=int, default=10, help="steps per measurement interval")
  p.add_argument("--steps", type=int, default=30, help="measured steps (after one warm-up interval)")
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three runs")
  p.add_argument("--max-files", type=int, default=200, help="standard-library files in the benchmark corpus")
  p.add_argument("--local-cores", choices=("all", "student"), default="all",
                 help="cores of (c): all (the same hardware as (b) in total) or only the student's")
  p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "distill-bench-streaming"),
                 help="data and run directories (outside the work tree; the prepared data is reused)")
  p.add_argument("--json", action="store_true", help="print the results as one JSON object")
  p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # child process: run one phase
  p.add_argument("--address", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def core_split() -> tuple[set[int] | None, set[int] | None]:
  """(student cores, teacher cores), or (None, None) when pinning is not possible."""
  if not hasattr(os, "sched_getaffinity"):
    return None, None
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < 2:
    return None, None
  half = len(cores) // 2
  return set(cores[:half]), set(cores[half:])


def data_dir(args) -> Path:
  return Path(args.workdir) / f"data_{args.student}_T{args.seq_len}"


def train_overrides(args, phase: str) -> list[str]:
  total = args.log_every + args.steps
  common = [f"run_dir={Path(args.workdir) / phase}", f"data.path={data_dir(args)}",
            f"data.batch_size={args.batch}", f"model={args.student}", f"steps={total + 1}",
            f"logging.every_steps={args.log_every}", "logging.progress=false", "logging.tensorboard=false",
            "eval.every_steps=0", "checkpoint.resume=false", f"checkpoint.every_steps={total + 1}",
            "export_hf=false", "mesh.data=1", f"loss.top_k={args.k}", "loss.alpha=0.5"]
  if phase == "remote":
    return common + ["teacher.source=remote", f"teacher.remote.address={args.address}",
                     f"teacher.remote.window={args.window}"]
  return common + ["teacher.source=local", f"teacher.local.model={args.teacher}", "teacher.local.seed=0"]


def run_phase(args) -> dict:
  """Child process: one trainer run; returns throughput over the measured intervals."""
  cfg = load_config(TrainConfig, None, train_overrides(args, args.phase))
  total = args.log_every + args.steps
  shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run: no checkpoint, no old metrics
  if args.phase == "memory":  # precompute every batch's targets, then serve them from memory
    run_from_memory(cfg, precompute_targets(cfg, total), stop_after=total)
  else:
    train.run(cfg, stop_after=total)
  rows, walls, wall = measured_intervals(cfg.run_dir, args.log_every)
  out = {"tokens_per_s": weighted(rows, walls, wall, "perf/tokens_per_s"),
         "step_ms": 1000 * wall / (len(rows) * args.log_every),
         "teacher_wait_fraction": weighted(rows, walls, wall, "perf/teacher_wait_fraction"),
         "measured_steps": len(rows) * args.log_every}
  if args.phase == "remote":
    out.update({k.removeprefix("teacher/"): rows[-1][k] for k in ("teacher/latency_ms_p50",
                "teacher/latency_ms_p95", "teacher/window_occupancy", "teacher/received_mb_per_s") if k in rows[-1]})
  return out


def child(args, phase: str, cores: set[int] | None, address: str | None = None) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.bench_streaming", f"--phase={phase}", f"--student={args.student}",
         f"--teacher={args.teacher}", f"--batch={args.batch}", f"--seq-len={args.seq_len}", f"--k={args.k}",
         f"--window={args.window}", f"--log-every={args.log_every}", f"--steps={args.steps}",
         f"--workdir={args.workdir}"] + ([f"--address={address}"] if address else [])
  env = harness.child_env(harness.cpu_env(1))  # one CPU device
  out = subprocess.run(cmd, cwd=REPO, env=env, preexec_fn=pinned(cores), capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"phase {phase} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def start_server(args, cores: set[int] | None):
  """The teacher server of phase (b) on `cores` (a `distill_core.harness.TeacherServerProcess`, not yet serving)."""
  return harness.TeacherServerProcess(
      ["log_level=WARNING", "model.source=preset", f"model.preset={args.teacher}", "model.seed=0",
       f"batcher.buckets=[[{args.batch},{args.seq_len}]]", f"limits.max_k={args.k}", "limits.selectable_layers=[]",
       "batcher.max_wait_ms=2", f"tokenizer_path={data_dir(args) / 'tokenizer.json'}"],
      env=harness.cpu_env(1), cores=cores)


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.phase:
    print(json.dumps(run_phase(args)))
    return 0
  vocab = {build(ModelConfig, resolve_preset(name)).real_vocab_size for name in (args.student, args.teacher)}
  if len(vocab) != 1:
    raise SystemExit(f"student {args.student} and teacher {args.teacher} must share a vocabulary, got {vocab}")
  prepare(PrepareConfig(max_files=args.max_files, vocab_size=vocab.pop(), seq_len=args.seq_len,
                        output_dir=str(data_dir(args))), show_progress=False)
  student_cores, teacher_cores = core_split()
  local_cores = student_cores if args.local_cores == "student" else (
      student_cores | teacher_cores if student_cores else None)
  runs: dict[str, list[dict]] = {phase: [] for phase in PHASES}

  def phase_run(phase: str, cores, address=None):
    def once() -> float:
      runs[phase].append(child(args, phase, cores, address))
      return runs[phase][-1]["tokens_per_s"]
    return once

  server = start_server(args, teacher_cores)
  address = server.address
  try:
    server.wait_serving(timeout=600)
    rounds = interleaved({"memory": phase_run("memory", student_cores),
                          "remote": phase_run("remote", student_cores, address),
                          "local": phase_run("local", local_cores)}, args.rounds)
  finally:
    server.stop()
  median = {phase: statistics.median(rounds[phase]) for phase in PHASES}
  results = {phase: {key: statistics.median(r[key] for r in runs[phase]) for key in
                     ("tokens_per_s", "step_ms", "teacher_wait_fraction")} for phase in PHASES}
  streaming = paired_ratio(rounds["remote"], rounds["memory"], limit=1.0,
                           why="streaming cannot beat the same targets already in memory")
  colocated = paired_ratio(rounds["remote"], rounds["local"])
  summary = {"streaming_efficiency": streaming, "remote_over_colocated_tokens_per_s": colocated,
             "teacher_wait_fraction": results["remote"]["teacher_wait_fraction"],
             "student_cores": sorted(student_cores or []), "teacher_cores": sorted(teacher_cores or []),
             "local_cores": sorted(local_cores or []), "rounds": rounds,
             "setup": dict(student=args.student, teacher=args.teacher, batch=args.batch, seq_len=args.seq_len,
                           k=args.k, window=args.window, measured_steps=runs["remote"][0]["measured_steps"])}
  record({"memory_tokens_per_s": (median["memory"], "tokens/s"),
          "remote_tokens_per_s": (median["remote"], "tokens/s"),
          "local_tokens_per_s": (median["local"], "tokens/s"),
          "streaming_efficiency": (streaming, "ratio"),
          "remote_over_colocated_tokens_per_s": (colocated, "ratio"),
          "teacher_wait_fraction": (summary["teacher_wait_fraction"], "fraction")})
  if args.json:
    print(json.dumps({**results, **{k: vars(v) if hasattr(v, "rounds") else v for k, v in summary.items()}}))
    return 0
  print(f"student {args.student}, teacher {args.teacher}, B={args.batch} T={args.seq_len} k={args.k}, "
        f"window {args.window}, {summary['setup']['measured_steps']} measured steps per run, {args.rounds} "
        f"interleaved rounds (medians; ratios: median of the rounds' ratios [lowest, highest])")
  if student_cores:
    print(f"cores: (a) and the student of (b) on {sorted(student_cores)}, the teacher server of (b) on "
          f"{sorted(teacher_cores)}, (c) on {sorted(local_cores)}")
  else:
    print("cores: not pinned (fewer than 2 cores available or no sched_setaffinity)")
  names = {"memory": "(a) targets in memory", "remote": "(b) remote teacher", "local": "(c) local teacher"}
  for phase in PHASES:
    r = results[phase]
    print(f"  {names[phase]:24s} {r['tokens_per_s']:10,.0f} tokens/s  {r['step_ms']:8.1f} ms/step  "
          f"teacher wait {r['teacher_wait_fraction']:6.1%}")
  print(f"  streaming efficiency b/a  {streaming.value:.3f} [{streaming.low:.3f}, {streaming.high:.3f}]")
  print(f"  remote over co-located b/c  {colocated.value:.3f} [{colocated.low:.3f}, {colocated.high:.3f}]")
  if streaming.note:
    print(f"  note: {streaming.note}")
  print(f"  teacher wait fraction of (b)  {summary['teacher_wait_fraction']:.1%}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
