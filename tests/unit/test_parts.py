"""The teacher-target part registry: every registered part through the wire and shard codecs, row slicing and
joining, the pytree, and the needs check naming each mismatch."""

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_core import needs, parts, shards, wire
from distill_core.bitpack import WireError
from distill_core.parts import base
from distill_core.parts import samples as samples_part
from distill_core.parts.samples import SampleRequest
from distill_core.proto import teacher_pb2 as pb
from distill_core.targets import TeacherTargets, compute_targets, compute_targets_from_hidden, concat, slice_batch, \
    to_numpy
from support.fake_engine import FakeEngine
from teacher_server.config import LimitsConfig
from teacher_server.validation import RequestError, prepare

B, T, V, TRUE_V, K, E = 3, 5, 40, 37, 4, 6


def full_targets(dtype="float16") -> TeacherTargets:
  """Numpy targets with every part that travels: top-k, two states at two layers, tail samples, three scored ids
  per position."""
  rng = np.random.default_rng(0)
  scored = rng.integers(0, TRUE_V, size=(B, T, 3)).astype(np.int32)
  states = {"attn_in": jnp.asarray(rng.normal(size=(2, B, T, E)), jnp.float32),
            "attn_out": jnp.asarray(rng.normal(size=(2, B, T, E)), jnp.float32)}
  out = compute_targets(jnp.asarray(rng.normal(size=(B, T, V)) * 3, jnp.float32), k=K, temperatures=(1.0, 2.0),
                        true_vocab_size=TRUE_V, value_dtype=dtype, states=states, state_layers=(3, 1), num_samples=6,
                        sample_temperature=1.5, sample_seed=9, example_ids=samples_part.sampling.split_u64(
                            np.arange(B) + 100), sample_exclude=K,
                        scored_ids=scored)
  return jax.tree.map(np.asarray, out)


def assert_same(a: TeacherTargets, b: TeacherTargets) -> None:
  left, right = to_numpy(a), to_numpy(b)
  assert set(left) == set(right)
  for key in left:
    assert left[key].dtype == right[key].dtype, key
    np.testing.assert_array_equal(left[key], right[key], err_msg=key)


def test_registry_names_every_field_once_and_top_k_first():
  assert parts.PARTS[0].name == "topk" and set(parts.BY_NAME) == {"topk", "states", "samples", "scored",
                                                                             "dense"}
  fields = [field for part in parts.PARTS for field in part.fields]
  assert len(fields) == len(set(fields))
  for part in parts.PARTS:
    assert set(part.row_axes) <= set(part.fields) and set(part.positional) <= set(part.fields), part.name
    assert set(part.shared) <= set(part.fields), part.name
  targets = full_targets()
  assert set(targets.parts) == {"topk", "states", "samples", "scored"}
  assert targets.part("samples").sample_skip == K and targets.sample_skip == K
  with pytest.raises(KeyError, match="no teacher-target part 'scores'"):
    targets.part("scores")


@pytest.mark.parametrize("packed, delta", [(0, False), (6, True)])
def test_every_part_round_trips_through_the_wire(packed, delta):
  targets = full_targets()
  resp = wire.targets_to_response(7, targets, packed_id_bits=packed, sorted_delta_values=delta)
  back = wire.response_to_targets(pb.ForwardResponse.FromString(resp.SerializeToString()))
  assert set(back.parts) == set(targets.parts) and back.state_layers == (3, 1) and back.sample_skip == K
  assert_same(back, targets)


def test_every_part_round_trips_through_a_shard_record():
  targets = full_targets()
  spec = shards.StoredSpec.build(wire.OutputSpec(k=K, temperatures=(1.0, 2.0), layers=(3, 1),
                                                 states=("attn_in", "attn_out"), pack_ids=True,
                                                 samples=SampleRequest(6, 1.5, 9, K)),
                                 id_bits=6, value_coding="sorted_delta", zstd_level=0)
  assert spec.samples == SampleRequest(6, 1.5, 9, K)
  for row in range(B):
    one = slice_batch(targets, row, row + 1)
    example_id, back = shards.decode_record(shards.encode_record(40 + row, one, spec, weights_fingerprint="w"),
                                            "r", weights_fingerprint="w")
    assert example_id == 40 + row
    assert_same(back, one)


