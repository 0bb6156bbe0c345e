"""``python -m teacher_server [--config FILE] [key=value ...]`` (console script ``teacher-server``)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvloop

from distill_core.config import ConfigError, describe, load_config
from distill_core.logs import setup_logging
from teacher_server.config import ServerConfig
from teacher_server.server import serve

_EPILOG = """\
Examples:
  teacher-server                                   # tiny random model on 127.0.0.1:50051
  teacher-server --config configs/teacher_server.yaml model.source=hf model.path=/ckpt/llama
  teacher-server address=0.0.0.0:50051 security.tls_cert=tls.crt security.tls_key=tls.key security.auth_token_file=token

Options (key=value, nested keys with dots):
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="teacher-server", add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Serve a teacher LLM's top-k logits, logsumexp and layer states over gRPC.",
      epilog=_EPILOG + "\n".join("  " + line for line in describe(ServerConfig)))
  parser.add_argument("-h", "--help", action="help", help="show this help (every option) and exit")
  parser.add_argument("--config", help="YAML config file (may name a `base:` file)")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    cfg = load_config(ServerConfig, args.config, args.overrides)
  except ConfigError as e:
    print(f"teacher-server: {e}", file=sys.stderr)
    return 2

  setup_logging(cfg.log_format, cfg.log_level)
  with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    return runner.run(serve(cfg))


if __name__ == "__main__":
  sys.exit(main())
