"""The quality report's evaluator: the reverse KL of each model's own samples to the teacher."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from benchmarks import quality
from distill_core.config import build, resolve_preset
from distill_core.data import DataConfig, load_manifest
from distill_core.generation import generate_batch, make_prompt_set
from distill_core.model.config import ModelConfig
from distill_core.model.hf import save_hf_checkpoint
from distill_core.model.transformer import create_model

BUDGET = quality.Budget(teacher_steps=1, student_steps=1, seeds=(0,), eval_every=1, eval_batches=1, batch=4,
                        new_tokens=8, prompt_len=(3, 12), sample_batches=2)


def _log_softmax(z: np.ndarray) -> np.ndarray:
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_reverse_kl_of_own_samples_against_numpy(tiny_dataset, tmp_path):
  cfg = build(ModelConfig, resolve_preset("tiny"))
  teacher, student = create_model(cfg, seed=1), create_model(cfg, seed=2)
  save_hf_checkpoint(teacher, tmp_path / "teacher")
  save_hf_checkpoint(student, tmp_path / "student")
  gen = quality.generation_config(BUDGET)
  ev = quality.Evaluator(tiny_dataset, tmp_path / "teacher", 1, BUDGET.batch, gen, BUDGET.sample_batches)
  got = ev.evaluate(tmp_path / "student")
  assert ev.evaluate(None)["rkl"] == pytest.approx(0.0, abs=1e-6)  # the teacher's own samples
  assert ev.evaluate(tmp_path / "student") == got  # the same prompts and keys every time

  # Reference: the held-out records' prefixes, the student's samples with keys (seed 0, step 0, example id),
  # then KL(student || teacher) of every generated position by a loop over the vocabulary in float64.
  manifest = load_manifest(tiny_dataset)
  prompt_set = make_prompt_set(gen, DataConfig(path=str(tiny_dataset), batch_size=BUDGET.batch))
  assert gen.prompts.split == "eval"
  total, tokens = 0.0, 0
  loaded = ev._load(None, hf_checkpoint=str(tmp_path / "student"))
  for i in range(BUDGET.sample_batches):
    prompts = prompt_set.batch(range(i * BUDGET.batch, (i + 1) * BUDGET.batch))
    batch, host = generate_batch(loaded, prompts, gen, step=0, seq_len=manifest.seq_len, pad_id=manifest.pad_id,
                                 eos_id=manifest.eos_id)
    v = cfg.real_vocab_size
    lp_s = _log_softmax(np.asarray(jax.device_get(
        student(batch.tokens, batch.positions, batch.segment_ids).logits), np.float64)[..., :v])
    lp_t = _log_softmax(np.asarray(jax.device_get(
        teacher(batch.tokens, batch.positions, batch.segment_ids).logits), np.float64)[..., :v])
    mask = np.asarray(batch.loss_mask)
    for r in range(mask.shape[0]):
      assert mask[r].sum() == host.lengths[r]  # one position per generated token
      for t in np.flatnonzero(mask[r]):
        total += sum(math.exp(lp_s[r, t, x]) * (lp_s[r, t, x] - lp_t[r, t, x]) for x in range(v))
        tokens += 1
  assert got["rkl_tokens"] == tokens > 0
  assert got["rkl"] == pytest.approx(total / tokens, rel=1e-4)
