"""Malformed input without a server: the request id read from the front of unparseable bytes (the limits
against an in-process server are in tests/integration/test_server_limits.py).
"""

from distill_core.proto import teacher_pb2 as pb
from teacher_server.handlers import leading_request_id


def test_leading_request_id():
  for rid in (0, 1, 150, 2**63, 2**64 - 1):
    data = pb.ForwardRequest(request_id=rid).SerializeToString() + b"\xff"
    assert leading_request_id(data) == rid
  assert leading_request_id(b"") == leading_request_id(b"\x12\x00") == leading_request_id(b"\x08" + b"\xff" * 12) == 0
