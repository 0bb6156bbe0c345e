"""Sampled targets through an in-process server (fake engine): bad sampling specs refused by name, samples
next to plain requests, the student's plan against the server's limit (the wire and the JAX engine are
in tests/unit/test_sampled_server.py)."""

import grpc
import numpy as np
import pytest
from server_utils import fake_server

from distill_core import wire
from distill_core.client import OutputSpec, TeacherClient
from distill_core.proto import teacher_pb2_grpc
from distill_core.parts.samples import SampleRequest
from support.fake_engine import FakeEngine, fake_info

INVALID = grpc.StatusCode.INVALID_ARGUMENT


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
