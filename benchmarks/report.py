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
`benchmarks/results/quality.json` (written by `python -m benchmarks.quality`);
`quality:SLUG,...` only those rows of it, each with its per-seed spread;
`quality_on_policy:SLUG,...` the same from `benchmarks/results/quality_on_policy.json`.
`scale` renders every program of `benchmarks/results/scale.json` (written by
`python -m benchmarks.bench_scale`): per-chip bytes on each TPU slice.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

from distill_core.memory import GIB, TPU_CHIPS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATEST = RESULTS_DIR / "latest.json"
REPO = RESULTS_DIR.parent.parent
QUALITY = RESULTS_DIR / "quality.json"
# The on-policy rows and their controls, trained by one `benchmarks.quality --results-name quality_on_policy` run.
QUALITY_ON_POLICY = RESULTS_DIR / "quality_on_policy.json"
SCALE = RESULTS_DIR / "scale.json"
DEFINITIONS = REPO / "benchmarks" / "README.md"
MARKER = re.compile(r"(<!-- (results:[\w,\s]+|quality(?:_on_policy)?(?::[\w,]+)?|scale) -->\n)(.*?)"
                    r"(<!-- /(?:results|quality|scale) -->)", re.S)


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


def mean_se_text(row: dict, name: str) -> str:
  """`mean ± SE` of a per-seed figure of a quality row; "n/a" where the report predates the figure."""
  if f"{name}_mean" not in row:
    return "n/a"
  return f"{fmt(row[f'{name}_mean'])} ± {fmt(row[f'{name}_se'])}"


def on_policy_setup(quality: dict) -> list[str]:
  """The sentence saying how on-policy rows were sized, where the report has any."""
  rows = [r for r in quality["rows"] if r.get("on_policy_fraction")]
  if not rows:
    return []
  budget = quality["setup"]
  steps = ", ".join(f"`{r['slug']}` {r['steps']}" for r in rows)
  return ["", f"On-policy rows train on the student's continuations (at most {budget['new_tokens']} new tokens "
          f"after a corpus prefix of {budget['prompt_len'][0]} to {budget['prompt_len'][1]}), without CE, for the "
          f"teacher-scored tokens of {budget['student_steps']} corpus batches of {budget['batch']} x "
          f"{budget['seq_len']} positions (a teacher-scored token: a position whose teacher answer a loss reads; "
          f"of a generated row, its generated tokens): steps {steps}. *Own-sample reverse KL*: KL(student || "
          f"teacher) per generated token of each model's own continuations of the same {budget['rkl_prompts']} "
          f"held-out prefixes (temperature 1, the same keys for every model), exact over the vocabulary."]


def render_quality_rows(quality: dict | None, slugs: list[str], command: str = "python -m benchmarks.quality") -> str:
  """The rows `slugs` of a quality report with each figure's mean, standard error and per-seed range."""
  if not quality:
    return f"Not measured yet: run `{command}`.\n"
  by = {r["slug"]: r for r in quality["rows"]}
  lines = ["| run | seeds | teacher-scored tokens (mean) | held-out CE (mean ± SE) | min - max | "
           "own-sample reverse KL (mean ± SE) | min - max | vs CE only |", "|---|---|---|---|---|---|---|---|"]
  missing = []
  for slug in slugs:
    row = by.get(slug)
    if row is None:
      missing.append(f"`{slug}`")
      continue
    rkl = row.get("eval_rkl")
    scored = row.get("scored_tokens")
    lines.append(f"| {row['label']} | {len(row['seeds'])} | {fmt(sum(scored) / len(scored)) if scored else 'n/a'} | "
                 f"{row['eval_ce_mean']:.3f} ± {row['eval_ce_se']:.3f} | {row['eval_ce_min']:.3f} - "
                 f"{row['eval_ce_max']:.3f} | {mean_se_text(row, 'eval_rkl')} | "
                 f"{f'{fmt(min(rkl))} - {fmt(max(rkl))}' if rkl else 'n/a'} | {row['verdict']} |")
  if missing:
    lines += ["", f"Not in the measured report yet: {', '.join(missing)} (the trainer did not offer them when it "
              f"ran, or --rows left them out)."]
  lines += on_policy_setup(quality)
  lines += ["", f"From `{quality['command']}` at commit `{quality.get('commit') or '?'}` on {quality['date'][:10]} "
            f"({machine_text(quality.get('machine', {}))}); ± is the standard error of the mean over seeds."]
  return "\n".join(lines) + "\n"


