"""The suite benchmark reads pytest's own summary line (benchmarks/bench_suite.py)."""

import pytest

from benchmarks.bench_suite import pytest_counts, run_order


def test_counts_come_from_the_last_summary_line():
  out = ("........................................ [ 97%]\n"
         "....                                     [100%]\n"
         "=========================== short test summary info ===========================\n"
         "SKIPPED [1] tests/unit/test_scale.py:150: libtpu is not installed\n"
         "612 passed, 1 skipped, 8 deselected, 2 warnings in 171.42s (0:02:51)\n")
  assert pytest_counts(out) == {"passed": 612, "skipped": 1, "deselected": 8, "warnings": 2}
  assert pytest_counts("3 passed in 0.10s\nmake: leaving\n3 failed, 1 passed in 2.00s\n") == {"failed": 3, "passed": 1}


def test_output_without_a_summary_is_refused():
  with pytest.raises(ValueError, match="no pytest summary line"):
    pytest_counts("make: *** [Makefile:24: test] Error 4\n")


def test_rounds_alternate_which_side_runs_first():
  assert run_order(["head", "baseline"], 1) == ["baseline", "head"]
  assert run_order(["head", "baseline"], 3) == ["baseline", "head", "head", "baseline", "baseline", "head"]
  assert run_order(["head"], 2) == ["head", "head"]
