"""The teacher server's defaults: every example command of `--help` and the docs' quick start describes a
config whose buckets fit its model, and the vendored health proto is the one served (that
`python -m teacher_server` with no arguments serves is tested in tests/integration/test_server_defaults.py)."""

import re
import shlex
from pathlib import Path

import pytest

from distill_core.config import build, load_config, resolve_preset
from distill_core.model.config import ModelConfig
from teacher_server.__main__ import _EPILOG
from teacher_server.config import ServerConfig

REPO = Path(__file__).resolve().parents[2]


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
