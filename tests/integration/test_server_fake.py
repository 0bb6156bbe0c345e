"""Servicer, batcher and validation against an in-process server with the fake engine (fast)."""

import asyncio

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2
from server_utils import GatedEngine, fake_expected, fake_server, until
from unit.test_server_fake import _positions_reference

from distill_core import wire
from distill_core.client import OutputSpec, TeacherClient, TeacherError
from distill_core.proto import teacher_pb2 as pb
from distill_core.proto import teacher_pb2_grpc
from support.fake_engine import FakeEngine

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_info_reports_model_and_limits():
  async with fake_server() as (_, address), TeacherClient(address) as client:
    info = await client.info()
    assert (info.vocab_size, info.num_layers, info.hidden_size) == (256, 2, 8)
    assert [(b.batch, b.length) for b in info.buckets] == [(4, 16), (4, 32)]
    assert info.limits.max_k == 8 and info.limits.max_seq_len == 32 and info.limits.max_batch == 16
    assert list(info.limits.selectable_layers) == [0, 1] and info.packed_id_bits == 8
    assert info.weights_fingerprint == "fake-weights"
    assert set(info.value_dtypes) == {pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16, pb.DTYPE_FLOAT32}


async def test_forward_values_dtypes_and_states():
  tokens = np.arange(36, dtype=np.int32).reshape(2, 18) * 7 % 256
  seg = np.ones_like(tokens)
  seg[1, 10:] = 2
  spec = OutputSpec(k=3, temperatures=(0.5, 2.0), value_dtype="bfloat16", layers=(1,),
                    states=("attn_in", "attn_out"), state_dtype="bfloat16", pack_ids=True)
  async with fake_server() as (_, address), TeacherClient(address) as client:
    got = await client.forward(tokens, spec, segment_ids=seg)
  ids, logits, lse = fake_expected(tokens, _positions_reference(seg), 3, (0.5, 2.0))
  np.testing.assert_array_equal(got.topk_ids, ids)
  assert got.topk_logits.dtype == np.dtype("bfloat16")
  np.testing.assert_array_equal(got.topk_logits.astype(np.float32), logits)
  np.testing.assert_allclose(got.logsumexp, lse, rtol=1e-6)
  assert got.state_layers == (1,)
  bf16 = lambda x: x.astype(np.dtype("bfloat16")).astype(np.float32)  # noqa: E731
  np.testing.assert_array_equal(got.layer_states["attn_in"][0, :, :, 0].astype(np.float32), bf16(tokens + 1000.0))
  np.testing.assert_array_equal(got.layer_states["attn_out"][0, :, :, 3].astype(np.float32), bf16(tokens + 1000.5))
  assert got.layer_states["attn_out"].shape == (1, 2, 18, 8)


def _req(tokens=None, **spec):
  tokens = np.zeros((2, 8), np.int32) if tokens is None else tokens
  return wire.make_request(5, tokens, OutputSpec(**{"k": 2, **spec}))


def _with(req, field, array=None, **tensor):
  msg = wire.encode_tensor(array) if array is not None else pb.Tensor(**tensor)
  getattr(req, field).CopyFrom(msg)
  return req