def render_quality(quality: dict | None) -> str:
  if not quality:
    return "Not measured yet: run `python -m benchmarks.quality`.\n"
  budget = quality["setup"]
  summary = quality["summary"]
  seeds = len(budget["seeds"])
  lines = [f"Student `{budget['student']}`, {budget['student_steps']} steps = {budget['student_tokens']:,} training "
           f"tokens per student (two-phase rows: {budget['first_steps']} + {budget['student_steps'] - budget['first_steps']}"
           f" steps, each phase with its own warm-up and cosine schedule), {seeds} seeds (each its own initialisation "
           f"and data order); teacher `{budget['teacher']}` trained on {budget['teacher_tokens']:,} tokens. Held-out "
           f"CE on {budget['eval_tokens']:,} tokens; ± is the standard error of the mean over seeds.", "",
           "| run | held-out CE (mean ± SE) | min - max | KD to teacher | own-sample reverse KL | "
           "dense-KD gain recovered | vs CE only |", "|---|---|---|---|---|---|---|"]
  for row in quality["rows"]:
    recovered = row.get("gain_recovered")
    lines.append(f"| {row['label']} | {row['eval_ce_mean']:.3f} ± {row['eval_ce_se']:.3f} | "
                 f"{row['eval_ce_min']:.3f} - {row['eval_ce_max']:.3f} | {fmt(row.get('eval_kd_mean'))} | "
                 f"{mean_se_text(row, 'eval_rkl')} | "
                 f"{'' if recovered is None else f'{100 * recovered:.0f} %'} | {row['verdict']} |")
  wire = quality.get("wire") or {}
  if "sampled_n" in wire:
    lines += ["", f"The sampled row draws N = {wire['sampled_n']} samples per position beside an exact top-8: "
              f"{wire['sampled_bytes_per_token']:.0f} answer bytes per token on the wire, next to "
              f"{wire['topk_bytes_per_token']:.0f} for the top-64 rows (both measured on the server)."]
  lines += on_policy_setup(quality)
  z = summary["z"]
  lines += ["", f"Teacher held-out CE {summary['teacher_eval_ce']:.3f}; CE-only student "
            f"{summary['ce_only_eval_ce']:.3f}; teacher-to-CE-only gap {summary['gap']:.3f} = "
            f"{summary['gap_over_max_se']:.1f}x the largest standard error ({summary['max_se']:.3f}). Two means are "
            f"*separated* when their difference exceeds {z:g} standard errors of the difference.",
            "", "| comparison | difference in held-out CE | separated? |", "|---|---|---|"]
  for c in summary["comparisons"]:
    if c["separated"]:
      verdict = "yes"
    elif c["seeds_needed"]:
      verdict = f"no; about {c['seeds_needed']} seeds per row would separate it at this step count"
    else:
      verdict = "no"
    lines.append(f"| {c['what']} (`{c['row']}` - `{c['ref']}`) | {c['diff']:+.3f} ± {c['se']:.3f} | {verdict} |")
  if summary["not_separated"]:
    lines += ["", f"This budget cannot tell apart the comparisons marked *no*. The seeds that would are computed "
              f"from the measured difference and per-seed scatter (the standard error falls as 1/sqrt(seeds)), "
              f"assuming both stay as measured at {budget['student_steps']} steps."]
  lines += ["", f"Measured by `{quality['command']}` at commit `{quality.get('commit') or '?'}` on "
            f"{quality['date'][:10]} ({machine_text(quality.get('machine', {}))}); runs are reused only when trained "
            f"by the same code (digest `{quality.get('code_digest', '?')}`); that invocation took "
            f"{quality['seconds'] / 60:.0f} min, reusing the runs an earlier one had finished."]
  return "\n".join(lines) + "\n"


def render_scale(scale: dict | None) -> str:
  """One row per compiled program: per-chip bytes against the chip's HBM, and FLOPs against the model's."""
  if not scale:
    return "Not measured yet: run `python -m benchmarks.bench_scale`.\n"
  lines = ["| program | slice | mesh | arguments GiB | temporaries GiB | total GiB | chip HBM GiB | fits | "
           "compiled / model FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
  for r in scale["rows"]:
    refused = " (compiler refused: temporaries from its message)" if r.get("refused") else ""
    ratio = "n/a" if r["flops_ratio"] != r["flops_ratio"] else f"{r['flops_ratio']:.3f}"
    lines.append(f"| {r['side']} `{r['preset']}` {r['program']} | {r['topology']} ({r['chips']} chips) | "
                 f"{r['mesh']} | {r['argument_gib']:.2f} | {r['temp_gib']:.2f} | {r['total_gib']:.2f} | "
                 f"{r['hbm_gib']:.0f} | {'yes' if r['fits'] else 'no' + refused} | "
                 f"{ratio}{'' if r['flops_exact'] else ' *'} |")
  if scale.get("skipped_fields"):
    lines += ["", "Options this code does not have yet (skipped): "
              + ", ".join(f"`{f}`" for f in scale["skipped_fields"]) + "."]
  lines += ["", "| chip | HBM per chip GiB | bf16 peak per chip TFLOP/s |", "|---|---|---|"]
  lines += [f"| {c.name} | {c.hbm_bytes / GIB:.0f} | {c.peak_bf16_flops / 1e12:.0f} |" for c in TPU_CHIPS.values()]
  lines += ["", f"Measured by `{scale['command']}` at commit `{scale.get('commit') or '?'}` on "
            f"{scale['date'][:10]} ({machine_text(scale.get('machine', {}))}), compile only."]
  return "\n".join(lines) + "\n"


def load_quality_on_policy() -> dict | None:
  return json.loads(QUALITY_ON_POLICY.read_text()) if QUALITY_ON_POLICY.exists() else None


def load_scale() -> dict | None:
  return json.loads(SCALE.read_text()) if SCALE.exists() else None


def render_text(text: str, results: dict, quality: dict | None, defs: dict[str, str],
                scale: dict | None = None) -> str:
  def block(match: re.Match) -> str:
    head, kind, _, tail = match.groups()
    if kind == "quality":
      body = render_quality(quality)
    elif kind.startswith("quality:"):
      body = render_quality_rows(quality, [s.strip() for s in kind.split(":", 1)[1].split(",") if s.strip()])
    elif kind.startswith("quality_on_policy:"):
      slugs = [s.strip() for s in kind.split(":", 1)[1].split(",") if s.strip()]
      body = render_quality_rows(load_quality_on_policy(), slugs, "python -m benchmarks.quality --rows "
                                 f"{','.join(s for s in slugs if s != 'ce_only')} --results-name quality_on_policy")
    elif kind == "scale":
      body = render_scale(scale if scale is not None else load_scale())
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
