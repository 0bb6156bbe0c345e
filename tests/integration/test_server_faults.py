"""Faults and a second-language client against the real server (`python -m teacher_server`, tiny
random model) in a child process.

Abandoned work of a cancelled stream, over-long echoed values, a fuzz run of
malformed requests (every field, garbage bytes on Forward and Stream, with and
without the token) interleaved with valid requests whose answers must not change,
and a Node.js client written from protos/ alone (tests/node/).
"""

import asyncio
import dataclasses
import hashlib
import json
import shutil
import subprocess

import grpc
import numpy as np
import pytest
from server_utils import REPO, ServerProcess, wait_for

from benchmarks.probes import rss_bytes, scrape_metrics
from distill_core import wire
from distill_core.client import OutputSpec, TeacherClient, TeacherError
from distill_core.netutil import serving
from distill_core.proto import teacher_pb2 as pb

TOKEN = "faults-test-token"
VOCAB = 384  # the tiny preset
MAX_TOKENS = 4096
OVERRIDES = ["model.source=preset", "model.preset=tiny", "model.seed=1", "batcher.buckets=[[8,64]]",
             "limits.max_k=16", "limits.max_batch=64", f"limits.max_tokens_per_request={MAX_TOKENS}",
             "batcher.max_inflight_batches=1", "batcher.max_wait_ms=2", f"security.auth_token={TOKEN}"]
NODE_DIR = REPO / "tests" / "node"
FORWARD = "/distill.teacher.v1.Teacher/Forward"
STREAM = "/distill.teacher.v1.Teacher/Stream"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
# Every request field an error may name (WireError adds ".dtype" / ".packed_bits" to a tensor's name).
FIELDS = ("tokens", "segment_ids", "positions", "spec.k", "spec.temperatures", "spec.value_dtype",
          "spec.state_dtype", "spec.layers", "spec.states", "ForwardRequest")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  proc = ServerProcess(OVERRIDES, tmp_path_factory.mktemp("faults") / "server.log")
  try:
    proc.wait_serving(180)
    yield proc
  finally:
    assert proc.stop() == 0
    assert "Traceback" not in proc.logs()


def metrics(proc) -> dict[str, float]:
  return scrape_metrics(proc.metrics_url)


async def test_cancelled_stream_drops_its_queued_work(server):
  """A client that cancels its stream (every timeout or reconnect does) leaves no engine work behind."""
  n, rows = 40, 64  # each request: 64 rows = 8 engine batches of 8 x 64
  tokens = np.random.default_rng(0).integers(0, VOCAB, (rows, 64), dtype=np.int32)
  before = metrics(server)
  async with TeacherClient(server.address, token=TOKEN) as client:
    call = client.stub.Stream(metadata=client.metadata)
    for i in range(n):
      await call.write(wire.make_request(i, tokens, OutputSpec(k=4)))
    first = await call.read()
    assert first.request_id == 0 and not first.HasField("error")
    call.cancel()
    # A new request queues behind whatever the dead stream left: it comes back once that is gone.
    got = await client.forward(tokens[:8], OutputSpec(k=4), timeout=120)
    assert got.topk_ids.shape == (8, 64, 4)

  def settled():
    m = metrics(server)
    return m.get("teacher_queue_depth") == 0 and m.get("teacher_stream_held_bytes") == 0
  wait_for(settled, 30, "the dead stream to be cleaned up")
  after = metrics(server)
  batches = after["teacher_batches_total{bucket=8x64}"] - before.get("teacher_batches_total{bucket=8x64}", 0)
  abandoned = after["teacher_abandoned_requests_total"] - before.get("teacher_abandoned_requests_total", 0)
  assert abandoned >= n // 2, (abandoned, batches)
  assert batches <= n * 8 // 2, (abandoned, batches)  # without dropping: all 320 (+1) batches run


async def test_slow_reader_cancelled_mid_write_is_quiet(server):
  """A client that stops reading and then cancels (a student timing out) frees what its stream held,
  with no traceback in the server's log."""
  tokens = np.random.default_rng(1).integers(0, VOCAB, (64, 64), dtype=np.int32)
  spec = OutputSpec(k=16, value_dtype="float32", layers=(0, 1), states=("attn_in", "attn_out"),
                    state_dtype="float32")  # ~2.6 MB answers: writes block on flow control
  async with TeacherClient(server.address, token=TOKEN) as client:
    call = client.stub.Stream(metadata=client.metadata)
    for i in range(12):
      await call.write(wire.make_request(i, tokens, spec))
    wait_for(lambda: metrics(server).get("teacher_stream_held_bytes", 0) > 0, 60, "answers held for the reader")
    await asyncio.sleep(0.5)  # the server is blocked writing to a client that does not read
    call.cancel()
  wait_for(lambda: metrics(server).get("teacher_stream_held_bytes") == 0, 30, "the stream's bytes to be freed")
  await asyncio.sleep(1.0)  # a failed write would have been logged by now
  assert "Traceback" not in server.logs()


