"""End-to-end demo on built-in defaults (run by `make demo`).

1. prepare: tokenizer + packed dataset from this Python's standard library;
2. inspect: model sizes and one forward pass on a held-out batch;
3. pretrain the small demo teacher with cross-entropy (`teacher.source=none`);
4. serve it: start the teacher server on a loopback port, wait for health;
5. distil the demo student from it over gRPC (`teacher.source=remote`);
6. summary: what each stage did and measured.

Every stage runs the project's own command line exactly as a user would, so
the printed commands can be copied. Stages that already finished are reused
(the trainer resumes from its checkpoints), so a second run is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def banner(text: str) -> None:
  print(f"\n{'=' * 78}\n== {text}\n{'=' * 78}", flush=True)


def sh(args: list[str], **kwargs) -> None:
  print("$ " + " ".join(shlex.quote(a) for a in args), flush=True)
  subprocess.run(args, cwd=ROOT, check=True, **kwargs)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def last_metrics(run_dir: Path) -> dict[str, float]:
  merged: dict[str, float] = {}
  path = run_dir / "metrics.jsonl"
  if path.is_file():
    for line in path.read_text().splitlines():
      merged.update(json.loads(line))
  return merged


def inspect(data_dir: Path) -> dict[str, float]:
  """Model sizes and one forward pass of the (untrained) teacher on a held-out batch."""
  import numpy as np

  from distill_core.config import build, resolve_preset
  from distill_core.data import DataConfig, load_manifest, make_eval_iterator
  from distill_core.model.config import ModelConfig
  from distill_core.model.transformer import count_params, create_model
  from student_trainer import losses

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


def serve_teacher(hf_dir: Path, tokenizer: Path, port: int, log_path: Path) -> subprocess.Popen:
  args = [PY, "-m", "teacher_server", f"address=127.0.0.1:{port}", "model.source=hf", f"model.path={hf_dir}",
          f"tokenizer_path={tokenizer}", "batcher.buckets=[[8,256]]", "limits.max_k=64"]
  print("$ " + " ".join(shlex.quote(a) for a in args) + f"   (log: {log_path})", flush=True)
  log = open(log_path, "w")
  proc = subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  deadline = time.monotonic() + 300
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"teacher server exited with {proc.returncode}; see {log_path}")
    if _serving(port):
      return proc
    time.sleep(0.5)
  proc.terminate()
  raise RuntimeError(f"teacher server did not become healthy in 300 s; see {log_path}")


def _serving(port: int) -> bool:
  import grpc
  from grpc_health.v1 import health_pb2, health_pb2_grpc
  with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
    try:
      reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
    except grpc.RpcError:
      return False
  return reply.status == health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--teacher-steps", type=int, default=200, help="CE pretraining steps of the teacher.")
  parser.add_argument("--student-steps", type=int, default=100, help="Distillation steps of the student.")
  parser.add_argument("--run-dir", default="runs/demo", help="Where the demo's runs go.")
  parser.add_argument("--data-dir", default="data/stdlib", help="Prepared dataset directory.")
  args = parser.parse_args(argv)
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  run_dir, data_dir = ROOT / args.run_dir, ROOT / args.data_dir
  t0 = time.perf_counter()
  timings: dict[str, float] = {}

  banner("1/5 prepare the corpus (Python standard library) and the tokenizer")
  t = time.perf_counter()
  sh([PY, "-m", "distill_core.prepare", f"output_dir={data_dir}"])
  timings["prepare"] = time.perf_counter() - t

  banner("2/5 inspect: model sizes and a forward pass on a held-out batch")
  facts = inspect(data_dir)

  banner(f"3/5 pretrain the demo teacher ({args.teacher_steps} steps of cross-entropy)")
  t = time.perf_counter()
  teacher_dir = run_dir / "teacher"
  sh([PY, "-m", "student_trainer", "--config", "configs/demo/teacher.yaml", f"run_dir={teacher_dir}",
      f"steps={args.teacher_steps}", f"data.path={data_dir}"])
  timings["teacher"] = time.perf_counter() - t

  banner("4/5 serve the teacher over gRPC on a loopback port")
  port = free_port()
  student_dir = run_dir / "student"
  student_dir.mkdir(parents=True, exist_ok=True)
  server = serve_teacher(teacher_dir / "hf", data_dir / "tokenizer.json", port, run_dir / "teacher_server.log")
  try:
    banner(f"5/5 distil the demo student from the served teacher ({args.student_steps} steps)")
    t = time.perf_counter()
    sh([PY, "-m", "student_trainer", "--config", "configs/demo/student.yaml", f"run_dir={student_dir}",
        f"steps={args.student_steps}", f"data.path={data_dir}", f"teacher.remote.address=127.0.0.1:{port}"])
    timings["student"] = time.perf_counter() - t
  finally:
    server.terminate()
    server.wait(timeout=60)

  teacher, student = last_metrics(teacher_dir), last_metrics(student_dir)
  banner("summary")
  print(f"  corpus: {data_dir}   untrained CE {facts['untrained_ce']:.3f}")
  print(f"  teacher ({facts['params/demo_teacher']:,} params): eval CE {teacher.get('eval/ce_loss', float('nan')):.3f}"
        f" after {args.teacher_steps} steps, {teacher.get('perf/tokens_per_s', 0):,.0f} tokens/s")
  print(f"  student ({facts['params/demo_student']:,} params): eval CE {student.get('eval/ce_loss', float('nan')):.3f},"
        f" eval KD {student.get('eval/kd_loss', float('nan')):.3f}, teacher tail mass "
        f"{student.get('train/teacher_tail_mass', float('nan')):.3f}")
  print(f"  student throughput {student.get('perf/tokens_per_s', 0):,.0f} tokens/s, teacher wait fraction "
        f"{student.get('perf/teacher_wait_fraction', float('nan')):.3f}")
  print(f"  student checkpoint (Hugging Face format): {student_dir / 'hf'}")
  print("  time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        + f", total {time.perf_counter() - t0:.0f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