def test_dense_part_stays_in_process():
  targets = full_targets().replace(dense_logits=np.zeros((B, T, V), np.float32))
  assert "dense" in targets.parts and targets.has_dense
  back = wire.response_to_targets(wire.targets_to_response(1, targets))
  assert "dense" not in back.parts and back.dense_logits is None


def test_rows_slice_and_join_part_by_part():
  targets = full_targets()
  pieces = [slice_batch(targets, 0, 1), slice_batch(targets, 1, B)]
  assert pieces[1].batch_size == 2 and pieces[1].layer_states["attn_in"].shape == (2, 2, T, E)
  assert pieces[1].sample_ids.shape[0] == 2 and pieces[1].sample_temperature.shape == ()
  assert_same(concat(pieces), targets)
  plain = slice_batch(targets, 0, 1).replace(sample_ids=None, sample_counts=None, sample_logits=None,
                                             sample_logsumexp=None, sample_temperature=None, sample_skip=0)
  assert "samples" not in plain.parts
  with pytest.raises(ValueError, match="concat: part 1 disagrees with part 0 on the sampled targets"):
    concat([plain, pieces[1]])
  no_states = pieces[1].replace(layer_states={}, state_layers=())
  with pytest.raises(ValueError, match=r"concat: part 1 has states \[\] at layers \(\)"):
    concat([pieces[0], no_states])


def test_pytree_keeps_static_metadata_through_jit():
  targets = full_targets()
  leaves = jax.tree.leaves(targets)
  assert len(leaves) == 4 + 2 + 5 + 2  # top-k 4, two states, samples 5, scored 2 (sample_skip and state_layers
  # are static)
  out = jax.jit(lambda t: t.replace(logsumexp=t.logsumexp + 1))(targets)
  assert out.state_layers == (3, 1) and out.sample_skip == K
  np.testing.assert_allclose(np.asarray(out.logsumexp), targets.logsumexp + 1)


def test_unknown_fields_and_arguments_are_named():
  with pytest.raises(TypeError, match="unknown fields score_values"):
    TeacherTargets(topk_ids=None, topk_logits=None, logsumexp=None, temperatures=(1.0,), score_values=1)
  with pytest.raises(TypeError, match="unknown field 'score_values'"):
    full_targets().replace(score_values=1)
  with pytest.raises(TypeError, match="unknown argument 'score_ids'"):
    compute_targets(jnp.zeros((1, 2, 8)), k=2, temperatures=(1.0,), true_vocab_size=8, score_ids=1)


# -- needs and offers ------------------------------------------------------------------------------

def _needs(**changes) -> needs.Needs:
  base = dict(k=8, value_dtype="float16", vocab_size=256, data_vocab_size=256, seq_len=16, batch_rows=4,
              tokenizer_fingerprint="tok", hidden_size=8, feature_layers=lambda depth: (0, 1),
              state_names=("attn_in", "attn_out"), samples=SampleRequest(12, 2.0, 5, 8), temperatures=(2.0,),
              dataset_fingerprint="data", state_dtype="bfloat16")
  return needs.Needs(**{**base, **changes})


def _info(**limits) -> pb.GetInfoResponse:
  return pb.GetInfoResponse(
      vocab_size=256, padded_vocab_size=256, num_layers=2, hidden_size=8, max_position_embeddings=64,
      value_dtypes=[pb.DTYPE_FLOAT16], state_dtypes=[pb.DTYPE_BFLOAT16], state_names=["attn_in", "attn_out"],
      tokenizer_fingerprint="tok", limits=pb.Limits(**{"max_k": 8, "max_seq_len": 32, "selectable_layers": [0, 1],
                                                      "max_samples": 16, **limits}))


