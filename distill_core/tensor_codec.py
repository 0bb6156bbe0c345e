"""Tensor codec: numpy arrays <-> ``Tensor`` messages (the bytes every teacher-target part travels in).

Tensors travel as raw little-endian bytes plus a dtype and a shape. Decoding is
zero-copy over the message's bytes (``np.frombuffer``), so decoded arrays are
read-only views. Integer tensors may be bit-packed losslessly
(``Tensor.packed_bits``), and sorted top-k values may be delta-coded losslessly
(``Tensor.coding = TENSOR_CODING_SORTED_DELTA``, see ``sorted_delta.py``). Every
check names the field at fault (:class:`WireError`). ``distill_core.wire``
re-exports all of it.
"""

from __future__ import annotations

import math
from typing import Sequence

import ml_dtypes
import numpy as np

from distill_core import sorted_delta
from distill_core.bitpack import WireError, pack_uints, unpack_uints
from distill_core.proto import teacher_pb2 as pb

_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    pb.DTYPE_UINT8: np.dtype("u1"),
}
_NAMES = {
    "int32": pb.DTYPE_INT32, "int64": pb.DTYPE_INT64, "float32": pb.DTYPE_FLOAT32,
    "float16": pb.DTYPE_FLOAT16, "bfloat16": pb.DTYPE_BFLOAT16, "uint8": pb.DTYPE_UINT8,
    "f32": pb.DTYPE_FLOAT32, "f16": pb.DTYPE_FLOAT16, "bf16": pb.DTYPE_BFLOAT16,
}
VALUE_DTYPES = ("float16", "bfloat16", "float32")
STATE_DTYPES = ("bfloat16", "float32")


# Longest rendering of a client-supplied value in an error message (see :func:`echo`).
ECHO_CHARS = 80


def echo(value, limit: int = ECHO_CHARS) -> str:
  """A client-supplied value for an error message: its repr, cut to ``limit`` characters.

  Error texts travel in gRPC trailers (16 KiB in total): a 30,000-character state name or
  ``layers=[0] * 6000`` echoed whole would replace the error with a transport failure.
  Lists and tuples are shown as lists; a cut value says how long it was.
  """
  seq = isinstance(value, (list, tuple))
  text = repr(list(value)) if seq else repr(value)
  if len(text) <= limit:
    return text
  size = f"{len(value)} items" if seq else f"{len(value)} characters" if isinstance(value, (str, bytes)) else \
      f"{len(text)} characters"
  return f"{text[:limit]}... ({size})"


def dtype_enum(dtype: str | np.dtype | type) -> int:
  """``"float16"``/``"f16"``/``np.float16``/``ml_dtypes.bfloat16`` -> the ``DType`` enum value."""
  if isinstance(dtype, str) and dtype in _NAMES:
    return _NAMES[dtype]
  try:
    name = np.dtype(dtype).name
  except TypeError:
    name = None
  if name not in _NAMES:
    raise ValueError(f"unsupported dtype {dtype!r} (supported: {', '.join(sorted(_NAMES))})")
  return _NAMES[name]


def dtype_name(enum: int) -> str:
  """The numpy name of a ``DType`` enum value (``DTYPE_FLOAT16`` -> ``"float16"``)."""
  if enum not in _DTYPES:
    raise ValueError(f"unknown DType enum value {enum}")
  return _DTYPES[enum].name


def numpy_dtype(enum: int, field: str = "dtype") -> np.dtype:
  if enum not in _DTYPES:
    raise WireError(field, f"unsupported dtype {pb.DType.Name(enum) if enum in pb.DType.values() else enum}")
  return _DTYPES[enum]


def le_bytes(array: np.ndarray) -> bytes:
  """The array's elements as contiguous little-endian bytes, C order."""
  array = np.asarray(array)
  return np.ascontiguousarray(array, dtype=_DTYPES[dtype_enum(array.dtype)]).tobytes()


def encode_tensor(array: np.ndarray, *, packed_bits: int = 0, sorted_delta_coding: bool = False) -> pb.Tensor:
  """A numpy array as a ``Tensor`` (little-endian bytes; integers bit-packed if asked).

  ``sorted_delta_coding``: delta-code the rows of a float tensor whose rows are sorted
  descending and <= 0 (``sorted_delta.py``); any other tensor is stored raw.
  """
  array = np.asarray(array)
  enum = dtype_enum(array.dtype)
  msg = pb.Tensor(dtype=enum, shape=array.shape)
  if sorted_delta_coding and sorted_delta.applicable(array):
    msg.coding = pb.TENSOR_CODING_SORTED_DELTA
    msg.data = sorted_delta.encode(array)
  elif packed_bits:
    if array.dtype.kind not in "iu":
      raise ValueError(f"only integer tensors can be packed, got {array.dtype}")
    if array.size and int(array.min()) < 0:
      raise ValueError("packed tensors must be non-negative")
    msg.packed_bits = packed_bits
    msg.data = pack_uints(array, packed_bits)
  else:
    msg.data = le_bytes(array)
  return msg


def decode_tensor(msg: pb.Tensor, field: str, *, dtypes: Sequence[int] | None = None,
                  ndim: int | None = None, max_elements: int | None = None) -> np.ndarray:
  """A ``Tensor`` as a read-only numpy view of its bytes, after checking dtype, shape and size.

  Args:
    msg: the message.
    field: the request/response field name used in error messages.
    dtypes: allowed ``DType`` values (None = any supported).
    ndim: required rank (None = any).
    max_elements: refuse tensors with more elements (checked before touching the bytes).
  """
  if dtypes is not None and msg.dtype not in dtypes:
    allowed = ", ".join(dtype_name(d) for d in dtypes)
    got = pb.DType.Name(msg.dtype) if msg.dtype in pb.DType.values() else str(msg.dtype)
    raise WireError(field, f"dtype {got} not allowed (expected {allowed})")
  dtype = numpy_dtype(msg.dtype, f"{field}.dtype")
  shape = tuple(int(d) for d in msg.shape)
  if ndim is not None and len(shape) != ndim:
    raise WireError(field, f"expected {ndim} dimensions, got shape {echo(shape)}")
  if any(d < 0 for d in shape):
    raise WireError(field, f"negative dimension in shape {echo(shape)}")
  count = math.prod(shape)
  if max_elements is not None and count > max_elements:
    raise WireError(field, f"{count} elements exceed the limit of {max_elements}")
  if msg.coding == pb.TENSOR_CODING_SORTED_DELTA:
    if msg.packed_bits:
      raise WireError(f"{field}.packed_bits", "not allowed with sorted-delta coding")
    return sorted_delta.decode(msg.data, dtype, shape, field)
  if msg.coding != pb.TENSOR_CODING_RAW:
    raise WireError(f"{field}.coding", f"unknown tensor coding {msg.coding}")
  if msg.packed_bits:
    if dtype.kind not in "iu":
      raise WireError(f"{field}.packed_bits", f"only integer tensors can be packed, not {dtype.name}")
    return unpack_uints(msg.data, msg.packed_bits, count, field).astype(dtype, copy=False).reshape(shape)
  want = count * dtype.itemsize
  if len(msg.data) != want:
    raise WireError(field, f"{len(msg.data)} bytes do not match shape {echo(shape)} of "
                           f"{dtype.name} ({want} bytes)")
  return np.frombuffer(msg.data, dtype=dtype, count=count).reshape(shape)
