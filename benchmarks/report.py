"""Renders the benchmark results into the Markdown tables of the README and docs.

    python -m benchmarks.report            # rewrite every marked table from the results files
    python -m benchmarks.report --check    # exit 1 (and name the file) where a table is stale

A table is a block between two marker comments:

    <!-- results:serving_efficiency,wire_bytes_per_token_k64 -->
    ...generated, never edited...
    <!-- /results -->

`results:KEYS` renders those keys of `benchmarks/results/latest.json` (value,
unit, for ratios over interleaved rounds the median with the lowest and highest
round and any note, and the command, commit, date and machine that measured
them), with the
definition of each key taken from `benchmarks/README.md`. `quality` renders
`benchmarks/results/quality.json` (written by `python -m benchmarks.quality`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from benchmarks.results import LATEST, RESULTS_DIR

REPO = RESULTS_DIR.parent.parent
QUALITY = RESULTS_DIR / "quality.json"
DEFINITIONS = REPO / "benchmarks" / "README.md"
MARKER = re.compile(r"(<!-- (results:[\w,\s]+|quality) -->\n)(.*?)(<!-- /(?:results|quality) -->)", re.S)


def documents(repo: Path = REPO) -> list[Path]:
  """The Markdown files that may hold rendered tables."""
  return [repo / "README.md", *sorted((repo / "docs").glob("*.md")), repo / "deploy" / "README.md"]


def definitions(path: Path = DEFINITIONS) -> dict[str, str]:
  """key -> definition, from the `| key | unit | definition | benchmark |` table of benchmarks/README.md."""
  out = {}
  if path.exists():
    for line in path.read_text().splitlines():
      cells = [c.strip() for c in line.strip().strip("|").split("|")]
      if len(cells) >= 3 and cells[0].startswith("`") and cells[0].endswith("`"):
        out[cells[0].strip("`")] = cells[2]
  return out


def fmt(value: float, unit: str = "") -> str:
  """A figure to about three significant digits, thousands separated."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "n/a"
  if unit == "fraction":
    return f"{100 * value:.1f} %"
  magnitude = abs(value)
  if magnitude >= 1000:
    return f"{value:,.0f}"
  if magnitude >= 100:
    return f"{value:.0f}"
  if magnitude >= 10:
    return f"{value:.1f}"
  if magnitude >= 1:
    return f"{value:.2f}"
  return f"{value:.3f}"


def value_text(entry: dict) -> str:
  """The value cell: the figure, and for a ratio over interleaved rounds its median with the range of rounds."""
  text = fmt(entry["value"], entry["unit"])
  if "rounds" in entry:
    text += (f" (median of {entry['rounds']} interleaved rounds, {fmt(entry['low'], entry['unit'])} to "
             f"{fmt(entry['high'], entry['unit'])})")
  return text


def machine_text(machine: dict) -> str:
  text = f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"
  return text + (f", {machine['accelerator']}" if machine.get("accelerator") else ", no accelerator")


def render_results(keys: list[str], results: dict[str, dict], defs: dict[str, str]) -> str:
  rows = ["| figure | value | unit | definition |", "|---|---|---|---|"]
  sources: dict[str, list[str]] = {}
  notes: list[str] = []
  for key in keys:
    entry = results.get(key)
    if entry is None:
      rows.append(f"| `{key}` | not measured | | {defs.get(key, '')} |")
      continue
    rows.append(f"| `{key}` | {value_text(entry)} | {entry['unit']} | {defs.get(key, '')} |")
    if entry.get("note"):
      notes.append(f"`{key}`: {entry['note']}.  ")
    source = (f"`{entry['command']}` at commit `{entry.get('commit') or '?'}` on {entry['date'][:10]} "
              f"({machine_text(entry.get('machine', {}))})")
    sources.setdefault(source, []).append(key)
  lines = rows + [""] + notes
  for source, measured in sources.items():
    lines.append(f"Measured by {source}.  ")
  return "\n".join(lines).rstrip(" ") + "\n"


