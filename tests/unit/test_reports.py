"""The benchmark results file, the rendered tables, and the quality report's arithmetic."""

from __future__ import annotations

import json
import math
import re
import statistics
from fractions import Fraction

import numpy as np
import pytest

from benchmarks import quality, report, results

# A measured figure in prose: a number followed by a throughput or size unit, a loss value, or an
# approximate duration or share ("about 13 s", "~3 s", "about a minute", "a few minutes", "about 15 %").
# Durations and percentages that are settings or bounds ("a 90 s termination grace", "timeout_s=1.5 s")
# are not approximate and stay allowed.
_APPROX = r"(?:about|~|roughly|around|approximately|nearly|almost|under|up to)\s*"
_COUNT = r"(?:a|an|one|two|three|four|five|ten|twenty|thirty|half an?|a few|several|a couple of)"
FIGURE = re.compile(
    r"\b\d[\d,]*(?:\.\d+)?\s*(?:tokens/s|tok/s|bytes/token|bytes per token|bytes/entry|"
    r"bytes per entry|ms/step|MB/s|GB/s|x faster)|\b(?:eval|held-out) CE (?:of )?\d\.\d"
    rf"|{_APPROX}\d[\d,]*(?:\.\d+)?(?:\s*-\s*\d+(?:\.\d+)?)?\s*(?:s|ms|sec|seconds?|min|minutes?|h|hours?|%)(?![\w/])"
    rf"|{_APPROX}{_COUNT}\s+(?:seconds?|minutes?|hours?)\b"
    r"|\b(?:a few|several|a couple of) (?:seconds|minutes|hours)\b", re.I)


def _outside_generated(text: str) -> str:
  """The text without rendered blocks, and of code fences only their comments (options carry numbers)."""
  text = report.MARKER.sub("", text)
  return re.sub(r"```.*?```", lambda m: "\n".join(line.partition(" #")[2] for line in m.group(0).splitlines()),
                text, flags=re.S)


@pytest.mark.parametrize("text", [
    "takes about 13 s on an otherwise idle machine", "(about 25 s while other jobs share the cores)",
    "| `tests/test_wire.py` | round trips | ~3 s |", "# tiny model, default limits, about a minute on 2 cores",
    "runs vary by about 15 % from one run", "under a minute cold", "at CI size, a few minutes",
    "up to an hour on 2 CPU cores", "vocabulary 384; about ten seconds", "~10-30 s", "2,637 tokens/s",
    "held-out CE of 3.13"])
def test_figure_pattern_finds_hand_typed_measurements(text):
  assert FIGURE.search(_outside_generated(text)), text


@pytest.mark.parametrize("text", [
    "a 90 s termination grace (> `shutdown_grace_s`)", "`timeout_s`=1.5 s", "the wait ends within 0.25 s",
    "One WARNING line per 10 s", "a teacher process whose engine takes 8 seconds",
    "```bash\npython -m x --steps 30 --seconds 20\n```", "blockwise (30 %), then tail KD"])
def test_figure_pattern_leaves_settings_alone(text):
  assert not FIGURE.search(_outside_generated(text)), text


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
  for path in [*report.documents(), report.DEFINITIONS]:
    if path.exists():
      text = path.read_text()
      if path == report.DEFINITIONS:  # its key table holds definitions (targets included), rendered as tables
        text = "\n".join(line for line in text.splitlines() if not line.startswith("| `"))
      for match in FIGURE.finditer(_outside_generated(text)):
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
  # A benchmark that measured a clone names the clone's commit, whatever state this checkout is in.
  results.record({"d": (3.0, "s")}, command="python -m z", commit="0123456789ab")
  assert json.loads(path.read_text())["d"]["commit"] == "0123456789ab"


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
  return {"slug": slug, "label": slug, "eval_ce": list(ces), "eval_kd": [0.5] * len(ces)}


