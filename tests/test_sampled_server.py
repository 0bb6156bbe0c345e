"""Sampled targets through the wire, the server (fake engine) and the JAX engine."""

import grpc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from server_utils import fake_server

from distill_core import checkpoints, sampling, wire
from distill_core.client import OutputSpec, TeacherClient
from distill_core.config import build, resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.parts.samples import SampleRequest
from distill_core.proto import teacher_pb2 as pb
from distill_core.proto import teacher_pb2_grpc
from distill_core.sharding import MeshConfig
from distill_core.targets import compute_targets
from teacher_server.engine import JaxEngine
from teacher_server.engine_api import EngineBatch, Fetch, SampleBatch
from teacher_server.fake_engine import FakeEngine, fake_info

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _sampled(seed=0, b=2, t=5, v=300, k=4, n=12, exclude=4, dtype="float16"):
  z = np.random.default_rng(seed).normal(size=(b, t, v)).astype(np.float32) * 2
  out = compute_targets(jnp.asarray(z), k=k, temperatures=(1.0, 2.0), true_vocab_size=v - 10, value_dtype=dtype,
                        num_samples=n, sample_temperature=1.5, sample_seed=99,
                        example_ids=sampling.split_u64(np.arange(b) + 7), sample_exclude=exclude)
  return jax.tree.map(np.asarray, out)


@pytest.mark.parametrize("packed", [0, 9])
def test_wire_round_trip_sends_only_the_drawn_slots(packed):
  targets = _sampled()
  resp = wire.targets_to_response(3, targets, packed_id_bits=packed)
  used = int((targets.sample_counts > 0).sum())
  assert list(resp.sample_ids.shape) == [used] and used < targets.sample_counts.size  # duplicates fold
  assert resp.sample_counts.packed_bits == (wire.bits_for(int(targets.sample_counts.max()) + 1) if packed else 0)
  back = wire.response_to_targets(pb.ForwardResponse.FromString(resp.SerializeToString()))
  assert back.sample_skip == 4 and float(back.sample_temperature) == 1.5
  for name in ("sample_ids", "sample_counts", "sample_logits", "sample_logsumexp", "topk_ids"):
    np.testing.assert_array_equal(getattr(back, name), getattr(targets, name), err_msg=name)
  assert back.sample_logits.dtype == np.float16
  plain = wire.response_to_targets(wire.targets_to_response(3, targets.replace(
      sample_ids=None, sample_counts=None, sample_logits=None, sample_logsumexp=None, sample_temperature=None,
      sample_skip=0)))
  assert not plain.has_samples
  bad = pb.ForwardResponse.FromString(resp.SerializeToString())
  bad.sample_ids.CopyFrom(wire.encode_tensor(np.zeros(used - 1, np.int32)))
  with pytest.raises(wire.WireError, match="sample_ids"):
    wire.response_to_targets(bad)
  bad = pb.ForwardResponse.FromString(resp.SerializeToString())
  bad.sample_temperature = float("nan")
  with pytest.raises(wire.WireError, match="sample_temperature"):
    wire.response_to_targets(bad)


def test_spec_and_request_encoding():
  spec = OutputSpec(k=4, samples=SampleRequest(8, 2.0, 2**63 + 5, exclude=4))
  msg = spec.to_proto()
  assert msg.HasField("num_samples") and msg.num_samples == 8 and msg.sample_tail and msg.sample_seed == 2**63 + 5
  assert not OutputSpec(k=4).to_proto().HasField("num_samples")
  with pytest.raises(ValueError, match="example_ids"):
    wire.make_request(1, np.zeros((2, 3), np.int32), spec)
  with pytest.raises(ValueError, match="exclude"):
    OutputSpec(k=4, samples=SampleRequest(8, exclude=2)).to_proto()


def _sample_req(tokens=None, example_ids=(0, 1), **spec_fields):
  tokens = np.zeros((2, 8), np.int32) if tokens is None else tokens
  req = wire.make_request(5, tokens, OutputSpec(k=2))
  for key, value in {"num_samples": 4, **spec_fields}.items():
    if value is not None:
      setattr(req.spec, key, value)
  if example_ids is not None:
    req.example_ids.CopyFrom(wire.encode_tensor(np.asarray(example_ids, np.int64)))
  return req


