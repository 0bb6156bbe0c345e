"""On-policy distillation against a teacher-server process (`python -m teacher_server`): bad scored ids refused by
name, the logits at given ids equal the server's own top-k values, and an on-policy run (kd_mode reverse_kl)
matching the in-process teacher (the scored part through an in-process server: test_scored_server.py)."""

from __future__ import annotations

import re

import grpc
import numpy as np
import pytest
from integration.test_remote_source import TEACHER_SEED, jsonl, remote_train_cfg, server_overrides
from on_policy_utils import GEN
from remote_utils import TeacherProcess, wait_serving
from server_utils import free_port

from distill_core import wire
from distill_core.parts import scored
from distill_core.proto import teacher_pb2_grpc
from student_trainer.train import run

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FIELD = "part_inputs['scored.ids']"
MAX_IDS = 3
ON_POLICY = ("loss.on_policy_fraction=0.5", "loss.kd_mode=reverse_kl", "generation.score_student_topk=2",
             "steps=4", *GEN)


@pytest.fixture(scope="module")
def teacher(tiny_dataset, tmp_path_factory):
  server = TeacherProcess(free_port(), server_overrides(tiny_dataset) + [f"limits.max_scored_ids={MAX_IDS}"],
                          tmp_path_factory.mktemp("teacher") / "log")
  wait_serving(server)
  yield server
  server.stop()


def _request(ids, tokens, k=4):
  return wire.make_request(1, tokens, wire.OutputSpec(k=k, value_dtype="float32"),
                           part_inputs=None if ids is None else {scored.INPUT: ids})


def test_bad_ids_are_refused_naming_the_field_and_good_ones_scored(teacher):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 384, (2, 16), dtype=np.int32)
  ids = rng.integers(0, 384, (2, 16, MAX_IDS), dtype=np.int32)
  outside = ids.copy()
  outside[1, 5, 2] = 384
  bad = {"an id outside the vocabulary": (outside, r"id 384 at \[1, 5, 2\] is outside the vocabulary \[0, 384\)"),
         "too many ids": (np.zeros((2, 16, MAX_IDS + 1), np.int32), f"4 ids per position, must be in \\[1, {MAX_IDS}"),
         "another shape": (ids[:, :8], r"does not match the tokens' \[B, T\] = \[2, 16\]"),
         "int64 ids": (ids.astype(np.int64), "dtype must be DTYPE_INT32"),
         "no position axis": (ids[..., 0], "expected 3 dimensions")}
  with grpc.insecure_channel(teacher.address) as channel:
    stub = teacher_pb2_grpc.TeacherStub(channel)
    for name, (bad_ids, message) in bad.items():
      with pytest.raises(grpc.RpcError) as e:
        stub.Forward(_request(bad_ids, tokens))
      assert e.value.code() == INVALID, name
      assert e.value.details().startswith(FIELD) and re.search(message, e.value.details()), name
    plain = wire.response_to_targets(stub.Forward(_request(None, tokens)))
    asked = np.ascontiguousarray(plain.topk_ids[..., :MAX_IDS])
    resp = stub.Forward(_request(asked, tokens))
  assert sorted(resp.part_outputs) == ["scored.logits"]  # the ids are not echoed
  answer = wire.response_to_targets(resp)
  assert answer.scored_ids is None
  # the same shift as the top-k values: the logits at the top-k ids are the top-k values
  np.testing.assert_array_equal(answer.scored_logits, answer.topk_logits[..., :MAX_IDS])
  np.testing.assert_array_equal(answer.topk_ids, plain.topk_ids)


def test_an_on_policy_run_against_the_server_matches_the_in_process_teacher(teacher, tiny_dataset, tmp_path):
  """kd_mode reverse_kl (sampled estimator): the same samples, teacher scores and losses from a teacher-server
  process as from the same teacher in process."""
  local = run(remote_train_cfg(tiny_dataset, tmp_path / "local", [teacher.address], *ON_POLICY, "teacher.source=local",
                               "teacher.local.model=tiny", f"teacher.local.seed={TEACHER_SEED}"))
  remote = run(remote_train_cfg(tiny_dataset, tmp_path / "remote", [teacher.address], *ON_POLICY))
  assert remote.step == local.step == 4 and remote.trained_example_ids == local.trained_example_ids
  rows = [{r["step"]: r for r in jsonl(result.run_dir / "metrics.jsonl") if "train/total_loss" in r}
          for result in (local, remote)]
  on = [step for step in rows[0] if "train/reverse_kl" in rows[0][step]]
  assert on and sorted(rows[0]) == sorted(rows[1]) == [1, 2, 3, 4]
  for step in rows[0]:
    for key in ("train/total_loss", "train/kd_loss", "train/reverse_kl", "train/importance_weight"):
      if key in rows[0][step]:
        assert rows[1][step][key] == pytest.approx(rows[0][step][key], abs=1e-4, rel=1e-4), (key, step)
  assert remote.last_metrics["teacher/fallbacks_total"] == 0