async def test_long_values_get_invalid_argument_naming_the_field(server):
  tokens = np.ones((1, 4), np.int32)
  async with TeacherClient(server.address, token=TOKEN) as client:
    for field, spec in (("spec.states", OutputSpec(k=1, layers=(0,), states=("s" * 30_000,))),
                        ("spec.layers", OutputSpec(k=1, layers=(0,) * 6000)),
                        ("spec.states", OutputSpec(k=1, layers=(0,), states=("attn_in",) * 2000))):
      with pytest.raises(TeacherError) as e:
        await client.forward(tokens, spec, timeout=30)
      assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.message.startswith(field + ":")
      assert len(e.value.message) < 400
      async with client.stream() as stream:  # the same per request on a stream
        with pytest.raises(TeacherError) as e:
          await (await stream.submit(tokens, spec))
        assert e.value.field == field and len(e.value.message) < 400


# ---- fuzz ----------------------------------------------------------------------------------------

def _valid(i: int, rows: int = 2, length: int = 16) -> pb.ForwardRequest:
  rng = np.random.default_rng(100 + i)
  return wire.make_request(i, rng.integers(0, VOCAB, (rows, length), dtype=np.int32),
                           OutputSpec(k=4, temperatures=(1.0, 2.0)))


def _tensor(**kw) -> pb.Tensor:
  return pb.Tensor(**kw)


def _ints(shape, value=1, dtype=pb.DTYPE_INT32, **kw) -> pb.Tensor:
  arr = np.full(shape, value, np.int32)
  return _tensor(dtype=dtype, shape=list(shape), data=arr.tobytes(), **kw)


def _structured() -> list[pb.ForwardRequest]:
  """Requests that parse but are wrong in one field each."""
  out = []

  def bad(field: str, **spec):
    req = _valid(0)
    if field:
      getattr(req, field).CopyFrom(spec.pop("tensor"))
    for key, value in spec.items():
      if isinstance(value, list):
        getattr(req.spec, key)[:] = value
      else:
        setattr(req.spec, key, value)
    out.append(req)

  out.append(pb.ForwardRequest(request_id=1, spec=pb.OutputSpec(k=1)))  # no tokens
  for t in (_ints((2, 16), dtype=pb.DTYPE_FLOAT32), _ints((2, 16), dtype=pb.DTYPE_INT64), _ints((2, 16), dtype=77),
            _ints((32,)), _ints((2, 4, 4)), _tensor(dtype=pb.DTYPE_INT32, shape=[]), _ints((0, 16)),
            _tensor(dtype=pb.DTYPE_INT32, shape=[2, -16]), _tensor(dtype=pb.DTYPE_INT32, shape=[1 << 40, 1 << 40]),
            _tensor(dtype=pb.DTYPE_INT32, shape=[2, 16], data=b"\x00" * 7), _ints((2, 16), value=-1),
            _ints((2, 16), value=VOCAB), _ints((2, 16), value=2**31 - 1), _ints((65, 16)), _ints((64, 65)),
            _ints((2, 16), packed_bits=33), _ints((2, 16), packed_bits=9), _tensor(dtype=pb.DTYPE_INT32, shape=[1] * 5000),
            _tensor(dtype=pb.DTYPE_INT32, shape=[2, 16], data=b"\x01" * 19, packed_bits=5),
            _ints((2, 16), coding=pb.TENSOR_CODING_SORTED_DELTA), _ints((2, 16), coding=7)):
    bad("tokens", tensor=t)
  for field in ("segment_ids", "positions"):
    for t in (_ints((2, 16), dtype=pb.DTYPE_FLOAT16), _ints((2, 15)), _ints((16, 2)), _ints((2, 16), value=-3),
              _ints((32,)), _tensor(dtype=pb.DTYPE_INT32, shape=[2, 16], data=b"\x00")):
      bad(field, tensor=t)
  bad("positions", tensor=_ints((2, 16), value=10_000))
  for k in (0, -1, 17, 2**31 - 1):
    bad("", k=k)
  for temps in ([0.0], [-1.0], [float("nan")], [float("inf")], [1.0, 2.0, 3.0], [1e-45, 0.0]):
    bad("", temperatures=temps)
  for dtype in (pb.DTYPE_INT32, pb.DTYPE_UINT8, 99):
    bad("", value_dtype=dtype)
  for dtype in (pb.DTYPE_FLOAT16, pb.DTYPE_INT64, 99):
    bad("", layers=[0], state_dtype=dtype)
  for layers in ([-1], [2], [99], [0, 0], [0] * 6000, [2**31 - 1]):
    bad("", layers=layers)
  for states in (["mlp"], ["attn_in", "attn_in"], ["x" * 30_000], ["attn_in"] * 2000, [""]):
    bad("", layers=[0], states=states)
  bad("", states=["attn_in"])  # states without layers
  return out