def test_a_server_that_fits_has_no_problems_and_each_mismatch_is_named():
  assert needs.check(_needs(), needs.Offer.from_info(_info())) == []
  info = _info(max_k=4, max_seq_len=8, selectable_layers=[0], max_samples=0)
  info.value_dtypes[:] = [pb.DTYPE_FLOAT32]
  info.state_names[:] = ["attn_out"]
  info.hidden_size = 16
  problems = needs.check(_needs(), needs.Offer.from_info(info))
  expected = ["sequence length: batches have T=16, the teacher's longest bucket is 8",
              "top_k: the loss needs k=8, the teacher serves at most 4",
              "value_dtype: float16 not offered (offered: ['float32'])",
              "layers: the losses need teacher layers [1], not selectable (selectable: [0])",
              "layers: the teacher does not offer attn_in states (offered: ['attn_out'])",
              "layers: teacher width 16 != student width 8",
              "num_samples: the loss needs 12 draws per position, the teacher serves no sampled targets"]
  assert len(problems) == len(expected), problems
  for want, got in zip(expected, problems):
    assert got.startswith(want), (want, got)


def _manifest(**spec_changes) -> shards.Manifest:
  request = wire.OutputSpec(k=8, temperatures=(1.0, 2.0), layers=(0, 1), states=("attn_in", "attn_out"),
                            samples=SampleRequest(12, 2.0, 5, 8))
  request = dataclasses.replace(request, **spec_changes)
  spec = shards.StoredSpec.build(request, id_bits=0, value_coding="raw", zstd_level=0)
  teacher = shards.TeacherInfo(model_type="llama", weights_fingerprint="w", tokenizer_fingerprint="tok",
                               vocab_size=256, num_layers=2, hidden_size=8)
  dataset = shards.DatasetInfo(path="d", dataset_fingerprint="data", tokenizer_fingerprint="tok", seq_len=16,
                               splits={"train": 1})
  return shards.Manifest(teacher=teacher, dataset=dataset, spec=spec, writers=[], shards=[], records=0,
                         positions=0, tokens=0, bytes=0, complete=False)


def test_stored_answers_that_fit_have_no_problems_and_each_mismatch_is_named():
  assert needs.check(_needs(), needs.Offer.from_manifest(_manifest())) == []
  stored = _manifest(k=4, value_dtype="float32", temperatures=(1.0,), layers=(0,), states=("attn_out",),
                     samples=SampleRequest(6, 1.0, 1, 0))
  problems = needs.check(_needs(dataset_fingerprint="other", hidden_size=16, weights_fingerprint="v"),
                         needs.Offer.from_manifest(stored))
  expected = ["dataset.dataset_fingerprint: stored 'data', data.path has 'other'",
              "teacher.weights_fingerprint: stored 'w', teacher.offline.weights_fingerprint is 'v'",
              "spec.k: stored 4, loss.top_k needs 8",
              "spec.value_dtype: stored 'float32', teacher.value_dtype is 'float16'",
              "temperatures: stored [1.0], loss.temperature needs 2.0 (an exact match)",
              "spec.layers: stored [0], the losses need teacher layers [0, 1]",
              "spec.states: stored ['attn_out'], the losses need ['attn_in', 'attn_out']",
              "teacher.hidden_size: stored 8, the student's 16",
              "spec.num_samples: stored 6, loss.num_samples is 12",
              "spec.sample_temperature: stored 1.0, loss.sample_temperature is 2.0",
              "spec.sample_seed: stored 1, loss.sample_seed is 5",
              "spec.sample_tail: stored False, loss.sample_tail is True"]
  assert len(problems) == len(expected), problems
  for want, got in zip(expected, problems):
    assert got.startswith(want), (want, got)
  none = needs.check(_needs(), needs.Offer.from_manifest(_manifest(samples=None)))
  assert none == ["spec.num_samples: stored no sampled targets, loss.kd_mode sampled needs 12 per position "
                  "(dump with num_samples=12)"]


# -- a part added without touching the proto, the wire codec or the shards ---------------------------

@flax.struct.dataclass
class Scores:
  """Stands for a part registered later: the shifted teacher logit at one given id per position."""

  score_logits: np.ndarray = None  # (B, T) f32


