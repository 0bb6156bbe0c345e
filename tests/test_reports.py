"""The benchmark results file, the rendered tables, and the quality report's arithmetic."""

from __future__ import annotations

import json
import math
import re

import pytest

from benchmarks import quality, report, results

# A measured figure in prose: a number followed by a throughput, size or time unit, or a loss value.
FIGURE = re.compile(r"\b\d[\d,]*(?:\.\d+)?\s*(?:tokens/s|tok/s|bytes/token|bytes per token|bytes/entry|"
                    r"bytes per entry|ms/step|MB/s|GB/s|x faster)|\b(?:eval|held-out) CE (?:of )?\d\.\d", re.I)


def _outside_generated(text: str) -> str:
  """The text without rendered blocks and code fences (commands may carry numbers as options)."""
  text = report.MARKER.sub("", text)
  return re.sub(r"```.*?```", "", text, flags=re.S)


def test_rendered_tables_equal_the_committed_results():
  """Every marked table in README.md and docs/ is exactly what benchmarks.report renders."""
  stale = []
  res, qual, defs = report.load_all()
  for path in report.documents():
    if path.exists():
      text = path.read_text()
      if report.render_text(text, res, qual, defs) != text:
        stale.append(str(path))
  assert not stale, f"stale tables (run `python -m benchmarks.report`): {stale}"


def test_no_figure_is_typed_by_hand():
  hits = []
  for path in report.documents():
    if path.exists():
      for match in FIGURE.finditer(_outside_generated(path.read_text())):
        hits.append(f"{path.name}: {match.group(0)!r}")
  assert not hits, "measured figures outside generated tables (record them and render a table):\n" + "\n".join(hits)


def test_every_rendered_key_is_defined():
  defs = report.definitions()
  keys = set()
  for path in report.documents():
    if path.exists():
      for match in report.MARKER.finditer(path.read_text()):
        if match.group(2).startswith("results:"):
          keys |= {k.strip() for k in match.group(2).split(":", 1)[1].split(",") if k.strip()}
  assert keys, "no rendered tables found"
  assert not keys - set(defs), f"keys without a definition in benchmarks/README.md: {sorted(keys - set(defs))}"


def test_record_merges_by_key_and_stamps_each_entry(tmp_path, monkeypatch):
  path = tmp_path / "latest.json"
  monkeypatch.setenv(results.ENV_PATH, str(path))
  results.record({"a": (1.5, "ratio"), "b": (10, "tokens/s")}, command="python -m x")
  results.record({"b": (12.0, "tokens/s"), "c": (0.25, "fraction")}, command="python -m y")
  data = json.loads(path.read_text())
  assert {k: v["value"] for k, v in data.items()} == {"a": 1.5, "b": 12.0, "c": 0.25}
  assert data["a"]["command"] == "python -m x" and data["b"]["command"] == "python -m y"
  for entry in data.values():
    assert set(entry) >= {"value", "unit", "command", "commit", "date", "machine"}
    assert entry["machine"]["cores"] >= 1 and entry["machine"]["cpu"]
  with pytest.raises(ValueError, match="'bad' is not finite"):
    results.record({"bad": (math.nan, "ratio")}, command="x")
  assert "bad" not in json.loads(path.read_text())


def test_render_results_uses_values_units_definitions_and_sources():
  res = {"k1": {"value": 0.9432, "unit": "ratio", "command": "python -m benchmarks.bench_x", "commit": "abc",
                "date": "2026-12-01T10:00:00+00:00", "machine": {"cpu": "CPU X", "cores": 2, "accelerator": None}},
         "k2": {"value": 2637.4, "unit": "tokens/s", "command": "python -m benchmarks.bench_x", "commit": "abc",
                "date": "2026-12-01T10:00:00+00:00", "machine": {"cpu": "CPU X", "cores": 2, "accelerator": None}},
         "k3": {"value": 0.31, "unit": "fraction", "command": "python -m benchmarks.bench_y", "commit": "def",
                "date": "2026-12-02T10:00:00+00:00", "machine": {"cpu": "CPU X", "cores": 2, "accelerator": None}}}
  text = "intro\n<!-- results:k1,k2,k3,k4 -->\nold\n<!-- /results -->\nafter\n"
  out = report.render_text(text, res, None, {"k1": "one", "k2": "two"})
  assert "| `k1` | 0.943 | ratio | one |" in out
  assert "| `k2` | 2,637 | tokens/s | two |" in out
  assert "| `k3` | 31.0 % | fraction |  |" in out
  assert "| `k4` | not measured |" in out
  assert out.count("Measured by `python -m benchmarks.bench_x` at commit `abc` on 2026-12-01") == 1
  assert "bench_y` at commit `def` on 2026-12-02 (CPU X, 2 cores, no accelerator)" in out
  assert out.startswith("intro\n") and out.endswith("<!-- /results -->\nafter\n") and "old" not in out
  assert report.render_text(out, res, None, {"k1": "one", "k2": "two"}) == out  # idempotent


def _row(slug, ces):
  return {"slug": slug, "label": slug, "eval_ce_mean": sum(ces) / len(ces), "eval_ce_spread": max(ces) - min(ces)}


def test_quality_summary_gain_recovered_and_verdicts():
  rows = [_row("ce_only", [5.0, 5.1]), _row("kd_dense", [4.5, 4.6]), _row("tail", [4.7, 4.8]),
          _row("topk", [5.02, 5.06])]
  summary = quality.summarise(rows, teacher_ce=4.0)
  by = {r["slug"]: r for r in rows}
  assert by["tail"]["gain_recovered"] == pytest.approx((5.05 - 4.75) / (5.05 - 4.55))
  assert by["kd_dense"]["gain_recovered"] == pytest.approx(1.0)
  assert by["tail"]["verdict"].startswith("better by 0.300")
  assert by["topk"]["verdict"].startswith("within seed spread")
  assert by["ce_only"]["verdict"] == "baseline"
  assert summary["gap"] == pytest.approx(1.05)
  assert summary["gap_over_spread"] == pytest.approx(1.05 / 0.1)


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
  assert slugs[:5] == ["ce_only", "kd_dense", "tail", "renormalize", "topk"]
  for row in data["rows"]:
    assert len(row["eval_ce"]) == 2 and all(math.isfinite(x) for x in row["eval_ce"] + row["eval_kd"])
    assert row["curves"] and all(row["curves"])
  assert data["summary"]["teacher_eval_ce"] < data["summary"]["ce_only_eval_ce"]
  assert (tmp_path / "results" / "quality.png").read_bytes()[:4] == b"\x89PNG"
  assert "| CE only |" in report.render_quality(data)