def _garbage(rng: np.random.Generator, valid: bytes, n: int) -> list[bytes]:
  """Bytes that do not parse (or parse into a request without valid tokens)."""
  out = [b"\x08" + b"\xff" * 10 + b"\x01", b"\x08" + b"\x80" * 12, b"\x12\x7f" + b"\x00" * 5, b"\x12",
         b"\x2a\x03\x08", valid.replace(b"attn", b"\xff\xfe") if b"attn" in valid else valid[:-1],
         b"\x0a\x00", b"\x13\x14\x15"]
  states = _valid(0)
  states.spec.layers[:] = [0]
  states.spec.states[:] = ["attn_in"]
  out.append(states.SerializeToString().replace(b"attn_in", b"\xc3\x28ttn_in"))  # bad UTF-8
  while len(out) < n:
    kind = len(out) % 3
    if kind == 0:
      out.append(rng.bytes(int(rng.integers(1, 300))))
    elif kind == 1:  # a truncated valid request
      out.append(valid[:int(rng.integers(1, len(valid) - 1))])
    else:  # a valid request with random bytes in the middle
      cut = int(rng.integers(1, len(valid) - 1))
      out.append(valid[:cut] + rng.bytes(int(rng.integers(1, 40))) + valid[cut:])
  return out


def _check_error(code: grpc.StatusCode, field: str, message: str, what) -> None:
  assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, message[:200], what)
  assert field.startswith(FIELDS) and message.startswith(field + ":"), (field, message[:200], what)
  assert len(message) < 1000, what


async def test_fuzz_malformed_requests(server):
  rng = np.random.default_rng(7)
  valid = [_valid(i) for i in range(4)]
  structured = _structured()
  garbage = _garbage(rng, valid[0].SerializeToString(), 320)
  sent = {"unary": 0, "stream": 0, "no token": 0}
  async with TeacherClient(server.address, token=TOKEN) as client, \
      grpc.aio.insecure_channel(server.address) as channel:
    expected = [await client.stub.Forward(r, metadata=client.metadata, timeout=60) for r in valid]
    rss_before = rss_bytes(server.proc.pid)

    def same(got: pb.ForwardResponse, i: int):
      assert not got.HasField("error"), got.error
      want, have = wire.response_to_targets(expected[i]), wire.response_to_targets(got)
      np.testing.assert_array_equal(have.topk_ids, want.topk_ids)
      np.testing.assert_allclose(have.logsumexp, want.logsumexp, atol=1e-4)

    raw_forward = channel.unary_unary(FORWARD)
    messages = [r.SerializeToString() for r in structured] + garbage
    # Unary, with the token: every bad request fails the call with a code naming the field.
    for n, data in enumerate(messages):
      try:
        await raw_forward(data, metadata=AUTH, timeout=30)
        raise AssertionError(f"accepted bad request {n}")
      except grpc.aio.AioRpcError as e:
        _check_error(e.code(), e.details().split(":", 1)[0], e.details(), n)
      sent["unary"] += 1
      if n % 10 == 0:
        same(pb.ForwardResponse.FromString(await raw_forward(valid[n % 4].SerializeToString(), metadata=AUTH,
                                                             timeout=60)), n % 4)
    # Stream, with the token: each bad message gets its own error, in order; the valid ones are answered.
    order = []
    for n, data in enumerate(messages):
      order.append(("bad", data))
      if n % 10 == 0:
        order.append(("good", n % 4))
    call = channel.stream_stream(STREAM)(metadata=AUTH, timeout=120)
    reader_answers = []

    async def read_all():
      async for a in call:
        reader_answers.append(pb.ForwardResponse.FromString(a))
    reading = asyncio.create_task(read_all())
    for kind, payload in order:
      await call.write(payload if kind == "bad" else valid[payload].SerializeToString())
    await call.done_writing()
    await asyncio.wait_for(reading, 120)
    assert len(reader_answers) == len(order)
    for (kind, payload), answer in zip(order, reader_answers):
      if kind == "good":
        same(answer, payload)
      else:
        assert answer.HasField("error"), "a bad message was answered with tensors"
        _check_error(grpc.StatusCode(next(c for c in grpc.StatusCode if c.value[0] == answer.error.code)),
                     answer.error.field, answer.error.message, answer.request_id)
        sent["stream"] += 1
    # Without a token (or with a wrong one): UNAUTHENTICATED before anything is parsed.
    for n, data in enumerate(messages):
      metadata = () if n % 2 else (("authorization", "Bearer wrong"),)
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await raw_forward(data, metadata=metadata, timeout=30)
      assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in e.value.details()
      sent["no token"] += 1
    malformed_streams = metrics(server).get("teacher_malformed_requests_total{method=Stream}", 0)
    for _ in range(5):  # refused at once, before any message is read (so none is written here:
      call = channel.stream_stream(STREAM)(timeout=30)  # a write racing the refusal fails client-side)
      assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
      sent["no token"] += 1
    # Nothing above was parsed: the malformed-request count of Stream did not move.
    assert metrics(server).get("teacher_malformed_requests_total{method=Stream}", 0) == malformed_streams
    # One message over the receive limit: gRPC refuses it before parsing.
    info = await client.info()
    with pytest.raises(grpc.aio.AioRpcError) as e:
      await raw_forward(b"\x00" * (info.limits.max_request_bytes + 1), metadata=AUTH, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Still healthy, still correct, memory bounded.
    for i in range(4):
      same(await client.stub.Forward(valid[i], metadata=client.metadata, timeout=60), i)
    rss_after = rss_bytes(server.proc.pid)
  assert sum(sent.values()) >= 1000, sent
  assert serving(server.address)
  server.check_alive()
  assert rss_after - rss_before < 100 << 20, (rss_before, rss_after)
  logs = server.logs()
  assert "Traceback" not in logs
  assert 1 <= logs.count("malformed request") <= 10  # rate-limited: one line per 10 s


# ---- a second language ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node():
  """`node`, with tests/node's pinned packages installed (`npm ci`, from package-lock.json)."""
  node, npm = shutil.which("node"), shutil.which("npm")
  if not node or not npm:
    pytest.skip("node and npm are not installed: the Node.js client test needs them (e.g. apt-get install nodejs npm)")
  lock = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
  stamp = NODE_DIR / "node_modules" / ".installed-lock"
  if not stamp.is_file() or stamp.read_text() != lock:
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NODE_DIR, check=True,
                   timeout=600)
    stamp.write_text(lock)
  return node