def render_quality(quality: dict | None) -> str:
  if not quality:
    return "Not measured yet: run `python -m benchmarks.quality`.\n"
  budget = quality["setup"]
  lines = [f"Student `{budget['student']}`, {budget['student_tokens']:,} training tokens per student, "
           f"{len(budget['seeds'])} seeds; teacher `{budget['teacher']}` trained on {budget['teacher_tokens']:,} "
           f"tokens. Held-out CE on {budget['eval_tokens']:,} tokens.", "",
           "| run | held-out CE (mean) | seed spread (max - min) | KD to teacher | dense-KD gain recovered | vs CE only |",
           "|---|---|---|---|---|---|"]
  for row in quality["rows"]:
    recovered = row.get("gain_recovered")
    lines.append(f"| {row['label']} | {row['eval_ce_mean']:.3f} | {row['eval_ce_spread']:.3f} | "
                 f"{fmt(row.get('eval_kd_mean'))} | "
                 f"{'' if recovered is None else f'{100 * recovered:.0f} %'} | {row['verdict']} |")
  wire = quality.get("wire") or {}
  if "sampled_n" in wire:
    lines += ["", f"The sampled row draws N = {wire['sampled_n']} samples per position beside an exact top-8: "
              f"{wire['sampled_bytes_per_token']:.0f} answer bytes per token on the wire, next to "
              f"{wire['topk_bytes_per_token']:.0f} for the top-64 rows (both measured on the server)."]
  summary = quality["summary"]
  lines += ["", f"Teacher held-out CE {summary['teacher_eval_ce']:.3f}; CE-only student "
            f"{summary['ce_only_eval_ce']:.3f}; teacher-to-CE-only gap {summary['gap']:.3f} = "
            f"{summary['gap_over_spread']:.1f}x the largest seed spread ({summary['max_spread']:.3f}). "
            f"Spread = max - min over seeds; a difference no larger than the larger of two rows' spreads is "
            f"within noise."]
  pairs = summary.get("pairs_within_spread") or []
  if pairs:
    lines += ["", "Within the seed spread of each other (not distinguished by this report): "
              + "; ".join(f"{a} vs {b}" for a, b in pairs) + "."]
  lines += ["", f"Measured by `{quality['command']}` at commit `{quality.get('commit') or '?'}` on "
            f"{quality['date'][:10]} ({machine_text(quality.get('machine', {}))}); that invocation took "
            f"{quality['seconds'] / 60:.0f} min, reusing the runs an earlier one had finished."]
  return "\n".join(lines) + "\n"


def render_text(text: str, results: dict, quality: dict | None, defs: dict[str, str]) -> str:
  def block(match: re.Match) -> str:
    head, kind, _, tail = match.groups()
    if kind == "quality":
      body = render_quality(quality)
    else:
      keys = [k.strip() for k in kind.split(":", 1)[1].split(",") if k.strip()]
      body = render_results(keys, results, defs)
    return head + body + tail
  return MARKER.sub(block, text)


def load_all() -> tuple[dict, dict | None, dict[str, str]]:
  results = json.loads(LATEST.read_text()) if LATEST.exists() else {}
  quality = json.loads(QUALITY.read_text()) if QUALITY.exists() else None
  return results, quality, definitions()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--check", action="store_true", help="Change nothing; exit 1 if any table is stale.")
  args = parser.parse_args(argv)
  results, quality, defs = load_all()
  stale = []
  for path in documents():
    if not path.exists():
      continue
    text = path.read_text()
    rendered = render_text(text, results, quality, defs)
    if rendered != text:
      stale.append(path.relative_to(REPO))
      if not args.check:
        path.write_text(rendered)
  for path in stale:
    print(f"{'stale' if args.check else 'rendered'}: {path}")
  if args.check and stale:
    print("run `python -m benchmarks.report` to regenerate the tables", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