def test_quality_summary_gain_recovered_and_verdicts():
  rows = [_row("ce_only", [5.0, 5.1, 5.2]), _row("kd_dense", [4.5, 4.6, 4.7]), _row("tail", [4.66, 4.71, 4.76]),
          _row("topk", [5.02, 5.06, 5.22])]
  summary = quality.summarise(rows, teacher_ce=4.0)
  by = {r["slug"]: r for r in rows}
  se = 0.1 / math.sqrt(3)  # sample sd 0.1 of three values 0.1 apart, over sqrt(3)
  assert by["ce_only"]["eval_ce_mean"] == pytest.approx(5.1) and by["ce_only"]["eval_ce_se"] == pytest.approx(se)
  assert by["tail"]["gain_recovered"] == pytest.approx((5.1 - 4.71) / (5.1 - 4.6))
  assert by["kd_dense"]["gain_recovered"] == pytest.approx(1.0)
  assert by["tail"]["verdict"].startswith("better by 0.390")
  assert by["topk"]["verdict"].startswith("not separated")
  assert by["ce_only"]["verdict"] == "baseline"
  assert summary["gap"] == pytest.approx(1.1)
  tail_topk = next(c for c in summary["comparisons"] if (c["row"], c["ref"]) == ("tail", "topk"))
  assert tail_topk["separated"] and tail_topk["seeds_needed"] is None
  tail_dense = next(c for c in summary["comparisons"] if (c["row"], c["ref"]) == ("tail", "kd_dense"))
  se_diff = math.sqrt(se ** 2 + (se / 2) ** 2)  # tail's values are half as far apart
  assert not tail_dense["separated"] and tail_dense["diff"] == pytest.approx(0.11)
  assert tail_dense["se"] == pytest.approx(se_diff)
  # 0.11 = 2 * se_diff * sqrt(3 / n)  =>  n = 3 * (2 * se_diff / 0.11) ** 2 = 4.13, rounded up.
  assert tail_dense["seeds_needed"] == 5
  assert tail_dense in summary["not_separated"]


def test_quality_runs_key_on_code_and_seed_the_data_order(tmp_path):
  b = quality.QUICK
  assert "data.seed=2" in quality.common_overrides(b, tmp_path, tmp_path, 8, 2)
  for d in ("distill_core", "student_trainer", "teacher_server", "configs/models"):
    (tmp_path / d).mkdir(parents=True)
  (tmp_path / "student_trainer" / "a.py").write_text("x = 1\n")
  (tmp_path / "configs" / "models" / "demo_student.yaml").write_text("hidden_size: 8\n")
  before = quality.code_digest(tmp_path)
  (tmp_path / "student_trainer" / "a.py").write_text("x = 2\n")
  assert quality.code_digest(tmp_path) != before
  (tmp_path / "student_trainer" / "a.py").write_text("x = 1\n")
  assert quality.code_digest(tmp_path) == before
  (tmp_path / "configs" / "models" / "demo_student.yaml").write_text("hidden_size: 16\n")
  assert quality.code_digest(tmp_path) != before
  assert len(quality.code_digest()) == 16


def test_quality_two_phase_rows_have_their_own_schedules():
  b = quality.DEFAULT
  first = quality.first_steps(b)
  assert 0 < first < b.student_steps
  for steps in (first, b.student_steps - first, b.student_steps):
    assert f"optim.warmup_steps={quality.warmup(steps)}" in quality.common_overrides(b, b, b, steps, 0)
  assert quality.warmup(24) == 3 and quality.warmup(7) == 1