BAD_SAMPLING = {
    "N = 0": (lambda: _sample_req(num_samples=0), "spec.num_samples: num_samples = 0 must be in [1, 8]"),
    "N over the limit": (lambda: _sample_req(num_samples=9), "spec.num_samples: num_samples = 9 must be in [1, 8]"),
    "tau = 0": (lambda: _sample_req(sample_temperature=0.0), "spec.sample_temperature: sample_temperature 0.0"),
    "tau < 0": (lambda: _sample_req(sample_temperature=-1.0), "spec.sample_temperature: sample_temperature -1.0"),
    "tau NaN": (lambda: _sample_req(sample_temperature=float("nan")), "spec.sample_temperature: sample_temperature nan"),
    "tau inf": (lambda: _sample_req(sample_temperature=float("inf")), "spec.sample_temperature"),
    "no example ids": (lambda: _sample_req(example_ids=None), "example_ids: required with spec.num_samples"),
    "too few ids": (lambda: _sample_req(example_ids=(3,)), "example_ids: 1 ids for 2 rows"),
    "negative id": (lambda: _sample_req(example_ids=(3, -2)), "example_ids: example id -2"),
    "int32 ids": (lambda: _with_ids(_sample_req(), np.zeros(2, np.int32)), "example_ids: dtype DTYPE_INT32"),
    "tau without N": (lambda: _sample_req(num_samples=None, sample_temperature=2.0), "spec.num_samples: sample_temp"),
    "tail with k = vocab": (lambda: _tail_k(_sample_req(sample_tail=True), 256), "spec.sample_tail: k = 256 leaves"),
}


def _with_ids(req, ids):
  req.example_ids.CopyFrom(wire.encode_tensor(ids))
  return req


def _tail_k(req, k):
  req.spec.k = k
  return req


async def test_bad_sampling_specs_get_invalid_argument_naming_the_field():
  info = fake_info(max_k=256)
  async with fake_server("limits.max_k=256", engine=FakeEngine(info)) as (_, address), \
      grpc.aio.insecure_channel(address) as channel:
    stub = teacher_pb2_grpc.TeacherStub(channel)
    for name, (make, message) in BAD_SAMPLING.items():
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Forward(make())
      assert e.value.code() == INVALID, name
      assert message in e.value.details(), (name, e.value.details())
    # On one stream: every bad request gets its own error naming the field; good ones are answered.
    requests = []
    for i, (make, _) in enumerate(BAD_SAMPLING.values()):
      bad, ok = make(), _sample_req()
      bad.request_id, ok.request_id = 2 * i, 2 * i + 1
      requests += [bad, ok]
    answers = [r async for r in stub.Stream(iter(requests))]
    assert [a.request_id for a in answers] == list(range(len(requests)))
    for (name, (_, message)), bad, ok in zip(BAD_SAMPLING.items(), answers[::2], answers[1::2]):
      assert bad.HasField("error") and bad.error.code == INVALID.value[0], name
      assert message in bad.error.message and message.startswith(bad.error.field), (name, bad.error.field)
      assert not ok.HasField("error") and list(ok.sample_counts.shape) == [2, 8, 4], name
  async with fake_server(engine=FakeEngine(fake_info(max_samples=0))) as (_, address), \
      grpc.aio.insecure_channel(address) as channel:
    with pytest.raises(grpc.aio.AioRpcError, match="spec.num_samples: this server does not offer") as e:
      await teacher_pb2_grpc.TeacherStub(channel).Forward(_sample_req())
    assert e.value.code() == INVALID


async def test_fake_server_serves_samples_next_to_plain_requests():
  tokens = np.arange(3 * 20, dtype=np.int32).reshape(3, 20) % 256
  eids = np.array([10, 2**40, 7], np.int64)
  spec = OutputSpec(k=3, samples=SampleRequest(num_samples=5, temperature=2.0, seed=4, exclude=3), pack_ids=True)
  async with fake_server() as (_, address), TeacherClient(address) as client:
    info = await client.info()
    assert info.limits.max_samples == 8
    async with client.stream() as stream:
      futures = [await stream.submit(tokens, spec, example_ids=eids), await stream.submit(tokens, OutputSpec(k=3))]
      got, plain = [await f for f in futures]
  assert not plain.has_samples
  assert got.sample_ids.shape == (3, 20, 5) and got.sample_skip == 3 and float(got.sample_temperature) == 2.0
  base = (eids + 4 + 3)[:, None] + np.arange(20)[None, :]
  pair = np.sort(np.stack([base % 256, (base + 1) % 256], -1), -1)
  np.testing.assert_array_equal(got.sample_ids[..., :2], pair)
  np.testing.assert_array_equal(got.sample_counts[..., :2], np.broadcast_to([3, 2], (3, 20, 2)))
  assert np.all(got.sample_counts[..., 2:] == 0) and np.all(got.sample_ids[..., 2:] == 0)
  np.testing.assert_allclose(got.sample_logsumexp, 2.25)


