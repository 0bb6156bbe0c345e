"""Regenerates the Python protobuf/gRPC modules from ``protos/`` (``make protos``).

The generated files are committed; ``tests/unit/test_wire.py`` regenerates them into
a temporary folder and checks that the committed copies are identical. protoc
writes ``from distill.teacher.v1 import teacher_pb2``; the import is rewritten
so the modules live flat in ``distill_core.proto``.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PROTO_FILES = ("distill/teacher/v1/teacher.proto",)
PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = "distill_core.proto"


def _fix_imports(text: str) -> str:
  """``from distill.teacher.v1 import x_pb2`` -> ``from distill_core.proto import x_pb2``."""
  return re.sub(r"^from distill(?:\.\w+)* import (\w+_pb2)", rf"from {PACKAGE} import \1",
                text, flags=re.MULTILINE)


def generate(out_dir: str | Path) -> list[Path]:
  """Writes ``<name>_pb2.py``, ``<name>_pb2.pyi`` and ``<name>_pb2_grpc.py`` into ``out_dir``."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = []
  with tempfile.TemporaryDirectory() as tmp:
    for proto in PROTO_FILES:
      args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--pyi_out={tmp}",
              f"--grpc_python_out={tmp}", str(PROTO_ROOT / proto)]
      if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto}")
      stem = Path(proto).with_suffix("")
      for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
        src = Path(tmp) / f"{stem}{suffix}"
        dst = out_dir / f"{stem.name}{suffix}"
        dst.write_text(_fix_imports(src.read_text()))
        written.append(dst)
  return written


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(PACKAGE_DIR), help="output folder (default: the package)")
  args = parser.parse_args(argv)
  for path in generate(args.out):
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
