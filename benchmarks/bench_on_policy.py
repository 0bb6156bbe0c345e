"""On-policy student throughput against off-policy KD on the same model, and the share of time spent generating.

    python -m benchmarks.bench_on_policy [--student demo_student] [--teacher demo_teacher] [--steps 30]

Both runs use the same student, data, batch shape, teacher (local, in this
process, so the ratio says nothing about a network) and KD loss, in one process:

- Off-policy: `tail` KD on corpus batches (`loss.on_policy_fraction=0`).
- On-policy: every step trains on the student's own continuations of corpus
  prefixes (`loss.on_policy_fraction=1`, staleness 1), scored by the same
  teacher with the same loss, so the difference between the two is generation.

Throughput is the trainer's own `perf/tokens_per_s` (positions of the batch,
B x T per step, whatever their loss mask), over the log intervals after the
first (which holds compilation). Both batches have the same shape, so
`on_policy_over_off_policy_tokens_per_s` (the headline) is the inverse ratio
of their step times. An on-policy batch carries loss only on its generated
tokens, a corpus batch on nearly every position: the ratio of loss-bearing
tokens per second (`on_policy_over_off_policy_loss_tokens_per_s`) counts, per
interval, the generated tokens (`onpolicy/sample_length` per row) on one side
and the corpus batches' loss-mask positions on the other.
`on_policy_generation_fraction` is the median of the on-policy run's
`perf/generation_fraction` (an upper bound of the device's share of wall time
spent sampling; docs/on_policy.md, "Metrics").

The two runs are interleaved over `--rounds` rounds (off, on, off, on, ...), so
a neighbour's load on a shared machine hits both sides of each ratio alike;
each ratio is the median of its rounds' ratios, recorded with the lowest and
highest round (benchmarks.common.paired_ratio). The figures are recorded in the
benchmark results file (benchmarks/results.py). `--data` defaults to
data/stdlib; it is prepared (`python -m distill_core.prepare`) when missing.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.bench_train import HelpFormatter, overrides
from benchmarks.common import interleaved, paired_ratio
from benchmarks.results import record
from distill_core.config import load_config
from distill_core.data import load_manifest, make_iterator
from distill_core.harness import ensure_corpus, read_metrics
from student_trainer.config import TrainConfig
from student_trainer.train import run

# The loss of both runs: the same KD on either side, so their difference is generation alone.
OFF_POLICY = ("loss.kd_mode=tail", "loss.on_policy_fraction=0")
ON_POLICY = ("loss.kd_mode=tail", "loss.on_policy_fraction=1", "generation.staleness=1")


def measured_rows(run_dir: Path, name: str) -> tuple[list[dict], int]:
  """The logged intervals of a run after the first (which holds compilation), and the step that one ended at."""
  rows = read_metrics(run_dir, "perf/tokens_per_s")
  if len(rows) < 2:
    raise SystemExit(f"{name}: too few steps for a measurement; raise --steps above twice --interval")
  return rows[1:], int(rows[0]["step"])


def interval_shares(rows: list[dict], first_step: int, share_of_step) -> list[float]:
  """Per logged interval, the mean of `share_of_step[s]` over the steps s it trained.

  An interval logged at step n follows the one logged at step p (`first_step` for the first of `rows`): it
  trained steps p .. n - 1.
  """
  out, previous = [], first_step
  for row in rows:
    step = int(row["step"])
    out.append(float(np.mean(share_of_step[previous:step])))
    previous = step
  return out


def loss_tokens_per_s(rows: list[dict], shares: list[float]) -> float:
  """Median over intervals of `perf/tokens_per_s` x the interval's share of positions that carry loss."""
  return statistics.median(r["perf/tokens_per_s"] * s for r, s in zip(rows, shares, strict=True))


def corpus_loss_shares(cfg: TrainConfig) -> np.ndarray:
  """Each training batch's share of positions with loss, for the `cfg.steps` batches an off-policy run draws."""
  data = make_iterator(cfg.data, "train")
  try:
    return np.asarray([float(np.mean(np.asarray(next(data).loss_mask))) for _ in range(cfg.steps)])
  finally:
    data.close()