@pytest.mark.parametrize("chunk_size", [0, 5])  # whole rows; blocks of 5 positions (not dividing 16)
def test_engine_draws_match_the_local_computation_whatever_the_row(chunk_size):
  """The engine's per-row draws (padding rows, per-row N, tau, seed, tail) equal compute_targets on the
  same whole logits, whether the engine works per block of positions or not, and the slots copied to
  the host follow the batch's largest N."""
  cfg = build(ModelConfig, {**resolve_preset("tiny"), "true_vocab_size": 350})
  model = checkpoints.load_model(cfg, seed=5)
  eng = JaxEngine(model, buckets=[(8, 16)], max_k=6, max_temperatures=2, selectable_layers=[], state_names=[],
                  max_samples=16, mesh=MeshConfig(data=-1),  # 8 virtual devices: the batch is split
                  chunk_size=chunk_size)
  timings = eng.warmup()
  assert set(timings) == {"8x16", "8x16+samples"}
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 350, (8, 16), dtype=np.int32)
  seg = np.ones_like(tokens)
  seg[3:] = 0  # padding rows, as the batcher sends them
  positions = np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy()
  draws = SampleBatch.empty(8)
  draws.num_samples[:3] = (5, 12, 1)
  draws.temperatures[:3] = (1.0, 2.0, 0.5)
  draws.seeds[:3] = sampling.split_u64(np.array([3, 3, 2**50]))
  draws.example_ids[:3] = sampling.split_u64(np.array([11, 12, 13]))
  draws.exclude[:3] = (0, 6, 2)
  batch = EngineBatch(tokens, seg, positions, np.ones((8, 2), np.float32), Fetch(k=6, samples=12), draws)
  out = eng.forward(batch)
  assert out.sample_ids.shape == (8, 16, 16) and eng.compilations() == 2  # ladder entry >= 12 is 16
  logits = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(seg)).logits
  for row in range(3):
    want = compute_targets(logits[row:row + 1], k=6, temperatures=(1.0,), true_vocab_size=350,
                           num_samples=int(draws.num_samples[row]),
                           sample_temperature=float(draws.temperatures[row]), sample_seed=draws.seeds[row],
                           example_ids=draws.example_ids[row:row + 1], sample_exclude=int(draws.exclude[row]))
    n = int(draws.num_samples[row])
    np.testing.assert_array_equal(out.sample_ids[row, :, :n], np.asarray(want.sample_ids[0]))
    np.testing.assert_array_equal(out.sample_counts[row, :, :n], np.asarray(want.sample_counts[0]))
    assert np.all(out.sample_counts[row, :, n:] == 0) and np.all(out.sample_counts[row].sum(-1) == n)
    np.testing.assert_allclose(out.sample_logsumexp[row], np.asarray(want.sample_logsumexp[0]), rtol=1e-5)
    np.testing.assert_allclose(out.sample_logits[row, :, :n].astype(np.float32),
                               np.asarray(want.sample_logits[0], np.float32), rtol=1e-3, atol=1e-3)
    assert np.all(out.sample_ids[row] < 350)
  assert np.all(out.sample_counts[3:] == 0)
  plain = eng.forward(EngineBatch(tokens, seg, positions, np.ones((8, 2), np.float32), Fetch(k=6)))
  assert plain.sample_ids is None and eng.compilations() == 2


async def test_student_plan_checks_the_server_sampling_limit():
  from remote_utils import fake_requirements

  from distill_core.stream.checks import TeacherMismatch, plan_requests
  need = fake_requirements(samples=SampleRequest(12, 1.0, 3, exclude=4))
  async with fake_server(engine=FakeEngine(fake_info(max_samples=0))) as (_, address), TeacherClient(address) as c:
    with pytest.raises(TeacherMismatch, match=r"num_samples: .* 12 draws .* no sampled targets .*max_samples >= 12"):
      plan_requests(await c.info(), need, state_dtype="bfloat16", pack_ids=True, rows_per_request=None,
                    max_message_bytes=1 << 26)
  async with fake_server("limits.max_samples=16", engine=FakeEngine(fake_info(max_samples=16))) as (_, address), \
      TeacherClient(address) as c:
    info = await c.info()
    plan = plan_requests(info, need, state_dtype="bfloat16", pack_ids=True, rows_per_request=None,
                         max_message_bytes=1 << 26)
    plain = plan_requests(info, fake_requirements(), state_dtype="bfloat16", pack_ids=True, rows_per_request=None,
                          max_message_bytes=1 << 26)
  spec = plan.spec(1.0).to_proto()
  assert spec.num_samples == 12 and spec.sample_tail and spec.sample_seed == 3
  assert plan.row_bytes(16, 8) > plain.row_bytes(16, 8)