def check_quality_arithmetic(data: dict) -> None:
  """Every derived figure of a quality report, recomputed from its per-seed values."""
  import statistics
  rows = {r["slug"]: r for r in data["rows"]}
  for r in data["rows"]:
    n = len(r["seeds"])
    assert n >= 3 and len(r["eval_ce"]) == n == len(r["eval_kd"]) and len(set(r["seeds"])) == n
    assert r["eval_ce_mean"] == pytest.approx(statistics.fmean(r["eval_ce"]), abs=1e-12)
    assert r["eval_ce_se"] == pytest.approx(statistics.stdev(r["eval_ce"]) / math.sqrt(n), abs=1e-12)
    assert r["eval_kd_mean"] == pytest.approx(statistics.fmean(r["eval_kd"]), abs=1e-12)
    assert (r["eval_ce_min"], r["eval_ce_max"]) == (min(r["eval_ce"]), max(r["eval_ce"]))
    if "eval_rkl" in r:  # reports since the own-sample reverse-KL column
      assert len(r["eval_rkl"]) == n and all(x >= -1e-6 for x in r["eval_rkl"])  # a KL: never negative
      assert r["eval_rkl_mean"] == pytest.approx(statistics.fmean(r["eval_rkl"]), abs=1e-12)
      assert r["eval_rkl_se"] == pytest.approx(statistics.stdev(r["eval_rkl"]) / math.sqrt(n), abs=1e-12)
      assert data["summary"]["teacher_eval_rkl"] == pytest.approx(0.0, abs=1e-6)  # the teacher's own samples
      if r.get("on_policy_fraction"):
        s = data["setup"]
        planned = s["batch"] * quality.scored_positions(r["steps"], r["on_policy_fraction"], s["seq_len"],
                                                        s["new_tokens"])
        target = s["student_steps"] * s["batch"] * s["seq_len"]
        # the matched step count: no other count plans scored positions closer to the corpus rows'
        for other in (r["steps"] - 1, r["steps"] + 1):
          assert abs(planned - target) <= abs(s["batch"] * quality.scored_positions(
              other, r["on_policy_fraction"], s["seq_len"], s["new_tokens"]) - target)
        assert all(0 < x <= planned for x in r["scored_tokens"])  # rows that stop early generate fewer
  base, dense = rows["ce_only"], rows["kd_dense"]
  for r in data["rows"]:
    if r["slug"] != "ce_only":
      want = (statistics.fmean(base["eval_ce"]) - statistics.fmean(r["eval_ce"])) / (
          statistics.fmean(base["eval_ce"]) - statistics.fmean(dense["eval_ce"]))
      assert r["gain_recovered"] == pytest.approx(want, rel=1e-9)
  z = data["summary"]["z"]
  for c in data["summary"]["comparisons"]:
    a, b = rows[c["row"]], rows[c["ref"]]
    se = math.sqrt(statistics.variance(a["eval_ce"]) / len(a["eval_ce"]) +
                   statistics.variance(b["eval_ce"]) / len(b["eval_ce"]))
    diff = statistics.fmean(a["eval_ce"]) - statistics.fmean(b["eval_ce"])
    assert c["diff"] == pytest.approx(diff, abs=1e-12) and c["se"] == pytest.approx(se, rel=1e-9)
    assert c["separated"] == (abs(diff) > z * se)
  assert data["summary"]["gap"] == pytest.approx(base["eval_ce_mean"] - data["summary"]["teacher_eval_ce"])


def test_committed_quality_report_adds_up():
  """The committed benchmarks/results/quality.json: means, errors and gains follow from its per-seed values."""
  data = json.loads(report.QUALITY.read_text())
  check_quality_arithmetic(data)
  assert data["commit"] and not data["commit"].endswith("+dirty")
  assert {"ce_only", "kd_dense", "copy_then_kd", "lti_then_kd", "lti_attn_then_kd"} <= {r["slug"] for r in data["rows"]}


