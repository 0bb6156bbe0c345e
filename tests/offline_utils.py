"""Helpers for the offline/cached tests: dump commands in child processes, train configs, shard surgery."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from server_utils import one_device_env

from distill_core import harness
from distill_core.config import load_config
from student_trainer.config import TrainConfig

TEACHER_SEED = 3
K_STORED = 16


def teacher_overrides(dataset) -> list[str]:
  """The tiny teacher (fixed seed) as the server and the in-process dump load it."""
  return ["model.source=preset", "model.preset=tiny", f"model.seed={TEACHER_SEED}", "batcher.buckets=[[8,32]]",
          f"limits.max_k={K_STORED}", "batcher.max_wait_ms=2", f"tokenizer_path={dataset}/tokenizer.json"]


def dump_args(dataset, output, *extra: str) -> list[str]:
  """`python -m teacher_server.dump` arguments storing k=16 at T=1 and 2 and float32 attn_out of both layers
  (float32, so that training from them matches the in-process teacher bit for bit)."""
  teacher = [f"teacher.{o}" for o in teacher_overrides(dataset)]
  return [f"data={dataset}", f"output={output}", f"k={K_STORED}", "temperatures=[1.0,2.0]", "layers=[0,1]",
          "states=[attn_out]", "state_dtype=float32", "records_per_shard=64", "rows_per_request=8", "progress=false",
          *teacher, *extra]


def start_dump(dataset, output, *extra: str, log_path: Path) -> harness.ChildProcess:
  """The dump command in a child process (one CPU device), output appended to `log_path`."""
  return harness.ChildProcess([sys.executable, "-m", "teacher_server.dump", *dump_args(dataset, output, *extra)],
                              log_path, env=one_device_env(), append=True)


def run_dump(dataset, output, *extra: str, log_path: Path, timeout: float = 300) -> str:
  proc = start_dump(dataset, output, *extra, log_path=log_path)
  code = proc.wait(timeout)
  text = Path(log_path).read_text(errors="replace")
  if code:
    raise RuntimeError(f"dump exited with {code}:\n{text[-3000:]}")
  return text


def train_cfg(dataset, run_dir, *overrides: str, steps: int = 6) -> TrainConfig:
  base = [f"run_dir={run_dir}", f"data.path={dataset}", "data.batch_size=8", f"steps={steps}",
          "logging.every_steps=1", "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0",
          "eval.batches=1", f"checkpoint.every_steps={steps}", "checkpoint.async_save=false", "export_hf=false",
          "mesh.data=1", "optim.warmup_steps=2", "loss.top_k=8", "loss.alpha=0.7", "loss.beta=0.5",
          "logging.example_ids=true"]
  return load_config(TrainConfig, None, base + list(overrides))


def local_cfg(dataset, run_dir, *overrides: str, steps: int = 6) -> TrainConfig:
  return train_cfg(dataset, run_dir, "teacher.source=local", "teacher.local.model=tiny",
                   f"teacher.local.seed={TEACHER_SEED}", *overrides, steps=steps)


def jsonl(path) -> list[dict]:
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


def edit_manifest(root, **changes) -> None:
  """Rewrites fields of manifest.json: `teacher__vocab_size=9` sets manifest["teacher"]["vocab_size"]."""
  path = Path(root) / "manifest.json"
  data = json.loads(path.read_text())
  for key, value in changes.items():
    node = data
    *parents, leaf = key.split("__")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  path.write_text(json.dumps(data))
