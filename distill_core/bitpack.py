"""Bit-packed integers and the codec error, below both codecs that use them (``wire``, ``sorted_delta``).

``wire`` re-exports every name here (``wire.pack_uints``, ``wire.WireError``...),
so callers keep one import.
"""

from __future__ import annotations

import math

import numpy as np


class WireError(ValueError):
  """A message does not match its declared dtype/shape/size; ``field`` names the culprit."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
    self.detail = message


def bits_for(num_values: int) -> int:
  """Bits needed to store integers in ``[0, num_values)`` (at least 1)."""
  return max(1, (int(num_values) - 1).bit_length())


# Ids are packed in chunks of this many values (a multiple of 8, so every chunk starts on a
# byte boundary): the bit-level temporaries (32 bytes per id) then stay about 16 MiB.
_PACK_CHUNK = 1 << 19


def pack_uints(values: np.ndarray, bits: int) -> bytes:
  """Packs non-negative integers < 2**bits into ``bits`` bits each, LSB first."""
  if not 1 <= bits <= 32:
    raise ValueError(f"packed bits must be in [1, 32], got {bits}")
  flat = np.ascontiguousarray(values, dtype="<u4").reshape(-1)
  if flat.size and int(flat.max()) >> bits:
    raise ValueError(f"value {int(flat.max())} does not fit in {bits} bits")
  out = bytearray()
  for start in range(0, flat.size, _PACK_CHUNK):
    chunk = flat[start:start + _PACK_CHUNK]
    as_bits = np.unpackbits(chunk.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")  # (n, 32)
    out += np.packbits(as_bits[:, :bits].reshape(-1), bitorder="little").tobytes()
  return bytes(out)


def unpack_uints(data: bytes, bits: int, count: int, field: str = "data") -> np.ndarray:
  """Inverse of :func:`pack_uints`: ``count`` integers as ``int32``."""
  if not 1 <= bits <= 31:
    raise WireError(field, f"packed_bits must be in [1, 31], got {bits}")
  want = math.ceil(count * bits / 8)
  if len(data) != want:
    raise WireError(field, f"{len(data)} bytes, expected {want} for {count} values of {bits} bits")
  # Each value's bits start at bit i*bits: gather the (at most 5) bytes that hold them into one uint64,
  # shift and mask. Chunked so the temporaries stay about 16 MiB.
  raw = np.frombuffer(bytes(data) + b"\0" * 8, np.uint8)
  span = (bits + 7 + 7) // 8  # bytes a value can touch, whatever its bit offset
  out = np.empty(count, "<i4")
  mask = np.uint64((1 << bits) - 1)
  for start in range(0, count, _PACK_CHUNK):
    bitpos = np.arange(start, min(start + _PACK_CHUNK, count), dtype=np.int64) * bits
    first = bitpos >> 3
    word = np.zeros(first.shape, np.uint64)
    for i in range(span):
      word |= raw[first + i].astype(np.uint64) << np.uint64(8 * i)
    out[start:start + len(first)] = ((word >> (bitpos & 7).astype(np.uint64)) & mask).astype("<i4")
  return out
