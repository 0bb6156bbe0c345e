"""The README's demo, end to end at a small scale (slow: `make test-slow`)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


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
  # The summary's figures are the runs' own last held-out evaluations, and its difference is theirs.
  # (At this size the distilled student need not beat the baseline; the quality report measures that.)
  def last_eval(run: str) -> float:
    rows = [json.loads(line) for line in (tmp_path / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    return [r["eval/ce_loss"] for r in rows if "eval/ce_loss" in r][-1]
  distilled = float(re.search(r"distilled from the teacher\s+(\d+\.\d+)", out.stdout).group(1))
  m = re.search(r"CE-only baseline\s+(\d+\.\d+)\s+\(distillation: ([+-]\d+\.\d+) nats\)", out.stdout)
  baseline, gain = float(m.group(1)), float(m.group(2))
  assert distilled == pytest.approx(last_eval("student"), abs=5e-4)
  assert baseline == pytest.approx(last_eval("student_ce"), abs=5e-4)
  assert gain == pytest.approx(last_eval("student_ce") - last_eval("student"), abs=5e-4)
  teacher = int(re.search(r"teacher \(([\d,]+) params", out.stdout).group(1).replace(",", ""))
  student = int(re.search(r"student steps \(([\d,]+) params\)", out.stdout).group(1).replace(",", ""))
  assert 3 * student <= teacher
