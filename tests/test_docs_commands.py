"""The commands in the README and docs work as pasted.

Commands are read from the ```bash blocks of README.md, docs/*.md,
deploy/README.md and benchmarks/README.md (continuation lines joined, shell
comments and redirections dropped). Fast checks: every documented
`python -m MODULE` answers `--help` without doing anything else; every
documented trainer, server, dump and prepare command's config (file plus its
overrides) validates; no two documented trainer runs share a run_dir with
configs a resume would refuse; the replicas config talks to what deploy/
creates. The slow check runs the CPU-feasible command sequences in a scratch
directory, in the order shown, pasted into bash as written.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "deploy" / "README.md",
             REPO / "benchmarks" / "README.md"]
# Modules whose config a command builds with load_config(Class, --config, overrides).
CONFIG_MODULES = ("student_trainer", "teacher_server", "teacher_server.dump", "distill_core.prepare")


@dataclass(frozen=True)
class Command:
  source: str       # file:line of the command's first line
  text: str         # the logical line as written (continuations joined)
  argv: list[str]   # the python program's arguments, up to the first shell operator
  module: str | None  # `python -m MODULE`, else None


def bash_blocks(path: Path) -> list[tuple[int, list[str]]]:
  """(first line number, lines) of every ```bash block."""
  blocks, current, start = [], None, 0
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if line.startswith("```"):
      if current is None and line[3:].strip() == "bash":
        current, start = [], number + 1
      elif current is not None:
        blocks.append((start, current))
        current = None
      continue
    if current is not None:
      current.append(line)
  return blocks


def logical_lines(start: int, lines: list[str]) -> list[tuple[int, str]]:
  """Lines with `\\` continuations joined, each with the number of its first line."""
  out, buffer, first = [], "", start
  for offset, line in enumerate(lines):
    if not buffer:
      first = start + offset
    if line.rstrip().endswith("\\"):
      buffer += line.rstrip()[:-1] + " "
      continue
    out.append((first, buffer + line))
    buffer = ""
  return out


def parse(source: str, text: str) -> Command | None:
  """The python command in a shell line, or None when the line runs no `python -m`."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.commenters = "#"
  lexer.whitespace_split = True
  words = []
  for word in lexer:
    if word and set(word) <= set("&|;<>()"):
      break
    words.append(word)
  while words and "=" in words[0] and not words[0].startswith("-"):  # VAR=value prefixes
    words.pop(0)
  if len(words) < 3 or Path(words[0]).name not in ("python", "python3") or words[1] != "-m":
    return None
  return Command(source, text, words[3:], words[2])


def documented_commands() -> list[Command]:
  out = []
  for path in DOCUMENTS:
    for start, lines in bash_blocks(path):
      for number, text in logical_lines(start, lines):
        command = parse(f"{path.relative_to(REPO)}:{number}", text)
        if command is not None:
          out.append(command)
  return out


COMMANDS = documented_commands()


class _Loaded(Exception):
  """Raised by the patched load_config once the command's config is built."""

  def __init__(self, cfg):
    super().__init__()
    self.cfg = cfg


def config_of(command: Command):
  """The config a documented command builds, by its own main(), stopped right after load_config."""
  import importlib
  module = importlib.import_module(command.module + (".__main__" if command.module in
                                                     ("student_trainer", "teacher_server") else ""))
  real = module.load_config

  def capture(*args, **kwargs):
    raise _Loaded(real(*args, **kwargs))

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(module, "load_config", capture)
    mp.chdir(REPO)
    out, err = io.StringIO(), io.StringIO()
    code = None
    try:
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(command.argv)
    except _Loaded as loaded:
      return loaded.cfg
    except SystemExit as exit_:
      code = exit_.code
  raise AssertionError(f"{command.source}: `{command.text.strip()}` did not build its config "
                       f"(exit {code}): {err.getvalue().strip()[-500:]}")


def test_commands_are_found_in_every_document_kind():
  sources = {c.source.split(":")[0] for c in COMMANDS}
  assert {"README.md", "docs/blockwise.md", "docs/trainer.md", "deploy/README.md",
          "benchmarks/README.md"} <= sources, sources
  assert parse("x:1", "JAX_PROCESS_ID=$i python -m student_trainer --config a.yaml steps=2 > log 2>&1 &").argv == \
      ["--config", "a.yaml", "steps=2"]
  assert parse("x:1", "python -m teacher_server 'batcher.buckets=[[8,256]]' limits.max_samples=64  # a note").argv \
      == ["batcher.buckets=[[8,256]]", "limits.max_samples=64"]
  assert parse("x:1", "kubectl apply -k deploy") is None


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy of an imported module
@pytest.mark.parametrize("module", sorted({c.module for c in COMMANDS if c.module != "pytest"}))
def test_every_documented_module_answers_help_and_does_nothing_else(module, monkeypatch, capsys, tmp_path):
  """`python -m MODULE --help` prints usage and exits 0 (run_all used to start every benchmark)."""
  monkeypatch.chdir(tmp_path)  # anything the module wrongly starts would write here, not in the checkout
  monkeypatch.setattr(sys, "argv", [module, "--help"])
  monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail(f"{module} --help started {a[0]}"))
  monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail(f"{module} --help started {a[0]}"))
  with pytest.raises(SystemExit) as exit_:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  assert exit_.value.code in (0, None), f"{module} --help exited {exit_.value.code}"
  out = capsys.readouterr().out
  assert "usage" in out.lower(), out[:500]
  assert not list(tmp_path.iterdir()), f"{module} --help wrote {list(tmp_path.iterdir())}"


