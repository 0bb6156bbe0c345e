"""Server resource limits and malformed input, in process with the fake engine (fast).

Concurrent calls, streams per connection, the bytes a slow reader makes a stream
hold, the receive limit derived from the request limits, unparseable bytes and
over-long echoed values. The same faults against a real server process are in
test_server_faults.py; the request id read from unparseable bytes is tested in tests/unit/test_server_limits.py.
"""

import asyncio
import logging

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_utils import fake_server, until

from distill_core import wire
from distill_core.client import OutputSpec, TeacherClient, TeacherError
from distill_core.proto import teacher_pb2 as pb
from support.fake_engine import FakeEngine, fake_info
from teacher_server.validation import max_request_bytes

FORWARD = "/distill.teacher.v1.Teacher/Forward"
STREAM = "/distill.teacher.v1.Teacher/Stream"
GET_INFO = "/distill.teacher.v1.Teacher/GetInfo"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED


def _gauge(server, name: str) -> float:
  return server.metrics.registry.get_sample_value(name) or 0.0


def _request(request_id: int, rows: int = 1, length: int = 4, **spec) -> pb.ForwardRequest:
  return wire.make_request(request_id, np.full((rows, length), request_id % 256, np.int32),
                           OutputSpec(**{"k": 2, **spec}))


async def test_concurrent_calls_capped_health_spared():
  async with fake_server("max_concurrent_rpcs=3") as (_, address):
    clients = [TeacherClient(address) for _ in range(4)]
    streams = [await c.stream().__aenter__() for c in clients[:3]]
    for s in streams:  # three open streams: the cap
      await (await s.submit(np.ones((1, 2), np.int32), OutputSpec(k=1)))
    with pytest.raises(TeacherError) as e:
      await clients[3].forward(np.ones((1, 2), np.int32), OutputSpec(k=1), timeout=5)
    assert e.value.code == TOO_BIG and "max_concurrent_rpcs 3" in e.value.message
    assert await clients[3].health() == "SERVING"  # probes keep working at the cap
    await streams[0].__aexit__(None, None, None)
    await asyncio.sleep(0.1)
    assert (await clients[3].forward(np.ones((1, 2), np.int32), OutputSpec(k=1), timeout=5)).topk_ids.shape
    for s in streams[1:]:
      await s.__aexit__(None, None, None)
    for c in clients:
      await c.close()


async def test_streams_per_connection_capped():
  async with fake_server("max_streams_per_connection=4") as (_, address):
    async with TeacherClient(address) as client:  # one connection
      assert (await client.info()).limits.max_streams_per_connection == 4
      streams = [await client.stream().__aenter__() for _ in range(4)]
      for s in streams:
        await (await s.submit(np.ones((1, 2), np.int32), OutputSpec(k=1)))
      with pytest.raises(TeacherError) as e:
        await client.forward(np.ones((1, 2), np.int32), OutputSpec(k=1), timeout=5)
      assert e.value.code == TOO_BIG and "max_streams_per_connection 4" in e.value.message
      # Another connection is not affected.
      async with TeacherClient(address, options=[("grpc.use_local_subchannel_pool", 1)]) as other:
        assert (await other.forward(np.ones((1, 2), np.int32), OutputSpec(k=1), timeout=5)).topk_ids.shape
      await streams[0].__aexit__(None, None, None)
      await asyncio.sleep(0.1)
      assert (await client.forward(np.ones((1, 2), np.int32), OutputSpec(k=1), timeout=5)).topk_ids.shape
      for s in streams[1:]:
        await s.__aexit__(None, None, None)


async def test_slow_reader_holds_bounded_bytes():
  # Each answer carries two f32 states of 2 layers x 4 x 32 x 512: 1 MiB; 64 of them unbounded.
  engine = FakeEngine(fake_info(hidden_size=512))
  limit = 4 << 20
  async with fake_server(f"batcher.stream_window_bytes={limit}", engine=engine) as (server, address), \
      grpc.aio.insecure_channel(address) as channel:
    call = channel.stream_stream(STREAM, request_serializer=pb.ForwardRequest.SerializeToString,
                                 response_deserializer=pb.ForwardResponse.FromString)()
    for i in range(64):
      await call.write(_request(i, rows=4, length=32, k=8, layers=(0, 1), states=("attn_in", "attn_out")))
    # The client reads nothing: the server fills its byte budget (within one answer) and stops reading there.
    await until(lambda: _gauge(server, "teacher_stream_held_bytes") > limit - (1 << 20) - 4096, "the budget is full")
    assert _gauge(server, "teacher_stream_held_bytes") <= limit
    computed = len(engine.batches)  # answers computed: those held plus what the transport took
    assert computed <= 24, computed
    await call.done_writing()
    ids = [r.request_id async for r in call]
    assert ids == list(range(64))  # reading resumes and everything is answered, in order
    assert _gauge(server, "teacher_stream_held_bytes") == 0


async def test_receive_limit_derived_from_request_limits():
  async with fake_server() as (server, address), TeacherClient(address) as client:
    limit = max_request_bytes(server.cfg.limits)
    assert limit < 1 << 20 and (await client.info()).limits.max_request_bytes == limit
    for size, code, fragment in ((limit - 40_000, INVALID, "spec.states: unknown state"),
                                 (limit + 1, TOO_BIG, "larger than max")):
      with pytest.raises(TeacherError) as e:
        await client.forward(np.ones((1, 2), np.int32), OutputSpec(k=1, layers=(0,), states=("x" * size,)))
      assert e.value.code == code and fragment in e.value.message, size
      assert len(e.value.message) < 400