BAD_REQUESTS = {
    "no tokens": (lambda: pb.ForwardRequest(request_id=5, spec=pb.OutputSpec(k=2)), INVALID, "tokens: required"),
    "id too big": (lambda: _req(np.full((1, 4), 256, np.int32)), INVALID, "tokens: id 256 at [0, 0] is outside [0, 256)"),
    "negative id": (lambda: _req(np.array([[3, -1]], np.int32)), INVALID, "tokens: id -1 at [0, 1]"),
    "float tokens": (lambda: _with(_req(), "tokens", np.zeros((2, 8), np.float32)), INVALID, "tokens: dtype DTYPE_FLOAT32"),
    "1-D tokens": (lambda: _with(_req(), "tokens", np.zeros(8, np.int32)), INVALID, "tokens: expected shape [B, T]"),
    "empty tokens": (lambda: _with(_req(), "tokens", np.zeros((0, 8), np.int32)), INVALID, "tokens: empty batch"),
    "short bytes": (lambda: _with(_req(), "tokens", dtype=pb.DTYPE_INT32, shape=[2, 8], data=b"\0" * 63),
                    INVALID, "tokens: 63 bytes do not match shape [2, 8]"),
    "bad packing": (lambda: _with(_req(), "tokens", dtype=pb.DTYPE_INT32, shape=[2, 8], data=b"\0" * 3, packed_bits=9),
                    INVALID, "tokens: 3 bytes, expected 18"),
    "segment shape": (lambda: _with(_req(), "segment_ids", np.ones((2, 7), np.int32)), INVALID,
                      "segment_ids: shape [2, 7] != tokens shape [2, 8]"),
    "segment dtype": (lambda: _with(_req(), "segment_ids", np.ones((2, 8), np.int64)), INVALID, "segment_ids: dtype DTYPE_INT64"),
    "negative segment": (lambda: _with(_req(), "segment_ids", -np.ones((2, 8), np.int32)), INVALID, "segment_ids: segment id -1"),
    "position shape": (lambda: _with(_req(), "positions", np.ones((1, 8), np.int32)), INVALID, "positions: shape [1, 8]"),
    "position range": (lambda: _with(_req(), "positions", np.full((2, 8), 32, np.int32)), INVALID,
                       "positions: position 32 at [0, 0] is outside [0, 32)"),
    "k zero": (lambda: _req(k=0), INVALID, "spec.k: k = 0 must be in [1, 8]"),
    "k too big": (lambda: _req(k=9), INVALID, "spec.k: k = 9 must be in [1, 8]"),
    "many temperatures": (lambda: _req(temperatures=(1.0,) * 5), INVALID, "spec.temperatures: 5 temperatures exceed"),
    "zero temperature": (lambda: _req(temperatures=(1.0, 0.0)), INVALID, "spec.temperatures: temperature 0.0"),
    "nan temperature": (lambda: _req(temperatures=(float("nan"),)), INVALID, "spec.temperatures: temperature nan"),
    "unknown layer": (lambda: _req(layers=(2,)), INVALID, "spec.layers: layer 2 is not selectable"),
    "duplicate layer": (lambda: _req(layers=(1, 1)), INVALID, "spec.layers: duplicate"),
    "unknown state": (lambda: _req(layers=(0,), states=("mlp_out",)), INVALID, "spec.states: unknown state 'mlp_out'"),
    "states without layers": (lambda: _req(states=("attn_in",)), INVALID, "spec.layers: states requested without"),
    "int value dtype": (lambda: _req(value_dtype="int32"), INVALID, "spec.value_dtype: INT32"),
    "f16 state dtype": (lambda: _req(layers=(0,), state_dtype="float16"), INVALID, "spec.state_dtype: FLOAT16"),
    "batch over limit": (lambda: _req(np.zeros((17, 4), np.int32)), TOO_BIG, "tokens: batch 17 exceeds max_batch 16"),
    "tokens over limit": (lambda: _req(np.zeros((9, 32), np.int32)), TOO_BIG, "tokens: 288 tokens exceed"),
    "too long": (lambda: _req(np.zeros((1, 33), np.int32)), TOO_BIG, "tokens: length 33 exceeds the longest bucket (32)"),
}


async def test_bad_requests_unary_and_stream_keep_serving():
  async with fake_server() as (_, address), grpc.aio.insecure_channel(address) as channel:
    stub = teacher_pb2_grpc.TeacherStub(channel)
    good = _req(np.array([[1, 2, 3]], np.int32))
    for name, (make, code, message) in BAD_REQUESTS.items():
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Forward(make())
      assert e.value.code() == code, name
      assert message in e.value.details(), (name, e.value.details())
    assert (await stub.Forward(good)).request_id == 5
    # The same requests on one stream: each gets its own error, interleaved good ones are answered.
    requests = []
    for i, (make, _, _) in enumerate(BAD_REQUESTS.values()):
      bad, ok = make(), _req(np.array([[i, 1]], np.int32))
      bad.request_id, ok.request_id = 2 * i, 2 * i + 1
      requests += [bad, ok]
    answers = [r async for r in stub.Stream(iter(requests))]
    assert [a.request_id for a in answers] == list(range(len(requests)))
    for (name, (_, code, message)), bad, ok in zip(BAD_REQUESTS.items(), answers[::2], answers[1::2]):
      assert bad.HasField("error") and bad.error.code == code.value[0], name
      assert message in bad.error.message and message.startswith(bad.error.field + ":"), name
      assert not ok.HasField("error") and ok.topk_ids.shape == [1, 2, 2]