def test_benchmark_help_pages_show_defaults(capsys):
  for command in sorted({c.module for c in COMMANDS if c.module.startswith("benchmarks.bench_")}):
    module = __import__(command, fromlist=["x"])
    with pytest.raises(SystemExit):
      (module.parse_args if hasattr(module, "parse_args") else module.main)(["--help"])
    out = capsys.readouterr().out
    assert "(default:" in out, f"{command} --help shows no defaults"


CONFIG_COMMANDS = [c for c in COMMANDS if c.module in CONFIG_MODULES and "--help" not in c.argv]


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=lambda c: c.source)
def test_every_documented_config_validates(command):
  assert config_of(command) is not None


def _run_dir(cfg) -> str:
  return os.path.normpath(cfg.run_dir)


def test_no_two_documented_trainer_runs_share_a_run_dir_with_different_configs():
  """A second documented run in the same run_dir resumes the first; its config must be one a resume accepts."""
  from student_trainer.checkpoint import config_changes
  trainers = [(c, config_of(c)) for c in CONFIG_COMMANDS if c.module == "student_trainer"]
  assert len(trainers) >= 10
  seen: dict[str, tuple[Command, dict]] = {}
  clashes = []
  for command, cfg in trainers:
    dumped = cfg.model_dump(mode="json")
    earlier = seen.setdefault(_run_dir(cfg), (command, dumped))
    if earlier[0] is command:
      continue
    # the earlier run finished: its checkpoint is at its last step
    changes = config_changes(earlier[1], dumped, saved_step=earlier[1]["steps"], allow=cfg.checkpoint.allow_changes)
    if changes:
      clashes.append(f"{command.source} reuses run_dir {cfg.run_dir} of {earlier[0].source} with "
                     f"{'; '.join(changes)}")
  assert not clashes, "\n".join(clashes)


def test_run_dir_clash_detection_catches_a_changed_loss():
  """The check above is not vacuous: the README's sampled run without its own run_dir would clash."""
  from student_trainer.checkpoint import config_changes
  plain = parse("x:1", "python -m student_trainer --config configs/demo/student.yaml")
  sampled = parse("x:2", "python -m student_trainer --config configs/demo/student.yaml loss.kd_mode=sampled "
                         "loss.top_k=8 loss.num_samples=24")
  a, b = config_of(plain), config_of(sampled)
  assert _run_dir(a) == _run_dir(b)
  assert any(c.startswith("loss.kd_mode") for c in config_changes(a.model_dump(mode="json"),
                                                                   b.model_dump(mode="json"), saved_step=0))


def test_replicas_config_talks_to_what_deploy_creates():
  """configs/student_remote_replicas.yaml names deploy/'s namespace, Service and Secret mounts."""
  from distill_core.config import load_config
  from student_trainer.config import TrainConfig
  remote = load_config(TrainConfig, str(REPO / "configs" / "student_remote_replicas.yaml"), []).teacher.remote
  namespace = yaml.safe_load((REPO / "deploy" / "kustomization.yaml").read_text())["namespace"]
  service = yaml.safe_load((REPO / "deploy" / "teacher" / "service.yaml").read_text())
  port = next(p["port"] for p in service["spec"]["ports"] if p.get("name", "grpc") == "grpc")
  assert remote.address == f"dns:///{service['metadata']['name']}.{namespace}.svc.cluster.local:{port}"
  deployed = yaml.safe_load((REPO / "deploy" / "student" / "trainer.yaml").read_text())["teacher"]["remote"]
  assert (remote.token_file, remote.root_certificates) == (deployed["token_file"], deployed["root_certificates"])
  jobset = (REPO / "deploy" / "student" / "jobset.yaml").read_text()
  for path in (remote.token_file, remote.root_certificates):
    assert f"mountPath: {os.path.dirname(path)}," in jobset, f"{path} is not where deploy/student mounts a Secret"


# -- slow: the sequences a CPU machine can run, in order, pasted into bash -------------------------

# Blocks run in a scratch directory holding a copy of configs/ (commands name configs/... and write
# data/ and runs/ relative to it), with this interpreter's directory first on PATH (in place of the
# blocks' `source .venv/bin/activate`). A `python -m teacher_server` line starts a server that stays
# up (in the background) until its block has run.
SEQUENCES = {
    "README: Using it (prepare, tiny students, the demo teacher trained, served and distilled from)": [
        ("README.md", "python -m distill_core.prepare"),
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
