"""The command sequences of the README and docs a CPU machine can run, pasted into bash as written, in a
scratch directory, in the order shown (slow). The commands are read by the parser of
tests/unit/test_docs_commands.py, which holds the fast checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from unit.test_docs_commands import REPO, bash_blocks, logical_lines, parse

# -- slow: the sequences a CPU machine can run, in order, pasted into bash -------------------------

# Blocks run in a scratch directory holding a copy of configs/ (commands name configs/... and write
# data/ and runs/ relative to it), with this interpreter's directory first on PATH (in place of the
# blocks' `source .venv/bin/activate`). A `python -m teacher_server` line starts a server that stays
# up (in the background) until its block has run.
SEQUENCES = {
    "README: Using it (prepare, tiny students, the demo teacher trained, served and distilled from)": [
        ("README.md", "python -m distill_core.prepare"),
    ],
    "README: a tiny on-policy run against a teacher-server process": [
        ("README.md", "configs/tiny_on_policy.yaml"),
    ],
    "docs/blockwise.md: local, remote and offline teachers": [
        ("docs/blockwise.md", "configs/tiny_blockwise.yaml\n"),
        ("docs/blockwise.md", "python -m teacher_server model.source=preset"),
        ("docs/blockwise.md", "python -m teacher_server.dump"),
    ],
}


def _block_holding(document: str, needle: str) -> list[str]:
  """The logical lines of the first bash block of `document` whose text contains `needle`."""
  path = REPO / document
  for start, lines in bash_blocks(path):
    if needle in "\n".join(lines) + "\n":
      return [text for _, text in logical_lines(start, lines)
              if text.strip() and not text.lstrip().startswith(("#", "source "))]
  raise AssertionError(f"{document}: no bash block contains {needle!r}")


def _sequence_lines(steps) -> list[list[str]]:
  """Blocks, in order, each once (a block named twice runs where first named)."""
  blocks: list[list[str]] = []
  for document, needle in steps:
    block = _block_holding(document, needle)
    if block not in blocks:
      blocks.append(block)
  return blocks


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", sorted(SEQUENCES))
def test_documented_sequences_run_as_pasted(name, tmp_path):
  from distill_core.harness import ServerProcess
  shutil.copytree(REPO / "configs", tmp_path / "configs")
  env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
             JAX_PLATFORMS="cpu")
  for block in _sequence_lines(SEQUENCES[name]):
    servers = []
    try:
      for line in block:
        command = parse("x", line)
        if command is not None and command.module == "teacher_server":
          address = next(w.split("=", 1)[1] for w in command.argv if w.startswith("address="))
          servers.append(ServerProcess(["bash", "-c", f"exec {line}"], address, tmp_path / "server.log",
                                       cwd=tmp_path, env=env, append=True))
          servers[-1].wait_serving(600)
          continue
        out = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=1800)
        assert out.returncode == 0, f"`{line.strip()}` failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    finally:
      for server in servers:
        server.stop()
