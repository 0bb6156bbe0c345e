"""The teacher server's defaults run: `python -m teacher_server` with no arguments serves (the example
commands and the health proto are checked in tests/unit/test_server_defaults.py)."""

import shutil
import socket
import subprocess
import sys

import pytest

from teacher_server.config import ServerConfig, split_address
from server_utils import one_device_env

DEFAULT_ADDRESS = ServerConfig().address

# Runs inside its own network namespace: start the server with no arguments at all, wait for
# SERVING on the default address, check GetInfo, SIGTERM, expect exit 0.
_DRIVER = """
import subprocess, sys
from pathlib import Path
import grpc
from distill_core.harness import ServerProcess
from distill_core.proto import teacher_pb2 as pb, teacher_pb2_grpc
if sys.argv[1] == "netns":
  subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
server = ServerProcess([sys.executable, "-m", "teacher_server"], sys.argv[3], Path(sys.argv[2]), cwd=Path.cwd())
try:
  server.wait_serving(240)
  with grpc.insecure_channel(sys.argv[3]) as channel:
    info = teacher_pb2_grpc.TeacherStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30)
  print("buckets", [(b.batch, b.length) for b in info.buckets])
finally:
  print("exit", server.stop())
"""


def _netns_works() -> bool:
  if not shutil.which("unshare") or not shutil.which("ip"):
    return False
  return subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True).returncode == 0


def _port_free(address: str) -> bool:
  host, port = split_address(address, "address")
  with socket.socket() as s:
    try:
      s.bind((host, port))
    except OSError:
      return False
  return True


def test_no_arguments_serves(tmp_path):
  """The docs' first command, exactly: no config, no overrides, the default address."""
  env = one_device_env()  # one CPU device, as on a laptop (the suite's compiler settings kept)
  log = tmp_path / "server.log"
  if _netns_works():  # a private loopback, so the default port is surely free
    cmd = ["unshare", "-n", sys.executable, "-c", _DRIVER, "netns", str(log), DEFAULT_ADDRESS]
  elif _port_free(DEFAULT_ADDRESS):
    cmd = [sys.executable, "-c", _DRIVER, "host", str(log), DEFAULT_ADDRESS]
  else:
    pytest.skip(f"no private network namespace (needs root and unshare) and {DEFAULT_ADDRESS} is in use")
  out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr + log.read_text(errors="replace")
  assert "buckets [(8, 128), (8, 256)]" in out.stdout and "exit 0" in out.stdout, out.stdout
  assert "serving" in log.read_text()
