"""On a real accelerator: engine tokens/s and the student train step's model FLOPs utilisation.

`benchmarks.bench_scale` calls these when `jax.devices()[0].platform` is gpu or
tpu, for its first teacher and student case, on the local devices (random
weights, FSDP over all of them); the figures are recorded with the machine's
accelerator name (`benchmarks.results.machine`). Nothing depends on them.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks.scale_model import analytic_flops_per_token, model_config
from distill_core import checkpoints, memory
from distill_core.data import Batch
from distill_core.sharding import MeshConfig, make_mesh, rules_table, shard_batch
from distill_core.targets import TeacherTargets
from student_trainer import step as step_lib
from student_trainer.config import TrainConfig
from student_trainer.state import create_train_state
from teacher_server.engine import JaxEngine
from teacher_server.engine_api import EngineBatch, Fetch


def measure_engine(preset: str, overrides: dict, bucket: tuple[int, int], max_k: int, repeats: int = 3) -> float:
  """Engine tokens/s at one full bucket on the local devices (random weights)."""
  cfg = model_config(preset, overrides)
  engine = JaxEngine(checkpoints.load_model(cfg, seed=0), buckets=[bucket], max_k=max_k, max_temperatures=1,
                     selectable_layers=[], state_names=[], mesh=MeshConfig(data=1, fsdp=-1))
  b, t = bucket
  rng = np.random.default_rng(0)
  ones = np.ones((b, t), np.int32)
  batch = EngineBatch(rng.integers(0, cfg.real_vocab_size, (b, t), dtype=np.int32), ones,
                      np.cumsum(ones, axis=1, dtype=np.int32) - 1, np.ones((b, 1), np.float32),
                      Fetch(k=max_k))
  engine.forward(batch)  # compile
  start = time.perf_counter()
  for _ in range(repeats):
    engine.forward(batch)  # ends with the host copy: synchronous
  return repeats * b * t / (time.perf_counter() - start)


def measure_student(preset: str, overrides: dict, per_chip: int, seq_len: int, loss: dict,
                    repeats: int = 3) -> tuple[float, float | None]:
  """(tokens/s, model FLOPs utilisation or None where the peak is unknown) of the kd train step on the
  local devices, FSDP over all of them, with random teacher targets."""
  cfg = model_config(preset, overrides)
  train_cfg = TrainConfig.model_validate({"model": cfg.model_dump(), "loss": loss, "mesh": {"data": 1, "fsdp": -1}})
  mesh = make_mesh(train_cfg.mesh)
  state = create_train_state(train_cfg, mesh, rules_table(train_cfg.mesh))
  rows = per_chip * mesh.devices.size
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.real_vocab_size, (rows, seq_len), dtype=np.int32)
  ones = np.ones_like(tokens)
  batch = Batch.from_examples({"example_ids": np.arange(rows), "tokens": tokens, "segment_ids": ones,
                               "positions": np.cumsum(ones, axis=1, dtype=np.int32) - 1})
  k = train_cfg.loss.top_k
  ids = rng.integers(0, cfg.real_vocab_size - k, (rows, seq_len, 1)) + np.arange(k)  # k distinct ids
  logits = np.sort(rng.random((rows, seq_len, k), np.float32), axis=-1)[..., ::-1] * 5 - 5  # sorted, max 0
  targets = TeacherTargets(topk_ids=shard_batch(ids.astype(np.int32), mesh),
                           topk_logits=shard_batch(logits.astype(np.float16), mesh),
                           logsumexp=shard_batch(np.full((rows, seq_len, 1), 2.0, np.float32), mesh),
                           temperatures=[1.0])
  fn = step_lib.make_train_step(state.graphdef, train_cfg, "kd", state.shardings)
  hyper = step_lib.hyperparameters(train_cfg, 0)
  device_batch = shard_batch(batch, mesh)
  params, metrics = fn(state.params, device_batch, targets, hyper)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(repeats):
    params, metrics = fn(params, device_batch, targets, hyper)
  jax.block_until_ready(metrics)
  tokens_per_s = repeats * rows * seq_len / (time.perf_counter() - start)
  peak = memory.peak_flops(jax.devices()[0])
  model_flops = analytic_flops_per_token(cfg, seq_len, train=True, remat=False)  # MFU counts no recompute
  return tokens_per_s, (tokens_per_s * model_flops / (peak * mesh.devices.size) if peak else None)