LONG_VALUES = {  # values far over the 16 KiB trailer limit when echoed whole
    "spec.states": OutputSpec(k=1, layers=(0,), states=("q" * 30_000,)),
    "spec.layers": OutputSpec(k=1, layers=(0,) * 6000),
    "spec.states ": OutputSpec(k=1, layers=(0,), states=("attn_in",) * 2000),
}


async def test_long_client_values_are_echoed_short():
  async with fake_server() as (_, address), TeacherClient(address) as client:
    for field, spec in LONG_VALUES.items():
      with pytest.raises(TeacherError) as e:
        await client.forward(np.ones((1, 2), np.int32), spec, timeout=10)
      assert e.value.code == INVALID and e.value.message.startswith(field.strip() + ":"), e.value.message[:200]
      assert len(e.value.message) < 400
    req = _request(1)
    req.tokens.shape[:] = [1] * 5000
    with pytest.raises(grpc.aio.AioRpcError) as e:
      await client.stub.Forward(req)
    assert e.value.code() == INVALID and e.value.details().startswith("tokens:") and len(e.value.details()) < 400


GARBAGE = [b"\xff" * 7, b"\x08\x96\x01\x12", b"\x08" + b"\xff" * 11, b"\x12\x05abc",
           # a valid request whose state name is not UTF-8
           _request(7, layers=(0,), states=("attn_in",)).SerializeToString().replace(b"attn_in", b"\xffttn_in")]


async def test_garbage_bytes_are_invalid_argument_without_tracebacks(caplog):
  caplog.set_level(logging.INFO)
  async with fake_server() as (_, address), grpc.aio.insecure_channel(address) as channel:
    forward = channel.unary_unary(FORWARD)
    for data in GARBAGE * 20:
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await forward(data, timeout=5)
      assert e.value.code() == INVALID and e.value.details().startswith("ForwardRequest: "), e.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as e:
      await channel.unary_unary(GET_INFO)(b"\xff\xff", timeout=5)
    assert e.value.code() == INVALID and "GetInfoRequest" in e.value.details()
    # On a stream each bad message gets its own error in order; the good ones around it are answered.
    good = [_request(i).SerializeToString() for i in (1, 2, 3)]
    sent = [good[0], GARBAGE[1], good[1], GARBAGE[0], good[2]]
    call = channel.stream_stream(STREAM, response_deserializer=pb.ForwardResponse.FromString)(iter(sent), timeout=10)
    answers = [a async for a in call]
  assert [a.request_id for a in answers] == [1, 150, 2, 0, 3]  # 150: read from the leading field 1
  assert [a.HasField("error") for a in answers] == [False, True, False, True, False]
  for a in answers[1::2]:
    assert (a.error.code, a.error.field) == (INVALID.value[0], "ForwardRequest")
  text = caplog.text
  assert "Traceback" not in text and "DecodeError" not in text
  lines = [r for r in caplog.records if "malformed request" in r.getMessage()]
  assert 1 <= len(lines) <= 2  # 103 malformed messages, rate-limited to one line per 10 s


async def test_unauthenticated_before_parsing():
  async with fake_server("security.auth_token=t0ken") as (_, address), grpc.aio.insecure_channel(address) as channel:
    for method in (FORWARD, GET_INFO):
      for data in GARBAGE:
        with pytest.raises(grpc.aio.AioRpcError) as e:
          await channel.unary_unary(method)(data, timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    call = channel.stream_stream(STREAM)(timeout=5)  # refused at once, before any message is read
    assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING


async def test_cancelled_stream_rows_leave_shared_batches():
  """Rows of a cancelled stream that share batches with a live one are dropped, not computed."""
  engine = FakeEngine(delay_s=0.03)
  overrides = ("batcher.max_inflight_batches=1", "batcher.max_wait_ms=50")
  async with fake_server(*overrides, engine=engine) as (server, address), \
      grpc.aio.insecure_channel(address) as channel:
    stream = channel.stream_stream(STREAM, request_serializer=pb.ForwardRequest.SerializeToString,
                                   response_deserializer=pb.ForwardResponse.FromString)
    dead, live = stream(), stream()
    for i in range(40):  # one row each: batches of 4 rows mix both streams
      await dead.write(_request(1000 + i))
      await live.write(_request(i))
    await live.done_writing()
    answers = [await live.read()]
    dead.cancel()
    while (a := await live.read()) is not grpc.aio.EOF:
      answers.append(a)
  assert [a.request_id for a in answers] == list(range(40))
  for a in answers:
    assert wire.decode_tensor(a.topk_ids, "ids")[0, 0, 0] == a.request_id % 256
  # 80 rows would take 20 batches; without the dead stream's rows the live one needs 10 (+ those in flight).
  assert len(engine.batches) <= 14, engine.batches
  assert _gauge(server, "teacher_abandoned_requests_total") >= 20


async def test_idle_stream_cancel_leaves_byte_budget_balanced():
  async with fake_server() as (server, address), grpc.aio.insecure_channel(address) as channel:
    call = channel.stream_stream(STREAM, request_serializer=pb.ForwardRequest.SerializeToString,
                                 response_deserializer=pb.ForwardResponse.FromString)()
    for i in range(3):
      await call.write(_request(i))
      assert (await call.read()).request_id == i
    call.cancel()  # the server is waiting for the next request
    await until(lambda: _gauge(server, "teacher_open_streams") == 0, "the cancelled stream is closed")
    assert _gauge(server, "teacher_stream_held_bytes") == 0
