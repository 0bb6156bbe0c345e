"""The `remote` teacher source without a server: request plans against a teacher's limits, the config's
checks, and how later replicas are accepted (the streaming tests, against fake-engine servers and
teacher-server processes, are in tests/integration/test_remote_source.py).
"""

from __future__ import annotations

import pytest
from remote_utils import fake_requirements

from distill_core.config import ConfigError, build, load_config
from distill_core.proto import teacher_pb2 as pb
from student_trainer.config import RemoteTeacherConfig, TrainConfig
from distill_core.stream.checks import TeacherMismatch, plan_requests
from distill_core.stream.pool import RemoteTeacherError

K = 4


def remote_cfg(address, **changes) -> RemoteTeacherConfig:
  base = dict(address=address, window=4, timeout_s=5.0, backoff_initial_s=0.05, backoff_max_s=0.2,
              connect_timeout_s=2.0)
  base.update(changes)
  return build(RemoteTeacherConfig, base)


def info_response(**changes) -> pb.GetInfoResponse:
  limits = dict(max_k=8, max_batch=16, max_tokens_per_request=256, max_temperatures=4, max_seq_len=32,
                selectable_layers=[0, 1], max_message_bytes=1 << 20)
  limits.update(changes.pop("limits", {}))
  fields = dict(model_type="fake", vocab_size=256, padded_vocab_size=256, num_layers=2, hidden_size=8,
                max_position_embeddings=64, value_dtypes=[pb.DTYPE_FLOAT16, pb.DTYPE_FLOAT32],
                state_dtypes=[pb.DTYPE_FLOAT32, pb.DTYPE_BFLOAT16], state_names=["attn_in", "attn_out"],
                weights_fingerprint="w", tokenizer_fingerprint="tok", limits=pb.Limits(**limits))
  fields.update(changes)
  return pb.GetInfoResponse(**fields)


def plan(info, need, rows=None):
  return plan_requests(info, need, state_dtype="float32", pack_ids=True, rows_per_request=rows,
                       max_message_bytes=1 << 20)


# -- connect-time checks -----------------------------------------------------------------------------

def test_plan_fits_limits_and_tolerates_padded_vocabulary():
  need = fake_requirements(seq_len=32, batch_rows=12, tokenizer_fingerprint="tok")
  assert plan(info_response(), need).rows_per_request == 8  # max_tokens_per_request 256 // T 32
  assert plan(info_response(), need, rows=3).rows_per_request == 3
  assert plan(info_response(limits={"max_batch": 5}), need).rows_per_request == 5
  padded = info_response(vocab_size=256, padded_vocab_size=320)
  assert plan(padded, need).k == K  # real vocabularies agree; the padding is the server's business
  layers = plan(info_response(), fake_requirements(feature_layers=lambda depth: (depth - 1,)))
  assert layers.layers == (1,) and layers.states == ("attn_out",)
  # Message size: rows * T * (k * (4 + 2) + 4) bytes must stay under 1 MiB - 4 KiB.
  big = fake_requirements(k=8, seq_len=32, batch_rows=64)
  small_messages = plan(info_response(limits={"max_batch": 64, "max_tokens_per_request": 1 << 20,
                                              "max_message_bytes": 40_000}), big)
  assert small_messages.rows_per_request == (40_000 - 4096) // (32 * (8 * 6 + 4))


@pytest.mark.parametrize("info_changes, need_changes, expected", [
    (dict(vocab_size=250), {}, "vocabulary: the teacher has 250 real ids (embedding rows 256), the student 256"),
    ({}, dict(vocab_size=250, data_vocab_size=250), "the teacher has 256 real ids, the student 250"),
    ({}, dict(data_vocab_size=300, vocab_size=256), "the dataset's tokenizer has 300 ids"),
    ({}, dict(tokenizer_fingerprint="other"), "tokenizer: the teacher's fingerprint"),
    ({}, dict(seq_len=40), "batches have T=40, the teacher's longest bucket is 32"),
    ({}, dict(k=9), "the loss needs k=9, the teacher serves at most 8"),
    ({}, dict(value_dtype="bfloat16"), "value_dtype: bfloat16 not offered"),
    ({}, dict(feature_layers=lambda depth: (2,)), "teacher layers [2], not selectable"),
    ({}, dict(feature_layers=lambda depth: (0,), hidden_size=16), "teacher width 8 != student width 16"),
    (dict(state_names=["attn_in"]), dict(feature_layers=lambda depth: (0,)), "does not offer attn_out"),
    (dict(limits={"max_tokens_per_request": 8}), {}, "one row of 16 tokens does not fit max_tokens_per_request"),
])
def test_plan_refuses_mismatches(info_changes, need_changes, expected):
  with pytest.raises(TeacherMismatch) as e:
    plan(info_response(**info_changes), fake_requirements(**{"tokenizer_fingerprint": "tok", **need_changes}))
  assert expected in str(e.value)


def test_config_validates_policy_and_addresses():
  cfg = remote_cfg(["10.0.0.1:50051", "10.0.0.2:50051"], on_timeout="ce_only")
  assert cfg.addresses == ["10.0.0.1:50051", "10.0.0.2:50051"]
  assert remote_cfg("dns:///teacher.ns.svc:50051").addresses == ["dns:///teacher.ns.svc:50051"]
  with pytest.raises(ConfigError, match="unknown policy 'retry' \\(known: cached_shards, ce_only, wait\\)"):
    remote_cfg("h:1", on_timeout="retry")
  with pytest.raises(ConfigError, match="not host:port"):
    remote_cfg("teacher")
  with pytest.raises(ConfigError, match="duplicate addresses"):
    remote_cfg(["h:1", "h:1"])
  train = load_config(TrainConfig, None, ["teacher.source=remote", "teacher.remote.address=[a:1, b:2]",
                                          "teacher.remote.window=3", "data.path=unused"])
  assert train.teacher.remote.addresses == ["a:1", "b:2"] and train.teacher.remote.window == 3


# -- replicas joining later ------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["stop", "drain"])
def test_later_replicas_are_checked_and_weight_changes_follow_the_policy(policy):
  from distill_core.stream.stats import StreamStats
  from distill_core.stream.pool import Lane, StreamCore
  cfg = RemoteTeacherConfig(on_weights_change=policy)
  core = StreamCore(cfg, fake_requirements(seq_len=16, tokenizer_fingerprint="tok"), lambda t: t, StreamStats())
  lanes = [Lane(core, None, f"lane{i}") for i in range(4)]
  core.lanes.extend(lanes)
  assert core.accept(lanes[0], info_response(replica_id="a")) == []
  assert "vocabulary" in core.accept(lanes[1], info_response(replica_id="b", vocab_size=512))[0]
  assert "tokenizer" in core.accept(lanes[1], info_response(replica_id="b", tokenizer_fingerprint="other"))[0]
  assert core.accept(lanes[1], info_response(replica_id="b")) == [] and lanes[1].replica_id == "b"
  lanes[1].ready = True
  problems = core.accept(lanes[2], info_response(replica_id="c", weights_fingerprint="w2"))
  if policy == "stop":
    assert problems and isinstance(core.fatal, RemoteTeacherError) and "replica c" in str(core.fatal)
    return
  assert problems == [] and core.fatal is None and core.info.weights_fingerprint == "w2"
  assert lanes[1].draining and "retired" in lanes[1].drain_reason  # old weights: no new requests
  assert "retired" in core.accept(lanes[3], info_response(replica_id="d"))[0]  # never back to the old ones
  assert core.stats.totals["weight_changes"] == 1
