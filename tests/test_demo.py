"""The README's demo, end to end at a small scale (slow: `make test-slow`)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_demo_runs_end_to_end(tmp_path):
  out = subprocess.run(
      [sys.executable, "scripts/demo.py", "--teacher-steps", "12", "--student-steps", "6",
       "--run-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "data")],
      cwd=ROOT, capture_output=True, text=True, timeout=1100)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
  assert "== summary" in out.stdout
  assert (tmp_path / "runs" / "student" / "hf" / "config.json").is_file()
  assert (tmp_path / "runs" / "student" / "hf" / "tokenizer.json").is_file()
  student_log = (tmp_path / "runs" / "student" / "metrics.jsonl").read_text()
  assert '"train/kd_loss"' in student_log and '"teacher/requests_total"' in student_log
  # The comparison: a CE-only baseline with the same budget, and the curves of both students.
  baseline_log = (tmp_path / "runs" / "student_ce" / "metrics.jsonl").read_text()
  assert '"eval/ce_loss"' in baseline_log and '"train/kd_loss"' not in baseline_log
  assert "CE-only baseline" in out.stdout and "distilled from the teacher" in out.stdout
  assert (tmp_path / "runs" / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
