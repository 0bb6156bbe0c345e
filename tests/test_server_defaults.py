"""The teacher server's defaults run: `python -m teacher_server` with no arguments, and every example
command of `--help` and the docs' quick start describes a config whose buckets fit its model."""

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distill_core.config import build, load_config, resolve_preset
from distill_core.model.config import ModelConfig
from teacher_server.__main__ import _EPILOG
from teacher_server.config import ServerConfig, split_address

REPO = Path(__file__).resolve().parent.parent
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
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a laptop
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
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


def _example_commands() -> list[list[str]]:
  """Every `teacher-server ...` / `python -m teacher_server ...` line of --help and the docs' quick start."""
  docs = (REPO / "docs" / "teacher_server.md").read_text()
  quick = re.search(r"## Quick start\n\n```bash\n(.*?)```", docs, re.S).group(1)
  text = _EPILOG.split("Options")[0] + quick
  commands = []
  for line in text.replace("\\\n", " ").splitlines():
    line = line.strip()
    for prefix in ("python -m teacher_server", "teacher-server"):
      if line.startswith(prefix):
        args = shlex.split(line[len(prefix):], comments=True)
        if "--help" not in args:
          commands.append(args)
  return commands


@pytest.mark.parametrize("args", _example_commands(), ids=lambda a: " ".join(a)[:60] or "no arguments")
def test_example_commands_fit_their_model(args):
  config = args[args.index("--config") + 1] if "--config" in args else None
  overrides = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
  cfg = load_config(ServerConfig, REPO / config if config else None, overrides)
  longest = max(t for _, t in cfg.batcher.buckets)
  if cfg.model.source == "preset":
    model = build(ModelConfig, {**resolve_preset(cfg.model.preset), **cfg.model.overrides})
    assert longest <= model.max_position_embeddings, (args, longest, model.max_position_embeddings)
  assert all(b % max(cfg.mesh.data, 1) == 0 for b, _ in cfg.batcher.buckets)


def test_default_buckets_fit_default_preset():
  cfg = ServerConfig()
  model = build(ModelConfig, resolve_preset(cfg.model.preset))
  assert max(t for _, t in cfg.batcher.buckets) <= model.max_position_embeddings


def test_vendored_health_proto_is_the_one_served(tmp_path):
  """protos/grpc/health/v1/health.proto declares exactly the messages and service the server implements."""
  from google.protobuf import descriptor_pb2
  from grpc_health.v1 import health_pb2
  from grpc_tools import protoc
  out = tmp_path / "health.pb"
  assert protoc.main(["grpc_tools.protoc", f"-I{REPO / 'protos'}", f"--descriptor_set_out={out}",
                      str(REPO / "protos" / "grpc" / "health" / "v1" / "health.proto")]) == 0
  vendored = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
  served = descriptor_pb2.FileDescriptorProto()
  health_pb2.DESCRIPTOR.CopyToProto(served)
  assert vendored.package == served.package == "grpc.health.v1"
  def strip_json_names(messages):  # protoc fills json_name, the runtime descriptor does not
    for message in messages:
      for field in message.field:
        field.ClearField("json_name")
      strip_json_names(message.nested_type)
  strip_json_names(vendored.message_type)
  strip_json_names(served.message_type)
  by_name = lambda msgs: {m.name: m for m in msgs}  # noqa: E731
  for name, message in by_name(served.message_type).items():
    assert by_name(vendored.message_type)[name] == message, name
  served_methods = {(m.name, m.input_type, m.output_type, m.server_streaming) for m in served.service[0].method}
  vendored_methods = {(m.name, m.input_type, m.output_type, m.server_streaming) for m in vendored.service[0].method}
  assert served_methods <= vendored_methods and {"Check", "Watch"} <= {m[0] for m in served_methods}