class ScoresPart(base.Part):
  name = "scores"
  value_type = Scores
  row_axes = {"score_logits": 0}
  positional = ("score_logits",)
  compute_args = ("score_ids",)
  positional_args = ("score_ids",)

  def compute(self, block, score_ids=None):
    if score_ids is None:
      return None
    return Scores(jnp.take_along_axis(block.z, jnp.asarray(score_ids)[..., None], axis=-1)[..., 0])

  def validate(self, value, rows, expect):
    base.check_array(value.score_logits, "score_logits", 2, base.FLOAT32)
    if tuple(value.score_logits.shape) != (rows.batch_size, rows.seq_len):
      raise ValueError(f"score_logits: shape {tuple(value.score_logits.shape)} != [B, T]")

  def encode(self, value, resp, *, packed_id_bits, sorted_delta_values):
    self.put_output(resp, "score_logits", np.asarray(value.score_logits, np.float32))

  def decode(self, resp, rows):
    logits = self.get_output(resp, "score_logits", dtypes=(pb.DTYPE_FLOAT32,), ndim=2)
    return {} if logits is None else {"score_logits": logits}


def test_a_new_part_travels_through_compute_wire_shards_and_rows_by_registration_alone():
  rng = np.random.default_rng(5)
  hidden = jnp.asarray(rng.normal(size=(B, T, E)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(E, V)), jnp.float32)
  head = lambda h: jnp.einsum("bte,ev->btv", h, w)  # noqa: E731
  ids = rng.integers(0, TRUE_V, size=(B, T)).astype(np.int32)
  with parts.registered(ScoresPart()):
    whole = compute_targets(head(hidden), k=K, temperatures=(1.0,), true_vocab_size=TRUE_V, score_ids=ids)
    assert whole.has_scores and not whole.has_samples
    z = np.asarray(head(hidden), np.float64)[..., :TRUE_V]
    want = np.take_along_axis(z - z.max(-1, keepdims=True), ids[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(whole.score_logits), want, rtol=1e-5, atol=1e-5)
    chunked = compute_targets_from_hidden(hidden, head, chunk_size=2, k=K, temperatures=(1.0,),
                                          true_vocab_size=TRUE_V, score_ids=ids)
    np.testing.assert_allclose(np.asarray(chunked.score_logits), np.asarray(whole.score_logits), rtol=1e-6)
    host = jax.tree.map(np.asarray, whole).validate()
    resp = wire.targets_to_response(3, host)
    assert list(resp.part_outputs) == ["scores.score_logits"]
    assert_same(wire.response_to_targets(pb.ForwardResponse.FromString(resp.SerializeToString())), host)
    spec = shards.StoredSpec.build(wire.OutputSpec(k=K, part_options=(("scores.ids_per_position", 1),)), id_bits=0,
                                   value_coding="raw", zstd_level=0)
    one = slice_batch(host, 1, 2)
    assert_same(shards.decode_record(shards.encode_record(9, one, spec, weights_fingerprint="w"), "r")[1], one)
    assert_same(concat([slice_batch(host, 0, 1), slice_batch(host, 1, B)]), host)
  with pytest.raises(WireError, match=r"part_outputs\['scores.score_logits'\]: no registered target part"):
    wire.response_to_targets(resp)
  with pytest.raises(ValueError, match="'topk' is registered already"):
    parts.register(parts.BY_NAME["topk"])


@pytest.mark.parametrize("where", ["spec.part_options", "part_inputs"])
def test_a_server_refuses_options_and_inputs_of_parts_it_does_not_run(where):
  req = wire.make_request(1, np.zeros((1, 4), np.int32), wire.OutputSpec(k=2))
  target = req.spec.part_options if where == "spec.part_options" else req.part_inputs
  target["scores.ids"].CopyFrom(wire.encode_tensor(np.zeros((1, 4), np.int32)))
  with pytest.raises(RequestError, match=rf"{where}\['scores.ids'\]: no target part this server runs takes it"):
    prepare(req, FakeEngine().info, LimitsConfig())