async def test_node_client_decodes_answers_from_the_protos_alone(server, node, tmp_path):
  tokens = np.random.default_rng(5).integers(0, VOCAB, (3, 12), dtype=np.int32)
  request = {"tokens": tokens.tolist(), "k": 5, "layers": [1], "request_id": str(2**64 - 1)}
  (tmp_path / "request.json").write_text(json.dumps(request))
  out = await asyncio.to_thread(subprocess.run, [node, str(NODE_DIR / "client.mjs"), server.address, TOKEN,
                                                 str(tmp_path / "request.json")],
                                capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-4000:]
  got = json.loads(out.stdout)
  assert got["health"] == "SERVING" and got["vocab_size"] == VOCAB and got["packed_id_bits"] == 9
  spec = OutputSpec(k=5, temperatures=(1.0, 2.0), value_dtype="bfloat16", pack_ids=True, layers=(1,),
                    states=("attn_out",), state_dtype="bfloat16")
  async with TeacherClient(server.address, token=TOKEN) as client:
    ref = await client.forward(tokens, spec, timeout=60)
    ref16 = await client.forward(tokens, dataclasses.replace(spec, value_dtype="float16"), timeout=60)
  fwd = got["forward"]
  assert fwd["request_id"] == str(2**64 - 1)  # uint64 kept exact
  assert fwd["shape"] == [3, 12, 5] and fwd["state_layers"] == [1]
  np.testing.assert_array_equal(np.array(fwd["ids"]).reshape(3, 12, 5), ref.topk_ids)
  np.testing.assert_array_equal(np.array(fwd["logits"], np.float32).reshape(3, 12, 5),
                                ref.topk_logits.astype(np.float32))
  np.testing.assert_array_equal(np.array(fwd["lse"], np.float32).reshape(3, 12, 2), ref.logsumexp)
  np.testing.assert_array_equal(np.array(fwd["states"]["attn_out"], np.float32).reshape(1, 3, 12, -1),
                                ref.layer_states["attn_out"].astype(np.float32))
  first, bad, f16 = got["streamed"]
  assert (first["request_id"], bad["request_id"], f16["request_id"]) == ("7", "8", "9")
  assert first["ids"] == fwd["ids"] and first["logits"] == fwd["logits"]
  assert bad["error"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and bad["error"]["field"] == "spec.k"
  assert f16["logits_dtype"] == "DTYPE_FLOAT16"
  np.testing.assert_array_equal(np.array(f16["logits"], np.float32).reshape(3, 12, 5),
                                ref16.topk_logits.astype(np.float32))
