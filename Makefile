# One command sets up and runs the demo; one sets up and runs the tests.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-unit test-integration test-slow bench protos clean

setup: $(STAMP)

# Every version comes from deploy/constraints.txt (as in CI and the images): a new upstream
# release changes nothing until `python scripts/constraints.py` regenerates the file on purpose.
$(STAMP): pyproject.toml deploy/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -c deploy/constraints.txt -e '.[dev,tpu]'
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) scripts/demo.py

# tests/unit: no process, no server, no training loop; tests/integration: the rest. `test` runs both.
# TEST_WORKERS pytest processes (pytest-xdist) share the tests, an idle one taking work from a busy one;
# every test has its own ports and directories. More workers need more memory: each holds its own JAX.
TEST_WORKERS ?= 2
PYTEST := $(VPY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

test: $(STAMP)
	$(PYTEST)

test-unit: $(STAMP)
	$(PYTEST) tests/unit

test-integration: $(STAMP)
	$(PYTEST) tests/integration

test-slow: $(STAMP)
	$(VPY) -m pytest -q -m slow

bench: $(STAMP)
	$(VPY) -m benchmarks.run_all

protos: $(STAMP)
	$(VPY) -m distill_core.proto.codegen

clean:
	rm -rf $(VENV) build *.egg-info
