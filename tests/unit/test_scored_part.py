"""The scored part: the teacher's shifted logits at given ids, against NumPy; the wire (a served answer holds the
values alone, the asker re-attaches its ids), shard records, the request's ids refused by name, the needs check."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_core import checkpoints, needs, parts, shards, wire
from distill_core.config import build, resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.bitpack import WireError
from distill_core.parts import scored
from distill_core.parts.base import SpecError
from distill_core.proto import teacher_pb2 as pb
from distill_core.sharding import MeshConfig
from distill_core.targets import check_values, compute_targets, compute_targets_from_hidden, slice_batch, to_numpy
from student_trainer.sources.common import check_part_inputs
from teacher_server.engine import JaxEngine
from teacher_server.engine_api import EngineBatch, Fetch

B, T, V, TRUE_V, E, N = 2, 7, 24, 21, 5, 4


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, T, E)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(E, V)) * 2, jnp.float32)
  ids = rng.integers(0, TRUE_V, size=(B, T, N)).astype(np.int32)
  return hidden, (lambda h: jnp.einsum("bte,ev->btv", h, w)), ids


def _reference(logits, ids, temperature=1.0):
  """(values, log p at ids) in float64: logits minus the row max of the real vocabulary."""
  z = np.asarray(logits, np.float64)[..., :TRUE_V]
  z = z - z.max(-1, keepdims=True)
  values = np.take_along_axis(z, ids, axis=-1)
  lse = np.log(np.exp(z / temperature).sum(-1))
  return values, values / temperature - lse[..., None]


@pytest.mark.parametrize("k", [1, 5])
def test_values_are_the_shifted_teacher_logits_at_the_ids_and_give_exact_log_probabilities(k):
  hidden, head, ids = _inputs()
  out = compute_targets(head(hidden), k=k, temperatures=(1.0, 2.0), true_vocab_size=TRUE_V, scored_ids=ids)
  want, want_logp = _reference(head(hidden), ids, 2.0)
  np.testing.assert_array_equal(np.asarray(out.scored_ids), ids)
  assert out.scored_logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out.scored_logits), want, rtol=1e-5, atol=1e-5)
  logp = np.asarray(out.scored_logits) / 2.0 - np.asarray(out.logsumexp)[..., 1:2]
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
  # the same shift as the top-k values: the top id scores exactly 0
  top = compute_targets(head(hidden), k=k, temperatures=(1.0,), true_vocab_size=TRUE_V,
                        scored_ids=np.asarray(out.topk_ids[..., :1]))
  assert np.all(np.asarray(top.scored_logits) == 0.0)
  assert not compute_targets(head(hidden), k=k, temperatures=(1.0,), true_vocab_size=TRUE_V).has_scored


def test_chunked_computation_equals_the_whole_logits():
  hidden, head, ids = _inputs(1)
  whole = compute_targets(head(hidden), k=3, temperatures=(1.0,), true_vocab_size=TRUE_V, scored_ids=ids)
  for chunk in (2, 3, T):
    part = jax.jit(lambda h, i, c=chunk: compute_targets_from_hidden(
        h, head, chunk_size=c, k=3, temperatures=(1.0,), true_vocab_size=TRUE_V, scored_ids=i))(hidden, ids)
    np.testing.assert_array_equal(np.asarray(part.scored_ids), ids)
    np.testing.assert_allclose(np.asarray(part.scored_logits), np.asarray(whole.scored_logits), rtol=1e-6,
                               atol=1e-6)


def _host():
  hidden, head, ids = _inputs(2)
  out = compute_targets(head(hidden), k=2, temperatures=(1.0,), true_vocab_size=TRUE_V, scored_ids=ids)
  return jax.tree.map(np.asarray, out), ids


def test_a_served_answer_carries_the_values_alone_and_the_asker_reattaches_its_ids():
  targets, ids = _host()
  served = targets.replace(scored_ids=None)  # what a server holds: it does not echo the ids
  assert served.has_scored and served.scored_ids is None
  resp = wire.targets_to_response(1, served)
  assert sorted(resp.part_outputs) == ["scored.logits"]
  assert len(resp.part_outputs["scored.logits"].data) == B * T * scored.answer_bytes(N)
  back = wire.response_to_targets(pb.ForwardResponse.FromString(resp.SerializeToString()))
  assert back.scored_ids is None
  fields = scored.attach(back.fields(), ids)
  np.testing.assert_array_equal(fields["scored_ids"], ids)
  np.testing.assert_array_equal(fields["scored_logits"], targets.scored_logits)
  with pytest.raises(ValueError, match=r"scored_logits: shape \[2, 7, 4\] != the ids asked \[2, 7, 3\]"):
    scored.attach(back.fields(), ids[..., :3])
  with pytest.raises(ValueError, match="scored_logits: missing, 4 ids per position were asked"):
    scored.attach({}, ids)
  with pytest.raises(ValueError, match="scored_logits: the answer scores given ids, none were asked"):
    scored.attach(back.fields(), None)
  req = wire.make_request(1, np.zeros((B, T), np.int32), wire.OutputSpec(k=1), part_inputs=scored.request_inputs(ids))
  assert len(req.part_inputs["scored.ids"].data) == B * T * scored.request_bytes(N)


@pytest.mark.parametrize("packed", [0, 5])
def test_targets_holding_the_ids_round_trip_through_the_wire_and_a_shard_record(packed):
  targets, ids = _host()
  back = wire.response_to_targets(wire.targets_to_response(3, targets, packed_id_bits=packed))
  for key, value in to_numpy(targets).items():
    np.testing.assert_array_equal(to_numpy(back)[key], value, err_msg=key)
  spec = shards.StoredSpec.build(wire.OutputSpec(k=2, pack_ids=bool(packed)), id_bits=packed, value_coding="raw",
                                 zstd_level=0)
  one = slice_batch(targets, 1, 2)
  _, stored = shards.decode_record(shards.encode_record(5, one, spec, weights_fingerprint="w"), "r")
  np.testing.assert_array_equal(stored.scored_ids, ids[1:2])
  np.testing.assert_array_equal(stored.scored_logits, targets.scored_logits[1:2])


def test_answers_and_values_are_checked_by_name():
  targets, _ = _host()
  resp = wire.targets_to_response(1, targets)
  resp.part_outputs["scored.logits"].CopyFrom(wire.encode_tensor(np.zeros((B, T + 1, N), np.float32)))
  with pytest.raises(WireError, match=r"part_outputs\[scored.logits\]: shape \[2, 8, 4\] does not match"):
    wire.response_to_targets(resp)
  resp = wire.targets_to_response(1, targets)
  resp.part_outputs["scored.ids"].CopyFrom(wire.encode_tensor(np.zeros((B, T, N - 1), np.int32)))
  with pytest.raises(WireError, match=r"part_outputs\[scored.ids\]: shape \[2, 7, 3\] != "):
    wire.response_to_targets(resp)
  resp = wire.targets_to_response(1, targets)
  del resp.part_outputs["scored.logits"]
  with pytest.raises(WireError, match=r"part_outputs\[scored.ids\]: given without"):
    wire.response_to_targets(resp)
  with pytest.raises(ValueError, match="scored_logits: expected rank 3"):
    targets.replace(scored_logits=targets.scored_logits[..., 0]).validate()
  with pytest.raises(ValueError, match="scored_ids: id 30 at"):
    check_values(targets.replace(scored_ids=np.full((B, T, N), 30, np.int32)), vocab_size=TRUE_V)


def _request(ids, tokens_shape=(B, T)):
  req = wire.make_request(1, np.zeros(tokens_shape, np.int32), wire.OutputSpec(k=1))
  req.part_inputs["scored.ids"].CopyFrom(wire.encode_tensor(ids))
  return req


def test_the_request_ids_are_parsed_and_bad_ones_refused_naming_the_field():
  _, ids = _host()
  ok = scored.parse_ids(_request(ids), vocab_size=TRUE_V, max_ids=N, batch_size=B, seq_len=T)
  np.testing.assert_array_equal(ok, ids)
  assert scored.parse_ids(wire.make_request(1, np.zeros((B, T), np.int32), wire.OutputSpec(k=1)),
                              vocab_size=TRUE_V, max_ids=0, batch_size=B, seq_len=T) is None
  bad = ids.copy()
  bad[1, 2, 3] = TRUE_V
  cases = [(_request(ids), dict(max_ids=0), "this server scores no given ids"),
           (_request(ids), dict(max_ids=N - 1), r"4 ids per position, must be in \[1, 3\] \(limits.max_scored_ids\)"),
           (_request(ids[..., :0]), {}, r"0 ids per position, must be in \[1, 4\]"),
           (_request(ids.astype(np.int64)), {}, "dtype must be DTYPE_INT32"),
           (_request(ids[0]), {}, r"expected 3 dimensions \[B, T, n\], got 2"),
           (_request(ids[:1]), {}, r"shape \[1, 7, 4\] does not match the tokens' \[B, T\] = \[2, 7\]"),
           (_request(bad), {}, r"id 21 at \[1, 2, 3\] is outside the vocabulary \[0, 21\)"),
           (_request(-ids - 1), {}, "is outside the vocabulary")]
  for req, limits, message in cases:
    with pytest.raises(SpecError, match=message) as e:
      scored.parse_ids(req, **{"vocab_size": TRUE_V, "max_ids": N, "batch_size": B, "seq_len": T, **limits})
    assert e.value.field == "part_inputs['scored.ids']"


def test_the_sampled_column_must_be_the_batch_next_token_where_counted():
  _, ids = _host()
  labels = ids[..., 0].copy()
  mask = np.ones((B, T), np.float32)
  scored.check_sampled_column(ids, labels, mask)
  labels[0, 3] += 1
  with pytest.raises(ValueError, match=r"scored_ids: slot 0 at \[0, 3\] is .*1 such counted positions"):
    scored.check_sampled_column(ids, labels, mask)
  mask[0, 3] = 0
  scored.check_sampled_column(ids, labels, mask)
  batch = types.SimpleNamespace(targets=labels, loss_mask=mask)  # what a source checks before sending
  check_part_inputs(batch, scored.request_inputs(ids))
  with pytest.raises(ValueError, match=r"part_inputs\['scored.ids'\]: shape \[2, 6, 4\] does not match the batch's"):
    check_part_inputs(batch, scored.request_inputs(ids[:, 1:]))
  with pytest.raises(ValueError, match="part_inputs: 'scores.ids' is not an input of a registered"):
    check_part_inputs(batch, {"scores.ids": ids})


def test_needs_name_the_limit_a_server_lacks():
  need = needs.Needs(k=1, value_dtype="float16", vocab_size=256, data_vocab_size=256, seq_len=16, batch_rows=2,
                     tokenizer_fingerprint="", hidden_size=None, feature_layers=lambda depth: (), state_names=(),
                     scored=scored.ScoredRequest(3))
  info = pb.GetInfoResponse(vocab_size=256, padded_vocab_size=256, num_layers=2, hidden_size=8,
                            max_position_embeddings=64, value_dtypes=[pb.DTYPE_FLOAT16],
                            limits=pb.Limits(max_k=8, max_seq_len=32))
  assert needs.check(need, needs.Offer.from_info(info)) == [
      "part_limits['scored.max_ids']: the loss needs the teacher's logits at 3 ids per position, the teacher scores "
      "no given ids (start it with limits.max_scored_ids >= 3)"]
  stored = needs.Offer(stored=True, vocab_size=256, num_layers=2, hidden_size=8, seq_len=16, max_k=8,
                       value_dtypes=("float16",))
  assert needs.check(need, stored)[-1].startswith(
      "scored.ids: the loss scores 3 ids per position chosen at training time; stored answers cannot hold them")
  info.limits.part_limits["scored.max_ids"] = 2
  assert "scores at most 2" in needs.check(need, needs.Offer.from_info(info))[0]
  info.limits.part_limits["scored.max_ids"] = 3
  assert needs.check(need, needs.Offer.from_info(info)) == []


@pytest.mark.parametrize("chunk_size", [0, 5])
def test_the_engine_scores_each_row_ids_padded_to_its_bucket(chunk_size):
  """The JAX engine's logits at each row's ids (fewer rows, positions and ids than the bucket, padded by
  `fill_inputs` as the batcher does) equal compute_targets on the same whole logits."""
  cfg = build(ModelConfig, {**resolve_preset("tiny"), "true_vocab_size": 350})
  model = checkpoints.load_model(cfg, seed=5)
  eng = JaxEngine(model, buckets=[(8, 16)], max_k=6, max_temperatures=2, selectable_layers=[], state_names=[],
                  max_scored_ids=4, mesh=MeshConfig(data=-1), chunk_size=chunk_size)
  assert set(eng.warmup()) == {"8x16", "8x16+scored"}
  part = parts.BY_NAME["scored"]
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 350, (8, 16), dtype=np.int32)
  seg = np.ones_like(tokens)
  seg[2:] = 0  # padding rows
  positions = np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy()
  asked = rng.integers(0, 350, (2, 12, 3)).astype(np.int32)  # a request of 2 rows x 12 positions, 3 ids each
  inputs = part.engine_inputs(8, 16, {"max_scored_ids": 4})
  request = scored.ScoredRequest(3)
  part.fill_inputs(inputs, slice(0, 2), request, {"ids": asked}, 0, 2)
  out = eng.forward(EngineBatch(tokens, seg, positions, np.ones((8, 2), np.float32), Fetch(k=6, scored=3),
                                {"scored": inputs}))
  logits = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(seg)).logits
  want = compute_targets(logits[:2, :12], k=6, temperatures=(1.0,), true_vocab_size=350, scored_ids=asked)
  got = part.from_engine(out, slice(0, 2), 12, types.SimpleNamespace(parts=(("scored", request),)))
  assert set(got) == {"scored_logits"} and got["scored_logits"].shape == (2, 12, 3)
  np.testing.assert_allclose(got["scored_logits"], np.asarray(want.scored_logits), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"scored: ids of shape \[8, 16, 3\] do not match \[8, 16, 4\]"):
    part.check_engine_inputs(inputs[..., :3], 8, 16, 3, {"max_scored_ids": 4})
