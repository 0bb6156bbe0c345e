"""Lossless compact coding of sorted, non-positive float rows (the shifted top-k values).

Every row of the top-k values is sorted descending and <= 0 (the row max is
exactly 0). Dropping the sign bit, the integers of those bit patterns (f16,
bf16 or f32) are non-decreasing along the row, and consecutive differences are
small. This module stores them as *patched frame-of-reference* codes:

    m[r, j] = bits(v[r, j]) & ~sign          (non-decreasing along j)
    d[r, 0] = m[r, 0];  d[r, j] = m[r, j] - m[r, j-1]

Each row r gets its own width w_r in [1, B-1] (B = 16 or 32 bits per value),
chosen to minimise k * w_r + 16 * (escapes): a difference >= 2**w_r - 1 is
written as the escape code 2**w_r - 1 and its value goes to a separate raw
list. Byte layout of ``Tensor.data`` for R rows of k values:

    offset            size                          what
    0                 R                             w_r, one uint8 per row
    R                 sum_w ceil(n_w * k * w / 8)   codes: for w = 1 .. B-1, the n_w rows of width w
                                                    (in row order), packed LSB first (wire.pack_uints)
    ...               (B / 8) * escapes             escaped differences, little-endian uint{B}, in the
                                                    order their codes appear above

Decoding restores the bit patterns exactly (sign = 1 wherever m != 0). A row
that is not sorted, has a positive value or a negative zero cannot be coded;
:func:`applicable` says so and the caller stores the tensor raw instead.
"""

from __future__ import annotations

import math

import numpy as np

from distill_core.bitpack import WireError, pack_uints, unpack_uints

_UINTS = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


def _layout(dtype: np.dtype) -> tuple[np.dtype, int]:
  dtype = np.dtype(dtype)
  if dtype.kind != "f" and dtype.name != "bfloat16" or dtype.itemsize not in _UINTS:
    raise ValueError(f"sorted-delta coding needs a 16- or 32-bit float dtype, got {dtype.name}")
  return _UINTS[dtype.itemsize], 8 * dtype.itemsize


def _magnitudes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
  """(bit patterns, sign-free magnitudes as uint32) of `values` viewed as rows of its last axis."""
  uint, bits = _layout(values.dtype)
  patterns = np.ascontiguousarray(values).view(uint).reshape(-1, values.shape[-1] if values.ndim else 1)
  mags = (patterns & np.array((1 << (bits - 1)) - 1, uint)).astype(np.uint32)
  return patterns, mags, bits


def applicable(values: np.ndarray) -> bool:
  """True when every row is sorted descending with values <= 0 and no negative zero."""
  values = np.asarray(values)
  if values.ndim == 0 or values.size == 0:
    return False
  try:
    patterns, mags, bits = _magnitudes(values)
  except ValueError:
    return False
  signs = (patterns >> (bits - 1)).astype(bool)
  return bool(np.array_equal(signs, mags != 0) and np.all(np.diff(mags.astype(np.int64), axis=-1) >= 0))


def _widths(deltas: np.ndarray, bits: int) -> np.ndarray:
  """The cheapest width per row (ties: the narrowest)."""
  k = deltas.shape[1]
  costs = np.empty((deltas.shape[0], bits - 1), np.int64)
  for w in range(1, bits):
    escapes = np.count_nonzero(deltas >= (1 << w) - 1, axis=1)
    costs[:, w - 1] = k * w + escapes * bits
  return (np.argmin(costs, axis=1) + 1).astype(np.uint8)


def encode(values: np.ndarray) -> bytes:
  """The layout above for `values` (check :func:`applicable` first)."""
  values = np.asarray(values)
  uint, bits = _layout(values.dtype)
  _, mags, _ = _magnitudes(values)
  deltas = np.diff(mags, axis=1, prepend=np.zeros((mags.shape[0], 1), np.uint32))
  widths = _widths(deltas, bits)
  parts = [widths.tobytes()]
  escaped = []
  for w in np.unique(widths):
    codes = deltas[widths == w]
    escape = (1 << int(w)) - 1
    over = codes >= escape
    escaped.append(codes[over])
    parts.append(pack_uints(np.where(over, escape, codes), int(w)))
  parts.append(np.concatenate(escaped).astype(uint).tobytes() if escaped else b"")
  return b"".join(parts)


def decode(data: bytes, dtype: np.dtype, shape: tuple[int, ...], field: str = "data") -> np.ndarray:
  """Inverse of :func:`encode`; raises ``WireError`` naming `field` on malformed bytes."""
  dtype = np.dtype(dtype)
  try:
    uint, bits = _layout(dtype)
  except ValueError as e:
    raise WireError(field, str(e)) from None
  if not shape:
    raise WireError(field, "sorted-delta coding needs at least one dimension")
  k = int(shape[-1])
  rows = math.prod(shape[:-1])
  if len(data) < rows:
    raise WireError(field, f"{len(data)} bytes cannot hold the widths of {rows} rows")
  raw = memoryview(data)
  widths = np.frombuffer(raw[:rows], np.uint8)
  if widths.size and (widths.min() < 1 or widths.max() >= bits):
    raise WireError(field, f"row widths must be in [1, {bits - 1}]")
  deltas = np.zeros((rows, k), np.uint32)
  offset = rows
  escapes = []
  for w in np.unique(widths):
    w = int(w)
    chosen = widths == w
    count = int(np.count_nonzero(chosen)) * k
    size = math.ceil(count * w / 8)
    if offset + size > len(data):
      raise WireError(field, f"truncated: the codes of width {w} need {size} bytes at offset {offset}")
    codes = unpack_uints(bytes(raw[offset:offset + size]), w, count, field).astype(np.uint32).reshape(-1, k)
    offset += size
    escapes.append((chosen, codes, codes == (1 << w) - 1))
  n_escaped = sum(int(np.count_nonzero(mask)) for _, _, mask in escapes)
  if len(data) - offset != n_escaped * uint.itemsize:
    raise WireError(field, f"{len(data) - offset} trailing bytes, expected {n_escaped * uint.itemsize} "
                           f"for {n_escaped} escaped differences")
  patches = np.frombuffer(raw[offset:], uint).astype(np.uint32)
  used = 0
  for chosen, codes, mask in escapes:
    n = int(np.count_nonzero(mask))
    codes[mask] = patches[used:used + n]
    used += n
    deltas[chosen] = codes
  mags = np.cumsum(deltas, axis=1, dtype=np.uint64)
  if mags.size and int(mags.max()) >= 1 << (bits - 1):
    raise WireError(field, "differences overflow the value's bit width")
  patterns = mags.astype(uint) | ((mags != 0).astype(uint) << np.array(bits - 1, uint))
  return patterns.view(dtype).reshape(shape)

