"""The scored part through a real in-process teacher server and a teacher-server process (the JAX engine on a tiny model): the logits at the
ids a request sends, checked against NumPy on the model's own logits, next to plain requests in the same batches
and without a recompilation; bad ids refused with INVALID_ARGUMENT naming the field; GetInfo's limit."""

import asyncio

import grpc
import jax.numpy as jnp
import numpy as np
import pytest
from integration.test_remote_source import TEACHER_SEED, server_overrides
from remote_utils import TeacherProcess, wait_serving
from server_utils import fake_config, free_port

from distill_core import checkpoints, wire
from distill_core.client import OutputSpec
from distill_core.config import build, resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.parts import scored
from distill_core.proto import teacher_pb2 as pb
from distill_core.proto import teacher_pb2_grpc
from teacher_server.engine import JaxEngine
from teacher_server.server import TeacherServer

VOCAB, MAX_IDS = 350, 4
INVALID = grpc.StatusCode.INVALID_ARGUMENT
FIELD = "part_inputs['scored.ids']"


@pytest.fixture(scope="module")
def model():
  return checkpoints.load_model(build(ModelConfig, {**resolve_preset("tiny"), "true_vocab_size": VOCAB}), seed=3)


def _engine(model, max_scored_ids: int) -> JaxEngine:
  return JaxEngine(model, buckets=[(8, 16), (8, 32)], max_k=8, max_temperatures=4, selectable_layers=[],
                   state_names=[], max_scored_ids=max_scored_ids)


def _server(model, max_scored_ids: int = MAX_IDS) -> TeacherServer:
  return TeacherServer(fake_config(f"limits.max_scored_ids={max_scored_ids}", "limits.selectable_layers=[]",
                                   "batcher.buckets=[[8,16],[8,32]]"),
                       _engine(model, max_scored_ids))


def _request(rid: int, tokens: np.ndarray, ids: np.ndarray | None = None, **part_inputs) -> pb.ForwardRequest:
  inputs = {**({} if ids is None else scored.request_inputs(ids)), **part_inputs}
  return wire.make_request(rid, tokens, OutputSpec(k=3, value_dtype="float32"), part_inputs=inputs)


def _expected(model, tokens: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """NumPy: the model's logits over the real vocabulary minus each position's max, at `ids`."""
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(positions), jnp.ones(tokens.shape, jnp.int32)).logits,
                      np.float64)[..., :model.cfg.real_vocab_size]
  z = logits - logits.max(-1, keepdims=True)
  return np.take_along_axis(z, ids.astype(np.int64), axis=-1)


async def test_scored_ids_are_answered_with_the_teacher_logits_next_to_plain_requests_without_recompiling(model):
  rng = np.random.default_rng(0)
  server = _server(model)
  port = await server.start()
  try:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
      stub = teacher_pb2_grpc.TeacherStub(channel)
      info = await stub.GetInfo(pb.GetInfoRequest())
      assert info.limits.part_limits[scored.LIMIT] == MAX_IDS
      compiled = server.engine.compilations()
      # Three requests at once (rows of one bucket): 4 ids and 2 ids per position, and one without ids.
      tokens = [rng.integers(0, VOCAB, (2, 20), dtype=np.int32) for _ in range(3)]
      ids = [rng.integers(0, VOCAB, (2, 20, n), dtype=np.int32) for n in (4, 2)]
      ids[0][0, 0] = (0, VOCAB - 1, 7, 7)  # both ends of the vocabulary, and an id asked twice
      answers = await asyncio.gather(stub.Forward(_request(1, tokens[0], ids[0])),
                                     stub.Forward(_request(2, tokens[1], ids[1])),
                                     stub.Forward(_request(3, tokens[2])))
      for resp in answers:
        assert not resp.HasField("error"), resp.error
      got = [wire.response_to_targets(resp) for resp in answers]
      for i in range(2):
        assert got[i].scored_ids is None and got[i].scored_logits.shape == ids[i].shape  # the asker keeps the ids
        np.testing.assert_allclose(got[i].scored_logits, _expected(model, tokens[i], ids[i]), rtol=1e-4, atol=1e-4)
        attached = scored.attach(dict(scored_logits=got[i].scored_logits), ids[i])
        np.testing.assert_array_equal(attached["scored_ids"], ids[i])
      assert got[2].scored_logits is None and "scored.logits" not in answers[2].part_outputs
      # The top-k beside the scored ids is the top-k of a plain request for the same tokens.
      plain = wire.response_to_targets(await stub.Forward(_request(4, tokens[0])))
      np.testing.assert_array_equal(got[0].topk_ids, plain.topk_ids)
      np.testing.assert_array_equal(got[0].topk_logits, plain.topk_logits)
      # A short request in the short bucket with 1 id: no new program.
      short, one = tokens[0][:1, :9], ids[0][:1, :9, :1]
      resp = await stub.Forward(_request(5, short, one))
      np.testing.assert_allclose(wire.response_to_targets(resp).scored_logits, _expected(model, short, one),
                                 rtol=1e-4, atol=1e-4)
      assert server.engine.compilations() == compiled
  finally:
    await server.drain()


