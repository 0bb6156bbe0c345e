"""Loopback helpers shared by the demo, the benchmarks and the tests: a free port, waiting for health."""

from __future__ import annotations

import socket
import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that is free on `host` right now (the OS picks it)."""
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def serving(address: str, timeout: float = 1.0) -> bool:
  """Whether the gRPC health service at `address` answers SERVING (plaintext channels)."""
  with grpc.insecure_channel(address) as channel:
    try:
      reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError:
      return False
  return reply.status == health_pb2.HealthCheckResponse.SERVING


def wait_serving(proc: subprocess.Popen | None, address: str, timeout: float = 300.0, what: str = "") -> None:
  """Blocks until `address` is SERVING; raises if `proc` exits first or `timeout` passes."""
  deadline = time.monotonic() + timeout
  name = what or f"the teacher server at {address}"
  while time.monotonic() < deadline:
    if proc is not None and proc.poll() is not None:
      raise RuntimeError(f"{name} exited with code {proc.returncode} before serving")
    if serving(address):
      return
    time.sleep(0.2)
  raise TimeoutError(f"{name} was not serving after {timeout:.0f} s")
