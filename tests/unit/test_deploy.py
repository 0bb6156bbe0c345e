"""Images and pinned dependencies of deploy/: the constraints file against pyproject.toml, every install
from it, the Dockerfiles (the Kubernetes manifests, rendered with `kubectl kustomize`, are checked in
tests/integration/test_deploy.py)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


# -- images and pinned dependencies ---------------------------------------------------------------


def constraints_module():
  import importlib.util
  spec = importlib.util.spec_from_file_location("constraints", REPO / "scripts" / "constraints.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_constraints_file_agrees_with_pyproject():
  """Every pyproject pin (runtime and dev) is in the file at its version, and the file's closure is whole.

  Checked against pyproject.toml and the file itself only, never against
  what a registry serves today: a new upstream release cannot fail this.
  """
  module = constraints_module()
  text = (DEPLOY / "constraints.txt").read_text()
  assert module.problems(text, module.direct_requirements()) == []
  pins = module.parse(text)
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  for line in project["dependencies"] + project["optional-dependencies"]["dev"]:  # independent parse: `name==v`
    name, version = line.split("==")
    assert pins[module.canonicalize_name(name)][0] == version, line


def test_constraints_check_catches_what_is_wrong():
  module = constraints_module()
  text = (DEPLOY / "constraints.txt").read_text()
  reqs = module.direct_requirements()
  lines = text.splitlines(keepends=True)
  pytest_line = next(line for line in lines if line.startswith("pytest=="))
  filelock_line = next(line for line in lines if line.startswith("filelock=="))
  cases = {
      "pytest==9.2.0 (pyproject.toml) is not pinned": text.replace(pytest_line, ""),
      "but the file pins pytest==0.0.1": text.replace(pytest_line, "pytest==0.0.1  # via pyproject\n"),
      "pinned twice": text + filelock_line,
      "nothing in pyproject.toml needs it": text + "left-over==1.0  # via gone\n",
      "not `name==version": text + "filelock>=4\n",
  }
  for expected, broken in cases.items():
    found = module.problems(broken, reqs)
    assert any(expected in p for p in found), (expected, found)
  # A pin whose installed metadata requires a package the file lacks.
  hub = next(line for line in lines if line.startswith("huggingface-hub=="))
  installed_hub = module.md.version("huggingface-hub")
  if hub.startswith(f"huggingface-hub=={installed_hub} "):
    found = module.problems(text.replace(filelock_line, ""), reqs)
    assert any("requires filelock" in p for p in found), found


def test_every_install_uses_the_constraints():
  """make setup (and so CI, which runs make test) and both images install from the same pinned file."""
  makefile = (REPO / "Makefile").read_text()
  assert re.search(r"pip install .*-c deploy/constraints\.txt -e '\.\[dev,tpu\]'", makefile)
  assert re.search(r"^\$\(STAMP\): .*deploy/constraints\.txt", makefile, re.M)
  assert "make test" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("image", ["teacher", "student"])
def test_dockerfile_pins_and_runs_unprivileged(image):
  text = (DEPLOY / image / "Dockerfile").read_text()
  assert re.search(r"^ARG JAX_EXTRA=tpu$", text, re.M)
  assert '-c deploy/constraints.txt . "jax[${JAX_EXTRA}]"' in text
  assert "COPY deploy/constraints.txt" in text
  user = re.findall(r"^USER (\S+)$", text, re.M)
  assert user and all(part.isdigit() and int(part) != 0 for part in user[-1].split(":"))
  entry = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
  scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
  assert entry[0] in scripts
  for path in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):  # every copied path exists
    assert (REPO / path).exists(), path
  assert "pip install -e" not in text and "JAX_COMPILATION_CACHE_DIR=/tmp" in text
