"""Bad answers and their bookkeeping without a run: the answer checks name the field, means count only the
tokens that had targets, and a resume names each changed config field (the faults themselves, produced
by real processes, are in tests/integration/test_trainer_faults.py).
"""

from __future__ import annotations

import pytest


# -- answers are checked, non-finite steps never reach the parameters ------------------------------

def test_check_values_names_the_field():
  import numpy as np
  from distill_core.targets import TeacherTargets, check_values
  ids = np.array([[[3, 1]]], np.int32)
  good = TeacherTargets(topk_ids=ids, topk_logits=np.array([[[0.0, -1.0]]], np.float16),
                        logsumexp=np.array([[[0.5]]], np.float32), temperatures=[2.0])
  assert check_values(good, vocab_size=4, temperatures=(2.0,)) is good
  with pytest.raises(ValueError, match=r"topk_ids: id 3 at \[0, 0, 0\] is outside the vocabulary \[0, 3\)"):
    check_values(good, vocab_size=3)
  with pytest.raises(ValueError, match=r"temperatures: the answer is for \[2.0\], the request asked for \[1.0\]"):
    check_values(good, temperatures=(1.0,))
  shifted = good.replace(topk_logits=np.array([[[-0.25, -1.0]]], np.float16))
  with pytest.raises(ValueError, match=r"topk_logits: the first value at \[0, 0\] is -0.25, not 0"):
    check_values(shifted)
  with pytest.raises(ValueError, match="first value at .* is nan"):
    check_values(good.replace(topk_logits=np.array([[[np.nan, -1.0]]], np.float16)))


# -- bounded memory, unbiased metrics, no compile at fallback time ---------------------------------


def test_means_count_only_the_tokens_that_had_targets():
  from student_trainer.metrics import token_means
  teacher_step = {"tokens": 10.0, "ce_loss_sum": 20.0, "kd_loss_sum": 5.0, "teacher_tail_mass_sum": 2.0,
                  "alpha": 0.5, "grad_norm": 1.0}
  fallback_step = {"tokens": 30.0, "ce_loss_sum": 30.0, "grad_norm": 3.0}  # CE only: no teacher sums
  out = token_means([teacher_step, fallback_step], "train/")
  assert out == {"train/ce_loss": 50.0 / 40.0, "train/kd_loss": 5.0 / 10.0, "train/teacher_tail_mass": 2.0 / 10.0,
                 "train/alpha": 0.5, "train/grad_norm": 2.0}


# -- resume compares the run config -----------------------------------------------------------------

def test_config_changes_name_each_field():
  from student_trainer.checkpoint import config_changes
  saved = {"steps": 10, "optim": {"learning_rate": 0.003, "b1": 0.9}, "logging": {"every_steps": 10},
           "teacher": {"remote": {"address": "a:1", "state_dtype": "float32"}}, "mesh": {"data": 1}}
  same_run = {"steps": 20, "optim": {"learning_rate": 0.003, "b1": 0.9}, "logging": {"every_steps": 1},
              "teacher": {"remote": {"address": "b:2", "state_dtype": "float32"}}, "mesh": {"data": 8}}
  assert config_changes(saved, same_run, saved_step=5) == []
  other = {"steps": 4, "optim": {"learning_rate": 0.001, "b1": 0.9}, "logging": {"every_steps": 10},
           "teacher": {"remote": {"address": "a:1", "state_dtype": "bfloat16"}}, "mesh": {"data": 1}}
  assert config_changes(saved, other, saved_step=5) == [
      "optim.learning_rate: 0.003 -> 0.001",
      "steps: 10 -> 4 (the checkpoint is at step 5; set steps above it)",
      "teacher.remote.state_dtype: 'float32' -> 'bfloat16'"]
  assert config_changes(saved, other, saved_step=5, allow=["optim", "teacher.remote.state_dtype"]) == [
      "steps: 10 -> 4 (the checkpoint is at step 5; set steps above it)"]
  assert config_changes(saved, dict(other, steps=6), saved_step=5, allow=["*"]) == []
