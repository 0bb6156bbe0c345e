"""Sampled targets through the wire and the JAX engine (through a server: tests/integration/test_sampled_server.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_core import checkpoints, sampling, wire
from distill_core.client import OutputSpec
from distill_core.config import build, resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.parts.samples import SampleBatch, SampleRequest
from distill_core.proto import teacher_pb2 as pb
from distill_core.sharding import MeshConfig
from distill_core.targets import compute_targets
from teacher_server.engine import JaxEngine
from teacher_server.engine_api import EngineBatch, Fetch


# compute_targets as one program per row's static settings: run eagerly, it compiles hundreds of small ones.
_reference = jax.jit(compute_targets, static_argnames=("k", "true_vocab_size", "num_samples", "sample_exclude"))


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
  batch = EngineBatch(tokens, seg, positions, np.ones((8, 2), np.float32), Fetch(k=6, samples=12), {"samples": draws})
  out = eng.forward(batch)
  assert out.sample_ids.shape == (8, 16, 16) and eng.compilations() == 2  # ladder entry >= 12 is 16
  logits = model(jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(seg)).logits
  for row in range(3):
    want = _reference(logits[row:row + 1], k=6, temperatures=(1.0,), true_vocab_size=350,
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
