"""Request validation without a server: default positions restart per segment (the servicer and batcher
against an in-process server are in tests/integration/test_server_fake.py)."""

import numpy as np

from teacher_server.validation import default_positions


def _positions_reference(seg):
  out = np.zeros_like(seg)
  for i in range(seg.shape[0]):
    for j in range(1, seg.shape[1]):
      out[i, j] = out[i, j - 1] + 1 if seg[i, j] == seg[i, j - 1] else 0
  return out


def test_default_positions_restart_per_segment():
  seg = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3], [0, 0, 1, 1, 1, 1, 1]], np.int32)
  np.testing.assert_array_equal(default_positions(seg), _positions_reference(seg))
