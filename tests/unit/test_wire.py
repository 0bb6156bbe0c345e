"""Wire codec: tensor bytes, dtype table, bit packing, TeacherTargets round trips, codegen freshness."""

import math

import ml_dtypes
import numpy as np
import pytest

from distill_core import bitpack, wire
from distill_core.proto import codegen
from distill_core.proto import teacher_pb2 as pb
from distill_core.targets import TeacherTargets


def test_generated_code_is_fresh(tmp_path):
  written = codegen.generate(tmp_path)
  assert {p.name for p in written} == {"teacher_pb2.py", "teacher_pb2.pyi", "teacher_pb2_grpc.py"}
  for path in written:
    committed = codegen.PACKAGE_DIR / path.name
    assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make protos`"
  assert "from distill_core.proto import teacher_pb2" in (tmp_path / "teacher_pb2_grpc.py").read_text()


@pytest.mark.parametrize("value, dtype, raw", [
    (1, np.int32, b"\x01\x00\x00\x00"),
    (-2, np.int64, b"\xfe" + b"\xff" * 7),
    (1.0, np.float32, b"\x00\x00\x80\x3f"),
    (1.0, np.float16, b"\x00\x3c"),
    (1.0, ml_dtypes.bfloat16, b"\x80\x3f"),
    (-2.0, ml_dtypes.bfloat16, b"\x00\xc0"),
    (7, np.uint8, b"\x07"),
])
def test_encode_is_little_endian(value, dtype, raw):
  msg = wire.encode_tensor(np.array([value], dtype))
  assert msg.data == raw
  assert list(msg.shape) == [1]
  assert wire.dtype_name(msg.dtype) == np.dtype(dtype).name


def test_big_endian_input_is_converted():
  arr = np.array([1, 258], dtype=">i4")
  assert wire.encode_tensor(arr).data == b"\x01\x00\x00\x00\x02\x01\x00\x00"


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32, np.float16, ml_dtypes.bfloat16, np.uint8])
@pytest.mark.parametrize("shape", [(3, 5), (2, 0, 4), (1, 2, 3, 4)])
def test_round_trip(dtype, shape):
  rng = np.random.default_rng(0)
  arr = (rng.standard_normal(shape) * 50).astype(dtype)
  out = wire.decode_tensor(wire.encode_tensor(arr), "x")
  assert out.dtype == np.dtype(dtype) and out.shape == shape
  np.testing.assert_array_equal(out.astype(np.float64), arr.astype(np.float64))


def test_decode_is_a_read_only_view():
  msg = wire.encode_tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
  out = wire.decode_tensor(msg, "x")
  assert not out.flags.writeable
  assert isinstance(out.base, (bytes, memoryview)) or isinstance(out.base.base, (bytes, memoryview))


@pytest.mark.parametrize("mutate, field, fragment", [
    (lambda m: setattr(m, "data", m.data[:-1]), "tokens", "23 bytes do not match shape [2, 3]"),
    (lambda m: m.shape.append(2), "tokens", "expected 2 dimensions"),
    (lambda m: setattr(m, "dtype", pb.DTYPE_FLOAT32), "tokens", "dtype DTYPE_FLOAT32 not allowed"),
    (lambda m: setattr(m, "dtype", 99), "tokens", "not allowed"),
    (lambda m: m.shape.__setitem__(0, -2), "tokens", "negative dimension"),
    (lambda m: m.shape.__setitem__(0, 10**6), "tokens", "exceed the limit of 1000"),
])
def test_decode_errors_name_the_field(mutate, field, fragment):
  msg = wire.encode_tensor(np.zeros((2, 3), np.int32))
  mutate(msg)
  with pytest.raises(wire.WireError) as e:
    wire.decode_tensor(msg, field, dtypes=(pb.DTYPE_INT32,), ndim=2, max_elements=1000)
  assert e.value.field.startswith(field)
  assert fragment in str(e.value)


def _pack_reference(values, bits):
  """Bit packing with a plain loop: bit j of value i goes to stream bit i * bits + j, LSB first."""
  out = bytearray(math.ceil(len(values) * bits / 8))
  for i, v in enumerate(values):
    for j in range(bits):
      if (int(v) >> j) & 1:
        pos = i * bits + j
        out[pos // 8] |= 1 << (pos % 8)
  return bytes(out)


@pytest.mark.parametrize("bits, n", [(17, 1), (17, 8), (17, 37), (1, 9), (8, 5), (31, 3)])
def test_pack_matches_reference_and_round_trips(bits, n):
  rng = np.random.default_rng(bits * 100 + n)
  values = rng.integers(0, 2**bits, size=n, dtype=np.int64)
  packed = wire.pack_uints(values, bits)
  assert packed == _pack_reference(values, bits)
  np.testing.assert_array_equal(wire.unpack_uints(packed, bits, n), values)


def test_packed_tensor_is_17_bits_per_id():
  ids = np.random.default_rng(0).integers(0, 131072, size=(4, 16, 64), dtype=np.int32)
  bits = wire.bits_for(131072)
  assert bits == 17 and wire.bits_for(131073) == 18 and wire.bits_for(2) == 1
  msg = wire.encode_tensor(ids, packed_bits=bits)
  assert len(msg.data) == ids.size * 17 // 8
  out = wire.decode_tensor(msg, "topk_ids", dtypes=(pb.DTYPE_INT32,), ndim=3)
  assert out.dtype == np.int32
  np.testing.assert_array_equal(out, ids)


def test_packing_rejects_bad_input():
  with pytest.raises(ValueError, match="does not fit in 4 bits"):
    wire.pack_uints(np.array([16]), 4)
  with pytest.raises(ValueError, match="non-negative"):
    wire.encode_tensor(np.array([-1], np.int32), packed_bits=8)
  msg = wire.encode_tensor(np.arange(10, dtype=np.int32), packed_bits=5)
  msg.data = msg.data[:-1]
  with pytest.raises(wire.WireError, match="expected 7 for 10 values of 5 bits"):
    wire.decode_tensor(msg, "topk_ids")


def _targets(rng, b=2, t=3, k=4, dtype=np.float16, states=True):
  layer_states = {}
  if states:
    layer_states = {"attn_out": rng.standard_normal((2, b, t, 5)).astype(ml_dtypes.bfloat16),
                    "attn_in": rng.standard_normal((2, b, t, 5)).astype(np.float32)}
  return TeacherTargets(
      topk_ids=rng.integers(0, 1000, (b, t, k)).astype(np.int32),
      topk_logits=-np.abs(rng.standard_normal((b, t, k))).astype(dtype),
      logsumexp=rng.standard_normal((b, t, 2)).astype(np.float32), temperatures=(1.0, 2.5),
      layer_states=layer_states, state_layers=(3, 1) if states else ())


@pytest.mark.parametrize("packed_bits", [0, 10])
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_targets_round_trip(packed_bits, dtype):
  rng = np.random.default_rng(1)
  t = _targets(rng, dtype=dtype)
  resp = wire.targets_to_response(42, t, packed_id_bits=packed_bits)
  assert resp.request_id == 42 and resp.topk_ids.packed_bits == packed_bits
  back = wire.response_to_targets(pb.ForwardResponse.FromString(resp.SerializeToString()))
  for name in ("topk_ids", "topk_logits", "logsumexp"):
    assert getattr(back, name).dtype == getattr(t, name).dtype
    np.testing.assert_array_equal(getattr(back, name), getattr(t, name))
  np.testing.assert_array_equal(back.temperatures, np.array([1.0, 2.5], np.float32))
  assert back.state_layers == (3, 1)
  for name, value in t.layer_states.items():
    assert back.layer_states[name].dtype == value.dtype
    np.testing.assert_array_equal(back.layer_states[name], value)
  back.validate(hidden_size=5)


def test_response_shape_mismatches_are_reported():
  rng = np.random.default_rng(2)
  resp = wire.targets_to_response(1, _targets(rng, states=False))
  resp.logsumexp.CopyFrom(wire.encode_tensor(np.zeros((2, 3, 3), np.float32)))
  with pytest.raises(wire.WireError, match="logsumexp"):
    wire.response_to_targets(resp)
  resp = wire.targets_to_response(1, _targets(rng))
  resp.state_layers.append(7)
  with pytest.raises(wire.WireError, match=r"layer_states\[attn_"):
    wire.response_to_targets(resp)


def test_request_builder_and_spec():
  spec = wire.OutputSpec(k=5, temperatures=(1.0, 2.0), value_dtype="bfloat16", layers=(0,),
                         states=("attn_in",), state_dtype="float32", pack_ids=True)
  req = wire.make_request(9, np.array([[1, 2]]), spec, segment_ids=np.array([[1, 1]]))
  assert req.request_id == 9 and not req.HasField("positions")
  assert req.spec.value_dtype == pb.DTYPE_BFLOAT16 and req.spec.state_dtype == pb.DTYPE_FLOAT32
  assert list(req.spec.layers) == [0] and list(req.spec.states) == ["attn_in"] and req.spec.pack_ids
  np.testing.assert_array_equal(wire.decode_tensor(req.tokens, "tokens"), [[1, 2]])
  assert wire.decode_tensor(req.segment_ids, "segment_ids").dtype == np.int32
  with pytest.raises(ValueError, match="unsupported dtype"):
    wire.dtype_enum("complex64")


@pytest.mark.parametrize("bits", [1, 5, 17, 31])
def test_packing_across_chunk_boundaries_matches_a_bit_loop(monkeypatch, bits):
  monkeypatch.setattr(bitpack, "_PACK_CHUNK", 16)  # many chunks on a small input
  rng = np.random.default_rng(bits)
  for n in (0, 1, 15, 16, 17, 50):
    values = rng.integers(0, (1 << bits) - 1, n, endpoint=True).astype(np.int32)
    packed = wire.pack_uints(values, bits)
    ref = np.zeros(-(-n * bits // 8), np.uint8)
    for i, x in enumerate(values.tolist()):
      for j in range(bits):
        if (x >> j) & 1:
          ref[(i * bits + j) // 8] |= 1 << ((i * bits + j) % 8)
    assert packed == ref.tobytes()
    np.testing.assert_array_equal(wire.unpack_uints(packed, bits, n), values)