def measure(cfg: TrainConfig, name: str, corpus_shares: np.ndarray | None) -> dict[str, float]:
  """Trains `cfg` afresh; its median tokens/s, loss-bearing tokens/s and (on-policy) generation fraction."""
  shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run: no checkpoint, no earlier round's metrics
  run(cfg)
  rows, first = measured_rows(Path(cfg.run_dir), name)
  out = {"tokens_per_s": statistics.median(r["perf/tokens_per_s"] for r in rows)}
  if corpus_shares is None:  # every step generated: loss on the sampled tokens of each row
    seq_len = load_manifest(cfg.data.path).seq_len
    shares = [r["onpolicy/sample_length"] / seq_len for r in rows]
    out["generation_fraction"] = statistics.median(r["perf/generation_fraction"] for r in rows)
  else:
    shares = interval_shares(rows, first, corpus_shares)
  out["loss_tokens_per_s"] = loss_tokens_per_s(rows, shares)
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
  parser.add_argument("--data", default="data/stdlib", help="Prepared dataset (prepared here when missing).")
  parser.add_argument("--student", default="demo_student", help="Student model preset (random weights).")
  parser.add_argument("--teacher", default="demo_teacher", help="Teacher model preset (random weights).")
  parser.add_argument("--batch-size", type=int, default=8, help="Global batch size.")
  parser.add_argument("--steps", type=int, default=30, help="Steps per run, the first interval included.")
  parser.add_argument("--interval", type=int, default=5, help="Steps per throughput sample.")
  parser.add_argument("--top-k", type=int, default=64, help="Teacher top-k of both runs.")
  parser.add_argument("--max-new-tokens", type=int, default=128, help="Generated tokens per row at most.")
  parser.add_argument("--prompt-min-len", type=int, default=32, help="Shortest corpus prefix of a prompt.")
  parser.add_argument("--prompt-max-len", type=int, default=128,
                      help="Longest prompt; with --max-new-tokens at most the corpus's sequence length.")
  parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds of the two runs.")
  args = parser.parse_args(argv)
  ensure_corpus(args.data)
  kd = ("teacher.source=local", f"teacher.local.model={args.teacher}", f"loss.top_k={args.top_k}")
  generation = (f"generation.max_new_tokens={args.max_new_tokens}",
                f"generation.prompts.min_len={args.prompt_min_len}",
                f"generation.prompts.max_len={args.prompt_max_len}")
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp)
    configs = {"off_policy": load_config(TrainConfig, None, overrides("off_policy", args.data, out, args, *kd,
                                                                      *OFF_POLICY)),
               "on_policy": load_config(TrainConfig, None, overrides("on_policy", args.data, out, args, *kd,
                                                                     *ON_POLICY, *generation))}
    shares = corpus_loss_shares(configs["off_policy"])
    figures: dict[str, list[dict]] = {name: [] for name in configs}

    def measurement(name: str):
      def once() -> float:
        figures[name].append(measure(configs[name], name, shares if name == "off_policy" else None))
        return figures[name][-1]["tokens_per_s"]
      return once

    rounds = interleaved({name: measurement(name) for name in configs}, args.rounds)
  off, on = (statistics.median(rounds[name]) for name in configs)
  speed = paired_ratio(rounds["on_policy"], rounds["off_policy"], limit=1.0,
                       why="the on-policy step scores and trains a batch of the same shape with the same loss, and "
                       "generates it")
  loss_speed = paired_ratio([f["loss_tokens_per_s"] for f in figures["on_policy"]],
                            [f["loss_tokens_per_s"] for f in figures["off_policy"]])
  generating = statistics.median(f["generation_fraction"] for f in figures["on_policy"])
  print(f"student {args.student}, teacher {args.teacher} (local), batch {args.batch_size}, k={args.top_k}, "
        f"{args.max_new_tokens} new tokens after prompts of {args.prompt_min_len}-{args.prompt_max_len}, "
        f"{args.rounds} interleaved rounds (medians; ratios: median of the rounds' ratios [lowest, highest])")
  print(f"off-policy (corpus)    : {off:10.0f} tokens/s")
  print(f"on-policy (generated)  : {on:10.0f} tokens/s   ratio {speed.value:.3f} [{speed.low:.3f}, {speed.high:.3f}]"
        f"; generating {100 * generating:.1f} % of wall time")
  print(f"loss-bearing tokens/s  : ratio {loss_speed.value:.3f} [{loss_speed.low:.3f}, {loss_speed.high:.3f}]")
  if speed.note:
    print(f"note: {speed.note}")
  record({"off_policy_tokens_per_s": (off, "tokens/s"), "on_policy_tokens_per_s": (on, "tokens/s"),
          "on_policy_over_off_policy_tokens_per_s": (speed, "ratio"),
          "on_policy_over_off_policy_loss_tokens_per_s": (loss_speed, "ratio"),
          "on_policy_generation_fraction": (generating, "fraction")})
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
