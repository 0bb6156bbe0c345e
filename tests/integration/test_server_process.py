"""The real server (`python -m teacher_server`, tiny random model) in a child process.

One process serves the whole module; the last test SIGTERMs it and checks the
drain. Answers are compared with an in-process forward of the same preset and
seed, post-processed with NumPy (masking, sorting, logsumexp in float64).
"""

import asyncio
import re
import urllib.request

import grpc
import numpy as np
import pytest
from server_utils import ServerProcess

from distill_core.client import OutputSpec, TeacherClient, TeacherError
from distill_core.config import build, resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.model.transformer import create_model
from flax import nnx

TOKEN = "process-test-token"
TRUE_VOCAB = 300  # tiny has 384 embedding rows: ids 300..383 are padding and must never be returned
OVERRIDES = ["model.source=preset", "model.preset=tiny", "model.seed=3",
             f"model.overrides={{true_vocab_size: {TRUE_VOCAB}}}", "batcher.buckets=[[4,32]]",
             "limits.max_k=16", "limits.max_temperatures=3", "batcher.max_wait_ms=5",
             f"security.auth_token={TOKEN}", "serve_parameters=true"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  server = ServerProcess(OVERRIDES, tmp_path_factory.mktemp("server") / "server.log")
  cfg = build(ModelConfig, {**resolve_preset("tiny"), "true_vocab_size": TRUE_VOCAB})
  model = create_model(cfg, seed=3)  # built while the server boots

  try:
    server.wait_serving(180)
    yield server, model
  finally:
    server.stop()


@nnx.jit
def _forward(model, tokens, seg, pos):
  return model(tokens, pos, seg, state_layers=(1, 0))


def reference(model, tokens, seg=None, pos=None, *, k, temps):
  """Top-k ids, shifted values, logsumexp (float64) and states of layers (1, 0)."""
  seg = np.ones_like(tokens) if seg is None else seg
  pos = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape) if pos is None else pos
  out = _forward(model, tokens, seg, pos)
  z = np.asarray(out.logits, np.float64)[..., :TRUE_VOCAB]
  z = z - z.max(-1, keepdims=True)
  order = np.argsort(-z, axis=-1, kind="stable")[..., :k]
  values = np.take_along_axis(z, order, -1)
  lse = np.stack([np.log(np.exp(z / t).sum(-1)) for t in temps], -1)
  return order, values, lse, {n: np.asarray(v) for n, v in out.states.items()}


def client_for(server, **kw):
  return TeacherClient(server.address, token=TOKEN, **kw)


async def test_health_info_and_auth(env):
  server, model = env
  async with client_for(server) as client:
    assert await client.health() == "SERVING"
    info = await client.info()
  assert (info.vocab_size, info.padded_vocab_size, info.num_layers, info.hidden_size) == (TRUE_VOCAB, 384, 2, 32)
  assert (info.num_attention_heads, info.num_key_value_heads, info.head_dim) == (4, 2, 8)
  assert [(b.batch, b.length) for b in info.buckets] == [(4, 32)] and info.limits.max_k == 16
  assert len(info.weights_fingerprint) == 64
  async with TeacherClient(server.address) as anonymous:
    assert await anonymous.health() == "SERVING"
    with pytest.raises(TeacherError) as e:
      await anonymous.info()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_forward_matches_reference(env):
  server, model = env
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TRUE_VOCAB, (2, 24), dtype=np.int32)
  seg = np.ones_like(tokens)
  seg[0, 9:] = 2  # two packed sequences
  seg[1, 15:] = 0  # trailing padding
  pos = np.concatenate([np.arange(9), np.arange(15)])[None].repeat(2, 0).astype(np.int32)
  temps = (1.0, 2.0, 0.5)
  async with client_for(server) as client:
    got = await client.forward(tokens, OutputSpec(k=16, temperatures=temps, value_dtype="float32"), seg, pos)
    f16 = await client.forward(tokens, OutputSpec(k=5, pack_ids=True), seg, pos)
  ids, values, lse, _ = reference(model, tokens, seg, pos, k=16, temps=temps)
  real = seg != 0
  np.testing.assert_array_equal(got.topk_ids[real], ids[real])
  np.testing.assert_allclose(got.topk_logits[real], values[real], atol=1e-5)
  np.testing.assert_allclose(got.logsumexp[real], lse[real], atol=1e-5)
  assert (got.topk_logits[..., 0] == 0).all() and got.topk_ids.max() < TRUE_VOCAB
  np.testing.assert_array_equal(f16.topk_ids[real], ids[real][:, :5])
  assert f16.topk_logits.dtype == np.float16
  np.testing.assert_allclose(f16.topk_logits[real].astype(np.float64), values[real][:, :5], atol=2e-3)


