"""What the on-policy tests share: a tiny run config with generation that fits the test corpus's 32-token rows."""

from __future__ import annotations

import json

import jax
import numpy as np
from flax import nnx

from distill_core.config import load_config
from student_trainer.config import TrainConfig

GEN = ("generation.prompts.max_len=12", "generation.prompts.min_len=4", "generation.max_new_tokens=16")


def make_cfg(dataset, run_dir, *overrides) -> TrainConfig:
  base = [f"run_dir={run_dir}", f"data.path={dataset}", "data.batch_size=8", "steps=6", "logging.every_steps=1",
          "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0", "eval.batches=1",
          "checkpoint.every_steps=100", "checkpoint.async_save=false", "export_hf=false", "mesh.data=1",
          "optim.warmup_steps=2", "logging.example_ids=true", "teacher.source=local", "teacher.local.model=tiny",
          "teacher.local.seed=5", "loss.top_k=8", "optim.learning_rate=1e-2", *GEN]
  return load_config(TrainConfig, None, base + list(overrides))


def metric_rows(run_dir) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def params_of(result) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(result.state.model(), nnx.Param))]