async def test_many_streams_from_many_clients_in_order():
  rng = np.random.default_rng(3)
  async with fake_server() as (_, address):
    async def one_stream(client, sid):
      sent, futures = [], []
      async with client.stream(window=8) as stream:
        for n in range(12):
          b, t = int(rng.integers(1, 7)), int(rng.integers(1, 33))  # b > 4 is split over batches
          tokens = rng.integers(0, 256, (b, t), dtype=np.int32)
          temps = tuple(float(x) for x in rng.uniform(0.5, 3, int(rng.integers(1, 4))))
          k = int(rng.integers(1, 9))
          futures.append(await stream.submit(tokens, OutputSpec(k=k, temperatures=temps), request_id=sid * 100 + n))
          sent.append((tokens, k, temps))
        results = [await f for f in futures]
      for (tokens, k, temps), got in zip(sent, results):
        ids, logits, lse = fake_expected(tokens, _positions_reference(np.ones_like(tokens)), k, temps)
        np.testing.assert_array_equal(got.topk_ids, ids)
        np.testing.assert_array_equal(got.topk_logits.astype(np.float32), logits)
        np.testing.assert_allclose(got.logsumexp, lse, rtol=1e-6)
      return len(results)

    clients = [TeacherClient(address) for _ in range(3)]
    counts = await asyncio.gather(*(one_stream(c, i) for i, c in enumerate(clients * 2)))
    for c in clients:
      await c.close()
  assert counts == [12] * 6


async def test_raw_stream_answers_in_request_order():
  engine = FakeEngine()
  async with fake_server(engine=engine) as (_, address), grpc.aio.insecure_channel(address) as channel:
    stub = teacher_pb2_grpc.TeacherStub(channel)
    # Lengths alternate between the two buckets, so later requests may finish first.
    requests = [_req(np.full((1, 30 if i % 2 else 3), i, np.int32)) for i in range(20)]
    for i, r in enumerate(requests):
      r.request_id = 1000 - i
    answers = [a async for a in stub.Stream(iter(requests))]
  assert [a.request_id for a in answers] == [1000 - i for i in range(20)]
  for i, a in enumerate(answers):
    assert wire.decode_tensor(a.topk_ids, "ids")[0, 0, 0] == i


async def test_requests_are_packed_and_big_ones_split():
  engine = FakeEngine()
  async with fake_server("batcher.max_wait_ms=200", engine=engine) as (_, address), TeacherClient(address) as client:
    tokens = [np.full((1, 5), i, np.int32) for i in range(4)]
    results = await asyncio.gather(*(client.forward(t, OutputSpec(k=1)) for t in tokens))
    assert [int(r.topk_ids[0, 0, 0]) for r in results] == [0, 1, 2, 3]
    assert engine.batches == [(4, 16, False)]  # four requests, one full batch, no waiting
    big = np.arange(10 * 20, dtype=np.int32).reshape(10, 20) % 256
    got = await client.forward(big, OutputSpec(k=2))
    np.testing.assert_array_equal(got.topk_ids[:, :, 0], big)
    assert engine.batches[1:] == [(4, 32, False)] * 3  # 10 rows over three 4-row batches


async def test_backpressure_unary_rejected_stream_waits():
  engine = FakeEngine(delay_s=0.05)
  overrides = ("batcher.queue_size=2", "batcher.max_inflight_batches=1", "batcher.max_wait_ms=0")
  async with fake_server(*overrides, engine=engine) as (_, address), TeacherClient(address) as client:
    tokens = np.ones((4, 4), np.int32)
    outcomes = await asyncio.gather(*(client.forward(tokens, OutputSpec(k=1)) for _ in range(12)),
                                    return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, Exception)]
    assert errors and all(isinstance(e, TeacherError) and e.code == TOO_BIG for e in errors)
    assert "queue full" in errors[0].message
    assert len(errors) < 12
    async with client.stream() as stream:
      futures = [await stream.submit(tokens * i, OutputSpec(k=1)) for i in range(12)]
      results = [await f for f in futures]
    assert [int(r.topk_ids[0, 0, 0]) for r in results] == list(range(12))


async def test_engine_failure_is_per_request():
  async with fake_server(engine=FakeEngine(fail_token=99)) as (_, address), TeacherClient(address) as client:
    async with client.stream() as stream:
      bad = await stream.submit(np.array([[99]], np.int32), OutputSpec(k=1))
      with pytest.raises(TeacherError) as e:
        await bad
      assert e.value.code == grpc.StatusCode.INTERNAL and "injected failure" in e.value.message
      good = await stream.submit(np.array([[7]], np.int32), OutputSpec(k=1))
      assert int((await good).topk_ids[0, 0, 0]) == 7