async def test_layer_states_match_reference(env):
  server, model = env
  tokens = np.random.default_rng(1).integers(0, TRUE_VOCAB, (2, 24), dtype=np.int32)
  spec = OutputSpec(k=4, layers=(1, 0), states=("attn_in", "attn_out"), state_dtype="float32")
  async with client_for(server) as client:
    got = await client.forward(tokens, spec)
  ids, _, _, states = reference(model, tokens, k=4, temps=(1.0,))
  np.testing.assert_array_equal(got.topk_ids, ids)
  assert got.state_layers == (1, 0)
  for name in ("attn_in", "attn_out"):
    assert got.layer_states[name].shape == (2, 2, 24, 32)
    np.testing.assert_allclose(got.layer_states[name], states[name], atol=1e-5)


async def test_concurrent_streams_of_several_clients(env):
  server, model = env
  rng = np.random.default_rng(2)
  inputs = [rng.integers(0, TRUE_VOCAB, (2, 24), dtype=np.int32) for _ in range(4)]
  expected = [reference(model, x, k=8, temps=(1.0,))[0] for x in inputs]

  async def stream(client, shift):
    order = [(shift + i) % len(inputs) for i in range(6)]
    async with client.stream() as s:
      futures = [await s.submit(inputs[j], OutputSpec(k=8)) for j in order]
      results = [await f for f in futures]
    for j, r in zip(order, results):
      np.testing.assert_array_equal(r.topk_ids, expected[j])
    return len(results)

  clients = [client_for(server), client_for(server)]
  done = await asyncio.gather(*(stream(c, i) for i, c in enumerate(clients + clients)))
  for c in clients:
    await c.close()
  assert done == [6, 6, 6, 6]


async def test_bad_requests_then_good(env):
  server, model = env
  good = np.arange(48, dtype=np.int32).reshape(2, 24)
  async with client_for(server) as client, client.stream() as s:
    bad = [await s.submit(np.full((1, 4), TRUE_VOCAB, np.int32), OutputSpec(k=1)),
           await s.submit(good, OutputSpec(k=17)),
           await s.submit(good, OutputSpec(k=1, layers=(2,))),
           await s.submit(np.zeros((1, 33), np.int32), OutputSpec(k=1))]
    ok = await s.submit(good, OutputSpec(k=3))
    for future, (code, field) in zip(bad, [("INVALID_ARGUMENT", "tokens"), ("INVALID_ARGUMENT", "spec.k"),
                                           ("INVALID_ARGUMENT", "spec.layers"), ("RESOURCE_EXHAUSTED", "tokens")]):
      with pytest.raises(TeacherError) as e:
        await future
      assert (e.value.code.name, e.value.field) == (code, field) and e.value.message.startswith(field)
    np.testing.assert_array_equal((await ok).topk_ids, reference(model, good, k=3, temps=(1.0,))[0])


async def test_get_parameters_match_model(env):
  server, model = env
  async with client_for(server) as client:
    params = await client.get_parameters(r"layers\.0\.self_attn\.(q|k)_proj\.kernel", chunk_bytes=65536)
  assert sorted(params) == ["layers.0.self_attn.k_proj.kernel", "layers.0.self_attn.q_proj.kernel"]
  np.testing.assert_array_equal(params["layers.0.self_attn.q_proj.kernel"],
                                np.asarray(model.layers[0].self_attn.q_proj.kernel[...]))
  assert params["layers.0.self_attn.k_proj.kernel"].shape == (32, 2, 8)


def test_metrics_and_no_recompilation(env):
  server, _ = env
  text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()

  def value(name):
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE).group(1))

  # one bucket: without states, with bfloat16 and with float32 states; all at warm-up
  assert value("teacher_engine_compilations") == 3
  assert value("teacher_engine_host_bytes_count") == value('teacher_batches_total{bucket="4x32"}')  # every batch
  assert value('teacher_requests_total{code="OK",method="Stream"}') >= 24
  assert value('teacher_errors_total{code="INVALID_ARGUMENT"}') >= 3
  assert value("teacher_tokens_total") > 0
  assert "warm-up done" in server.logs()


async def test_sigterm_drains_in_flight_requests(env):
  server, model = env
  tokens = np.random.default_rng(4).integers(0, TRUE_VOCAB, (2, 24), dtype=np.int32)
  expected = reference(model, tokens, k=2, temps=(1.0,))[0]
  async with client_for(server) as client:
    async with client.stream() as s:
      first = await (await s.submit(tokens, OutputSpec(k=2)))  # the stream is established
      futures = [await s.submit(tokens, OutputSpec(k=2)) for _ in range(24)]
      server.terminate()  # SIGTERM while those are queued or running
    results = [first] + list(await asyncio.gather(*futures))
  for r in results:
    np.testing.assert_array_equal(r.topk_ids, expected)
  assert server.proc.wait(30) == 0
  assert '"msg": "stopped"' in server.logs()