def test_matched_steps_against_a_brute_force_search():
  for steps, fraction, seq_len, new in [(20, 1.0, 256, 64), (20, 0.5, 256, 64), (8, 1.0, 128, 32), (8, 0.5, 128, 32),
                                        (7, 0.3, 100, 30), (5, 0.0, 64, 16), (3, 1.0, 10, 10)]:
    f = Fraction(repr(fraction))  # step m generated iff floor((m + 1) f) > floor(m f): the trainer's choice
    scored = [0]
    for m in range(4 * steps * seq_len // min(seq_len, new)):
      scored.append(scored[-1] + (new if math.floor((m + 1) * f) > math.floor(m * f) else seq_len))
    assert quality.scored_positions(steps, fraction, seq_len, new) == scored[steps]
    want = min(range(1, len(scored)), key=lambda n: (abs(scored[n] - steps * seq_len), n))
    assert quality.matched_steps(steps, fraction, seq_len, new) == want, (steps, fraction, seq_len, new)
  assert quality.matched_steps(20, 1.0, 256, 64) == 80 and quality.matched_steps(20, 0.0, 256, 64) == 20


def test_scored_tokens_count_corpus_positions_and_generated_tokens_per_interval():
  rows = [{"step": 4, "onpolicy/steps_fraction": 0.5, "onpolicy/sample_length": 10.0},
          {"step": 8, "onpolicy/steps_fraction": 0.5, "onpolicy/sample_length": 12.5},
          {"step": 9, "onpolicy/steps_fraction": 0.0}]  # an interval of one corpus step: no sample length
  batch, seq_len = 8, 128
  want = (2 * batch * seq_len + 2 * batch * 10.0) + (2 * batch * seq_len + 2 * batch * 12.5) + batch * seq_len
  assert quality.scored_tokens(rows, batch, seq_len) == pytest.approx(want)


def test_on_policy_rows_appear_with_the_losses_they_need():
  rows = {r.slug: r for r in quality.ROWS}
  for slug, mode in (("on_policy_rkl", "reverse_kl"), ("on_policy_gkd", "gkd"), ("on_policy_mix", "reverse_kl")):
    assert rows[slug].available() == (mode in quality._kd_modes()) and rows[slug].default
  ctx = quality.Context(quality.QUICK, None, None, None, address="127.0.0.1:1")
  mix = rows["on_policy_mix"].overrides(ctx)
  assert "loss.on_policy_fraction=0.5" in mix and rows["on_policy_mix"].on_policy == 0.5
  assert f"generation.max_new_tokens={quality.QUICK.new_tokens}" in mix and "loss.alpha=1.0" in mix
  assert mix.index("loss.alpha=1.0") > mix.index(f"loss.alpha={quality.QUICK.alpha}")  # the later option wins
  assert rows["on_policy_tail"].available() and not rows["on_policy_tail"].default


def test_reverse_kl_sum_against_numpy():
  rng = np.random.default_rng(0)
  lp_s = rng.normal(size=(2, 5, 7))
  lp_t = rng.normal(size=(2, 5, 7)) * 2
  lp_s -= np.log(np.exp(lp_s).sum(-1, keepdims=True))
  lp_t -= np.log(np.exp(lp_t).sum(-1, keepdims=True))
  mask = (rng.random((2, 5)) < 0.6).astype(np.float32)
  want = 0.0
  for b in range(2):
    for t in range(5):
      if mask[b, t]:
        want += sum(math.exp(lp_s[b, t, v]) * (lp_s[b, t, v] - lp_t[b, t, v]) for v in range(7))
  got = float(quality.reverse_kl_sum(np.float32(lp_s), np.float32(lp_t), mask))
  assert got == pytest.approx(want, rel=1e-5) and want > 0
  assert float(quality.reverse_kl_sum(np.float32(lp_s), np.float32(lp_s), mask)) == pytest.approx(0.0, abs=1e-6)


def test_render_quality_rows_shows_each_rows_seed_spread():
  rows = [_row("ce_only", [5.0, 5.1, 5.2]), _row("tail", [4.6, 4.7, 4.9])]
  for r in rows:
    r["seeds"] = [0, 1, 2]
    r["eval_rkl"] = [0.4, 0.5, 0.9]
  rows[1].update(on_policy_fraction=0.0, steps=8, scored_tokens=[8192.0] * 3)
  summary = quality.summarise(rows, teacher_ce=4.0)
  data = {"rows": rows, "summary": summary, "command": "python -m benchmarks.quality", "commit": "abc",
          "date": "2026-12-01T00:00:00+00:00", "machine": {"cpu": "C", "cores": 2},
          "setup": {"new_tokens": 32, "prompt_len": [8, 32], "student_steps": 8, "batch": 8, "seq_len": 128,
                    "rkl_prompts": 8}}
  out = report.render_text("<!-- quality:tail,on_policy_rkl -->\n<!-- /quality -->\n", {}, data, {})
  se = statistics.stdev([0.4, 0.5, 0.9]) / math.sqrt(3)
  assert f"| tail | 3 | 8,192 | 4.733 ± {statistics.stdev([4.6, 4.7, 4.9]) / math.sqrt(3):.3f} | 4.600 - 4.900 | " \
         f"0.600 ± {report.fmt(se)} | 0.400 - 0.900 |" in out
  assert "Not in the measured report yet: `on_policy_rkl`" in out and "| ce_only |" not in out
  assert report.render_text(out, {}, data, {}) == out  # idempotent


# -- ratios over interleaved rounds -----------------------------------------------------------------

def test_interleaved_alternates_the_measurements_round_by_round():
  from benchmarks.common import interleaved
  calls = []
  counter = iter(range(100))
  out = interleaved({"a": lambda: calls.append("a") or next(counter),
                     "b": lambda: calls.append("b") or next(counter)}, 3)
  assert calls == ["a", "b", "a", "b", "a", "b"]
  assert out == {"a": [0.0, 2.0, 4.0], "b": [1.0, 3.0, 5.0]}
  with pytest.raises(ValueError, match="rounds must be at least 1"):
    interleaved({"a": lambda: 1.0}, 0)


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
  from benchmarks.common import paired_ratio
  # a machine that slows down between rounds: each round's pair shares its slowdown
  engine, served = [100.0, 50.0, 80.0, 40.0], [90.0, 46.0, 76.0, 34.0]
  ratio = paired_ratio(served, engine, limit=1.0, why="x")
  expected = sorted(s / e for s, e in zip(served, engine))
  assert ratio.value == pytest.approx((expected[1] + expected[2]) / 2)  # NumPy-free median of 4
  assert (ratio.low, ratio.high, ratio.rounds, ratio.note) == (pytest.approx(expected[0]),
                                                              pytest.approx(expected[-1]), 4, None)
  assert ratio.value != pytest.approx(sum(served) / sum(engine))  # not the ratio of the means


def test_a_ratio_above_its_limit_is_always_noted():
  from benchmarks.common import paired_ratio
  noisy = paired_ratio([1.12, 0.95, 1.05], [1.0, 1.0, 1.0], limit=1.0, why="the server runs the same engine")
  assert noisy.value == pytest.approx(1.05) and noisy.low == pytest.approx(0.95)
  assert "above the physical limit 1.0 (the server runs the same engine), within the rounds' spread" in noisy.note
  every = paired_ratio([1.1, 1.2], [1.0, 1.0], limit=1.0, why="w")
  assert every.value == pytest.approx(1.15)
  assert "every round (1.1 to 1.2 over 2 rounds) are above the physical limit 1.0 (w): not a gain" in every.note
  assert paired_ratio([0.9, 1.05, 0.95], [1.0, 1.0, 1.0], limit=1.0).note is None  # median 0.95: below the limit
  with pytest.raises(ValueError, match="above its physical limit 1.0 and no note says why"):
    results.Ratio(value=1.1, low=1.0, high=1.2, rounds=3, limit=1.0)
  with pytest.raises(ValueError, match="paired rounds needed"):
    paired_ratio([1.0], [1.0, 2.0])
  assert paired_ratio([3.0], [1.0]).value == 3.0  # no limit: any value


def test_record_stores_a_ratios_spread_and_note(tmp_path, monkeypatch):
  path = tmp_path / "latest.json"
  monkeypatch.setenv(results.ENV_PATH, str(path))
  ratio = results.Ratio(value=1.02, low=0.97, high=1.08, rounds=5, limit=1.0, note="within noise")
  results.record({"r": (ratio, "ratio"), "plain": (2.0, "ratio")}, command="python -m x")
  data = json.loads(path.read_text())
  assert {k: data["r"][k] for k in ("value", "low", "high", "rounds", "limit", "note")} == {
      "value": 1.02, "low": 0.97, "high": 1.08, "rounds": 5, "limit": 1.0, "note": "within noise"}
  assert "rounds" not in data["plain"]
  machine = {"cpu": "C", "cores": 2, "accelerator": None}
  res = {key: {**entry, "date": "2026-12-01T00:00:00+00:00", "machine": machine} for key, entry in data.items()}
  out = report.render_text("<!-- results:r,plain -->\n<!-- /results -->\n", res, None, {"r": "def"})
  assert "| `r` | 1.02 (median of 5 interleaved rounds, 0.970 to 1.08) | ratio | def |" in out
  assert "\n`r`: within noise.  \n" in out
  assert "| `plain` | 2.00 | ratio |" in out


def test_recording_the_committed_file_re_renders_the_tables(tmp_path, monkeypatch):
  rendered = []
  monkeypatch.setattr(report, "main", lambda argv=None: rendered.append(argv) or 0)
  monkeypatch.setattr(results, "LATEST", tmp_path / "latest.json")
  monkeypatch.delenv(results.ENV_PATH, raising=False)
  results.record({"a": (1.0, "ratio")}, command="x")
  assert rendered == [[]]
  results.record({"a": (1.0, "ratio")}, command="x", path=tmp_path / "other.json")
  assert rendered == [[]]  # a trial file renders nothing