async def test_drain_answers_in_flight_then_refuses():
  engine = GatedEngine()
  async with fake_server("batcher.max_wait_ms=0", engine=engine) as (server, address):
    client = TeacherClient(address)
    stream = await client.stream().__aenter__()
    futures = [await stream.submit(np.full((4, 4), i, np.int32), OutputSpec(k=1)) for i in range(6)]
    await until(lambda: len(engine.batches) >= 1, "the first batch is running")
    await until(lambda: server.metrics.registry.get_sample_value("teacher_queue_depth") >= 1
                or len(engine.batches) >= 2, "the other requests are admitted")
    drain = asyncio.create_task(server.drain())
    await until(lambda: server._drained, "the drain has begun")  # noqa: SLF001
    status = await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    engine.gate.set()
    await stream.close()
    results = [await f for f in futures]
    await drain
    assert [int(r.topk_ids[0, 0, 0]) for r in results] == list(range(6))
    with pytest.raises(TeacherError) as e:
      await client.info(timeout=2)
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    await client.close()


async def test_metrics_count_requests_tokens_and_errors():
  async with fake_server() as (server, address), TeacherClient(address) as client:
    await client.forward(np.ones((2, 5), np.int32), OutputSpec(k=1))
    with pytest.raises(TeacherError):
      await client.forward(np.ones((2, 5), np.int32), OutputSpec(k=0))
    reg = server.metrics.registry
    assert reg.get_sample_value("teacher_requests_total", {"method": "Forward", "code": "OK"}) == 1
    assert reg.get_sample_value("teacher_errors_total", {"code": "INVALID_ARGUMENT"}) == 1
    assert reg.get_sample_value("teacher_tokens_total") == 10
    assert reg.get_sample_value("teacher_batch_fill_ratio_sum") == pytest.approx(10 / 64)
    assert reg.get_sample_value("teacher_batches_total", {"bucket": "4x16"}) == 1


async def test_cancelled_stream_does_not_disturb_others():
  engine = GatedEngine()
  async with fake_server("batcher.max_wait_ms=0", engine=engine) as (server, address):
    async with TeacherClient(address) as client:
      stream = await client.stream().__aenter__()
      doomed = [await stream.submit(np.full((4, 4), i, np.int32), OutputSpec(k=1)) for i in range(4)]
      await until(lambda: len(engine.batches) >= 1, "a doomed batch is running")  # and held there
      stream.cancel()
      for future in doomed:
        with pytest.raises(TeacherError) as e:
          await future
        assert e.value.code == grpc.StatusCode.CANCELLED
      engine.gate.set()
      got = await client.forward(np.full((2, 3), 9, np.int32), OutputSpec(k=2))
      np.testing.assert_array_equal(got.topk_ids[..., 1], np.full((2, 3), 10))
    await until(lambda: server.metrics.registry.get_sample_value("teacher_open_streams") == 0,
                "the cancelled stream is closed")


async def test_requests_sharing_a_batch_each_get_their_own_outputs():
  """One engine batch copies the union of its requests' outputs; each answer is trimmed to its own spec."""
  engine = FakeEngine()
  tokens = [np.full((2, 16), 10 * (i + 1), np.int32) for i in range(2)]
  specs = [OutputSpec(k=3, value_dtype="float16", layers=(1,), states=("attn_out",), state_dtype="bfloat16"),
           OutputSpec(k=6, value_dtype="float32", layers=(0,), states=("attn_in",), state_dtype="bfloat16")]
  async with fake_server("batcher.max_wait_ms=200", engine=engine) as (_, address), TeacherClient(address) as client:
    got = await asyncio.gather(*(client.forward(t, s) for t, s in zip(tokens, specs)))
  assert engine.batches == [(4, 16, True)]  # both requests in one full batch
  fetch = engine.fetches[0]
  assert (fetch.k, fetch.value_dtype, fetch.layers, fetch.states) == (6, np.float32, (0, 1), ("attn_in", "attn_out"))
  for answer, spec, t in zip(got, specs, tokens):
    ids, logits, _ = fake_expected(t, np.tile(np.arange(16, dtype=np.int32), (2, 1)), spec.k, (1.0,))
    np.testing.assert_array_equal(answer.topk_ids, ids)
    assert answer.topk_logits.dtype == np.dtype(spec.value_dtype)
    np.testing.assert_array_equal(answer.topk_logits.astype(np.float32), logits)
    assert answer.state_layers == spec.layers and set(answer.layer_states) == set(spec.states)
    (name,), (layer,) = spec.states, spec.layers
    want = t + 1000.0 * layer + (0.5 if name == "attn_out" else 0.0)
    np.testing.assert_array_equal(answer.layer_states[name],
                                  np.broadcast_to(want[None, :, :, None], (1, 2, 16, 8)).astype(np.dtype("bfloat16")))