def _bad_requests():
  tokens = np.zeros((2, 8), np.int32)
  ids = np.zeros((2, 8, 2), np.int32)
  outside = ids.copy()
  outside[1, 3, 1] = VOCAB
  negative = ids.copy()
  negative[0, 0, 0] = -1
  return {
      "id = vocab": (_request(1, tokens, outside), f"{FIELD}: "),
      "negative id": (_request(1, tokens, negative), f"{FIELD}: "),
      "over the limit": (_request(1, tokens, np.zeros((2, 8, MAX_IDS + 1), np.int32)), f"{FIELD}: "),
      "other rows": (_request(1, tokens, np.zeros((3, 8, 2), np.int32)), f"{FIELD}: "),
      "other length": (_request(1, tokens, np.zeros((2, 7, 2), np.int32)), f"{FIELD}: "),
      "rank 2": (_request(1, tokens, np.zeros((2, 8), np.int32)), f"{FIELD}: "),
      "int64": (_request(1, tokens, **{scored.INPUT: np.zeros((2, 8, 2), np.int64)}), f"{FIELD}: "),
      "unknown input": (_request(1, tokens, ids, **{"scored.other": np.zeros(2, np.int32)}),
                        "part_inputs['scored.other']: no target part this server runs takes it"),
  }


async def test_bad_scored_ids_get_invalid_argument_naming_the_field(model):
  server = _server(model)
  port = await server.start()
  try:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
      stub = teacher_pb2_grpc.TeacherStub(channel)
      for what, (req, message) in _bad_requests().items():
        with pytest.raises(grpc.aio.AioRpcError) as e:
          await stub.Forward(req)
        assert e.value.code() == INVALID, what
        assert e.value.details().startswith(message), (what, e.value.details())
  finally:
    await server.drain()


async def test_a_server_that_scores_no_ids_refuses_them_by_name(model):
  server = _server(model, max_scored_ids=0)
  port = await server.start()
  try:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
      stub = teacher_pb2_grpc.TeacherStub(channel)
      info = await stub.GetInfo(pb.GetInfoRequest())
      assert scored.LIMIT not in info.limits.part_limits
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Forward(_request(1, np.zeros((2, 8), np.int32), np.zeros((2, 8, 1), np.int32)))
      assert e.value.code() == INVALID and e.value.details().startswith(f"{FIELD}: "), e.value.details()
      assert server.engine.compilations() == 2  # one program per bucket: no scoring program was compiled
  finally:
    await server.drain()


async def test_a_teacher_server_process_scores_the_ids_it_is_sent(tiny_dataset, tmp_path):
  """`python -m teacher_server` with limits.max_scored_ids: GetInfo offers it, and the logits at the ids sent are
  the teacher's own (the process's preset model, rebuilt here)."""
  server = TeacherProcess(free_port(), server_overrides(tiny_dataset) + ["limits.max_scored_ids=3",
                                                                          "limits.selectable_layers=[]"],
                          tmp_path / "log")
  try:
    wait_serving(server)
    teacher = checkpoints.load_model(build(ModelConfig, resolve_preset("tiny")), seed=TEACHER_SEED)
    rng = np.random.default_rng(1)
    vocab = teacher.cfg.real_vocab_size
    tokens = rng.integers(0, vocab, (3, 32), dtype=np.int32)
    ids = rng.integers(0, vocab, (3, 32, 3), dtype=np.int32)
    async with grpc.aio.insecure_channel(server.address) as channel:
      stub = teacher_pb2_grpc.TeacherStub(channel)
      info = await stub.GetInfo(pb.GetInfoRequest())
      assert info.limits.part_limits[scored.LIMIT] == 3
      got = wire.response_to_targets(await stub.Forward(_request(1, tokens, ids)))
      np.testing.assert_allclose(got.scored_logits, _expected(teacher, tokens, ids), rtol=1e-4, atol=1e-4)
      with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Forward(_request(2, tokens, np.zeros((3, 32, 4), np.int32)))
      assert e.value.code() == INVALID and e.value.details().startswith(f"{FIELD}: "), e.value.details()
  finally:
    server.stop()
