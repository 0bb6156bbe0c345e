"""The quality report end to end and the benchmarks' view of a git checkout, in child processes (the
results file, the rendered tables and the report's arithmetic are in tests/unit/test_reports.py)."""

from __future__ import annotations

import json
import math

import pytest
from unit.test_reports import check_quality_arithmetic

from benchmarks import quality, report, results
from distill_core import harness


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quality_quick_end_to_end(tmp_path):
  """`python -m benchmarks.quality --quick` trains every row, evaluates it and writes the JSON and the PNG."""
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--quick", "--out-dir", str(tmp_path / "runs"),
                        "--results-dir", str(tmp_path / "results")], cwd=report.REPO, capture_output=True,
                       text=True, timeout=1700)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
  data = json.loads((tmp_path / "results" / "quality.json").read_text())
  slugs = [r["slug"] for r in data["rows"]]
  assert slugs == [r.slug for r in quality.ROWS if r.default and r.available()]
  for row in data["rows"]:
    assert all(math.isfinite(x) for x in row["eval_ce"] + row["eval_kd"] + row["eval_rkl"])
    assert all(n > 0 for n in row["eval_rkl_tokens"])
    assert row["curves"] and all(row["curves"])
  check_quality_arithmetic(data)
  # Each seed trains on its own data order, and every run records the code that trained it.
  for s in data["setup"]["seeds"]:
    stamp = json.loads((tmp_path / "runs" / "ce_only" / f"seed{s}" / harness.STAMP).read_text())
    assert f"data.seed={s}" in stamp["overrides"] and f"seed={s}" in stamp["overrides"]
    assert stamp["code"] == data["code_digest"] == quality.code_digest()
  assert data["summary"]["teacher_eval_ce"] < data["summary"]["ce_only_eval_ce"]
  assert (tmp_path / "results" / "quality.png").read_bytes()[:4] == b"\x89PNG"
  assert "| CE only |" in report.render_quality(data)


# -- the commit a figure is recorded with ---------------------------------------------------------------


def test_only_the_benchmarks_own_output_leaves_the_commit_clean(tmp_path):
  """Results files and rendered tables changed since HEAD are the benchmarks' output, not a dirty tree."""
  import shutil
  import subprocess
  if shutil.which("git") is None:
    pytest.skip("git is not installed")
  (tmp_path / "docs").mkdir()
  (tmp_path / "benchmarks" / "results").mkdir(parents=True)
  readme = tmp_path / "README.md"
  readme.write_text("prose\n<!-- results:a -->\nold table\n<!-- /results -->\nmore prose\n")
  (tmp_path / "benchmarks" / "results" / "latest.json").write_text("{}\n")
  (tmp_path / "code.py").write_text("x = 1\n")
  git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
  subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
  subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
  subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
  readme.write_text("prose\n<!-- results:a -->\nnew table\n<!-- /results -->\nmore prose\n")
  (tmp_path / "benchmarks" / "results" / "latest.json").write_text('{"a": 1}\n')
  outputs = ["README.md", "benchmarks/results/latest.json"]
  assert not results._changed_outside_outputs(outputs, tmp_path)
  readme.write_text("changed prose\n<!-- results:a -->\nnew table\n<!-- /results -->\nmore prose\n")
  assert results._changed_outside_outputs(outputs, tmp_path)
  assert results._changed_outside_outputs(["code.py"], tmp_path)
