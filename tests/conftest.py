"""Test setup, before JAX is imported: eight virtual CPU devices (for mesh tests), fast compiler settings, a
compilation cache."""

import os

# Compiler settings for speed of compilation, in this process and (through harness.cpu_env and inherited
# environments) in every child it starts: on a fresh machine the suite spends most of its time compiling
# small programs. LLVM runs at -O0, and fusions go through XLA's elemental emitter instead of its MLIR
# fusion emitters: -O0 alone helps, the elemental emitter alone (at -O2) does not, and together they
# compile the suite's programs much faster than -O0 alone (benchmarks/bench_suite.py; its figures are in
# the README). Results can differ from a default build's in the last bit, the same way in every process
# of a test, so exactness between the two sides of a test still holds; no test compares against bits
# produced with other settings.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_cpu_use_fusion_emitters=false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny programs: a persistent cache turns repeats into loads.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "distill-jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import logging  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def root_logging():
  """The root logger, its handlers and level restored after the test: for a test that sets up logging as a
  command does (distill_core.logs.setup_logging), which would otherwise leave its handler to later tests."""
  root = logging.getLogger()
  saved = root.handlers[:], root.level
  yield root
  root.handlers[:] = saved[0]
  root.setLevel(saved[1])


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
  """A small prepared corpus (150 standard-library files, vocab 384, seq_len 32) shared by tests."""
  from distill_core.prepare import PrepareConfig, prepare
  out = tmp_path_factory.mktemp("tiny_dataset")
  cfg = PrepareConfig(max_files=150, vocab_size=384, seq_len=32, output_dir=str(out), records_per_shard=2048)
  prepare(cfg, show_progress=False)
  return out


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
  """A prepared corpus small enough to dump whole (8 files: ~800 train and ~50 eval rows, vocab 384, seq_len 32)."""
  from distill_core.prepare import PrepareConfig, prepare
  out = tmp_path_factory.mktemp("small_dataset")
  cfg = PrepareConfig(max_files=8, vocab_size=384, seq_len=32, output_dir=str(out), records_per_shard=256,
                      eval_fraction=0.25)
  prepare(cfg, show_progress=False)
  return out
