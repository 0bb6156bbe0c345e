"""Distillation quality report: held-out CE of students distilled in each mode, next to their baselines.

    python -m benchmarks.quality            # the README's report (about an hour on 2 shared CPU cores)
    python -m benchmarks.quality --quick    # the same rows at CI size

On the same prepared data (data/stdlib, prepared when missing) and the same
student architecture and token budget, it trains one student per row and seed:
CE only; `kd_dense` with the local teacher; `kd_sparse` `tail`, `renormalize`
and `topk` at k = 64 and `sampled` at the same answer bytes, through a teacher
server; and rows that start from the teacher, each with its control:
`copy_then_kd` (the demo LTI recipe's copies of embedding and norms, random
attention and MLPs), `lti_then_kd` (the whole recipe), `lti_attn_then_kd`
(learn-to-init of attention, no copies) and `blockwise_then_kd` (blockwise
after the same copies). These train a first phase as a run of its own, with
its own warm-up and cosine schedule, then tail KD for the rest of the same
budget with a second schedule. Offline shards (`offline_tail`, the losses of
`tail` by construction) are opt-in with --rows. The teacher is trained once
with cross-entropy on ten times a student's tokens (reused when present).

On-policy rows (`on_policy_rkl`: reverse KL on the student's samples,
`on_policy_gkd`: GKD at beta = 0.5, `on_policy_mix`: half the steps on-policy
reverse KL, half corpus batches) train on the student's own continuations of
corpus prefixes, scored by the same server, and appear once the trainer offers
their losses (`on_policy_tail`, tail KD on the student's samples, is opt-in).
They train without cross-entropy (alpha = 1): CE on its own samples would only
reinforce them. They are compared at the same number of teacher-scored tokens:
positions whose teacher answer a loss reads, B x T per corpus batch and the
generated positions of a generated batch, at most B x `new_tokens`. An
on-policy row trains the step count whose planned scored positions come
closest to the off-policy rows' (`matched_steps`; e.g. T / `new_tokens` times
as many steps with every step generated); what its rows actually generated
(shorter when they stop) is recorded per seed (`scored_tokens`).

Each seed sets a student's initialisation and its data order. Every student,
and the teacher, is then evaluated the same way, in this process, on the same
held-out tokens: CE on the next token, and the dense KL(teacher || student) at
T = 1 ("KD to teacher"); and on its own continuations of the same held-out
prompts (`sample_batches` x B prefixes, `new_tokens` new tokens at temperature
1, the same keys for every model), the exact reverse KL(student || teacher) of
each generated position from both models' dense logits, the mean over the
generated tokens: what on-policy methods optimise. The report gives mean and standard error over seeds,
the fraction of the dense-KD gain over CE-only that each row recovers, each
row's difference to CE-only, and the differences between modes that matter
(sparse modes vs dense KD and each other; each teacher-started row vs its
control), each with its standard error, whether it is separated (beyond Z
standard errors), and if not, about how many seeds per row would separate it
at the same step count. It writes benchmarks/results/quality.json and a PNG of
the held-out CE curves (benchmarks/results/quality.png), which
`python -m benchmarks.report` renders into the README.

Finished runs are reused when the settings they were trained with, the
teacher's weights and the code that trained them (a digest of the trainer,
server and shared sources and the YAML configs the runs read) all match, so
an interrupted report continues where it stopped and a new row trains only
that row. Every stage runs the project's own command line, printed before it
runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, get_args

import grpc
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.results import RESULTS_DIR, git_commit, invocation, machine
from distill_core import harness, wire
from distill_core.checkpoints import load_model
from distill_core.config import load_yaml
from distill_core.data import DataConfig, load_manifest, make_eval_iterator
from distill_core.harness import code_digest, dir_digest, read_metrics
from distill_core.parts.samples import SampleRequest
from distill_core.proto import teacher_pb2_grpc
from distill_core.wire import OutputSpec
from distill_core.generation import GenerationConfig, PromptConfig, generate_batch, make_prompt_set
from student_trainer.losses import KDMode, LossConfig
from student_trainer.sources import source_kind

REPO = RESULTS_DIR.parent.parent
PY = sys.executable


@dataclasses.dataclass(frozen=True)
class Budget:
  teacher_steps: int
  student_steps: int
  seeds: tuple[int, ...]  # each seed sets the student's initialisation and its data order (data.seed)
  eval_every: int
  eval_batches: int  # held-out batches of the final, uniform evaluation
  batch: int = 8
  top_k: int = 64
  alpha: float = 0.7
  temperature: float = 1.0
  first_fraction: float = 0.3  # share of a two-phase row's steps that its first phase takes
  student: str = "demo_student"
  teacher: str = "demo_teacher"
  data: str = "data/stdlib"
  prepare: tuple[str, ...] = ()  # `python -m distill_core.prepare` options of `data`
  # Generation, for the on-policy rows' training and for every row's reverse KL of its own samples: at most
  # `new_tokens` after a held-out (training: corpus) prefix of `prompt_len` tokens, at temperature 1, top-p 1.
  new_tokens: int = 64
  prompt_len: tuple[int, int] = (16, 64)
  sample_batches: int = 4  # held-out prompt batches whose continuations the reverse-KL column scores


# Sized so that the teacher and every row x seed train within about an hour on 2 CPU cores shared with
# other work. What this budget can and cannot tell apart the report computes itself (`compare`).
DEFAULT = Budget(teacher_steps=200, student_steps=20, seeds=(0, 1, 2), eval_every=5, eval_batches=16)
# A corpus of 40 files, so that the offline row's dump of every example takes seconds.
QUICK = Budget(teacher_steps=40, student_steps=8, seeds=(0, 1, 2), eval_every=4, eval_batches=2,
               data="data/quality_quick", prepare=("max_files=40", "seq_len=128", "eval_fraction=0.15"),
               new_tokens=32, prompt_len=(8, 32), sample_batches=1)
# Separation criterion: two means differ when their difference exceeds Z standard errors of the difference.
Z = 2.0


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the report: how a student of this row is trained.

  `overrides` gives the trainer options of the run. A row with a first phase
  (`first_phase`) trains that phase for `Budget.first_fraction` of the steps as
  a run of its own (its own warm-up and cosine schedule), then continues for
  the rest of the budget with `overrides` (a second schedule), starting from
  the first phase's exported student: the same token budget as every other row.
  `default`: part of the report unless --rows names it. `on_policy`: the share of its steps that train on
  the student's own samples (`loss.on_policy_fraction`); such a row trains the steps that give it the teacher-
  scored tokens of the off-policy rows (`matched_steps`).
  """
  slug: str
  label: str
  needs: tuple[str, ...]  # "remote": the teacher server; "dump": the teacher's answers on disk
  overrides: Callable[["Context"], list[str]]
  available: Callable[[], bool] = lambda: True
  first_phase: Callable[["Context"], list[str]] | None = None
  default: bool = True
  on_policy: float = 0.0


@dataclasses.dataclass
class Context:
  budget: Budget
  data: Path
  out: Path
  teacher_hf: Path
  address: str | None = None
  wire: dict = dataclasses.field(default_factory=dict)  # measured answer bytes per token, see choose_samples

  @property
  def answers(self) -> Path:
    """The teacher's answers dumped for the offline row."""
    return self.out / "answers"


def first_steps(budget: Budget) -> int:
  """Steps of a two-phase row's first phase."""
  return max(1, round(budget.first_fraction * budget.student_steps))


def warmup(steps: int) -> int:
  """Warm-up steps of a run (or phase) of `steps` steps: its first tenth, at least one."""
  return max(1, math.ceil(steps / 10))


def _kd(ctx: Context) -> list[str]:
  b = ctx.budget
  return [f"loss.top_k={b.top_k}", f"loss.alpha={b.alpha}", f"loss.temperature={b.temperature}"]


def _remote(ctx: Context) -> list[str]:
  return ["teacher.source=remote", f"teacher.remote.address={ctx.address}", "teacher.remote.window=4"]


def _local(ctx: Context) -> list[str]:
  return ["teacher.source=local", f"teacher.local.hf_checkpoint={ctx.teacher_hf}"]


def _kd_modes() -> tuple[str, ...]:
  return get_args(KDMode)


def _has_source(name: str) -> bool:
  try:
    source_kind(name)
  except ValueError:
    return False
  return True


def _has(config: str, field: str) -> bool:
  module, name = config.rsplit(".", 1)
  return field in getattr(importlib.import_module(module), name).model_fields


LTI_RECIPE = "configs/demo/lti.yaml"  # the demo's learn-to-init recipe: its maps, layer map and copy rules


def _recipe(ctx: Context, *options: str) -> list[str]:
  """The demo LTI recipe reading the teacher's checkpoint, with `options`, trained with tail KD meanwhile."""
  return ["--config", LTI_RECIPE, "lti.kernels_from=hf", f"lti.kernels_path={ctx.teacher_hf}", *options,
          *_remote(ctx), *_kd(ctx), "loss.kd_mode=tail"]


def _recipe_layer_map() -> list[int]:
  return list(load_yaml(REPO / LTI_RECIPE)["lti"]["layer_map"])


def _tail(ctx: Context) -> list[str]:
  return _remote(ctx) + _kd(ctx) + ["loss.kd_mode=tail"]


def _generation(ctx: Context, fraction: float) -> list[str]:
  """An on-policy row's generation: `fraction` of its steps on the student's samples (staleness 1), drawn as
  the reverse-KL column draws them. alpha = 1: no cross-entropy on the student's own samples, which would only
  reinforce them (the on-policy objectives have none)."""
  b = ctx.budget
  return [f"loss.on_policy_fraction={fraction}", "loss.alpha=1.0", "generation.staleness=1",
          f"generation.max_new_tokens={b.new_tokens}", f"generation.prompts.min_len={b.prompt_len[0]}",
          f"generation.prompts.max_len={b.prompt_len[1]}", "generation.temperature=1.0", "generation.top_p=1.0"]


def _on_policy(fraction: float, *loss: str) -> Callable[[Context], list[str]]:
  """A row's options: the report's teacher server and KD settings, `loss`, and generation for `fraction`."""
  return lambda ctx: _remote(ctx) + _kd(ctx) + list(loss) + _generation(ctx, fraction)


ROWS: tuple[Row, ...] = (
    Row("ce_only", "CE only", (), lambda ctx: ["teacher.source=none"]),
    Row("kd_dense", "kd_dense, local teacher", (), lambda ctx: _local(ctx) + _kd(ctx) + ["loss.use_dense=true"]),
    Row("tail", "tail, k=64, remote", ("remote",), _tail),
    Row("renormalize", "renormalize, k=64, remote", ("remote",),
        lambda ctx: _remote(ctx) + _kd(ctx) + ["loss.kd_mode=renormalize"]),
    Row("topk", "topk, k=64, remote", ("remote",), lambda ctx: _remote(ctx) + _kd(ctx) + ["loss.kd_mode=topk"]),
    Row("sampled", "sampled, top-8 + N draws, remote (the bytes of k=64)", ("remote",),
        lambda ctx: _remote(ctx) + _kd(ctx) + ["loss.kd_mode=sampled", f"loss.top_k={SAMPLED_TOP_K}",
                                               f"loss.num_samples={ctx.wire['sampled_n']}",
                                               f"loss.sample_temperature={ctx.budget.temperature}"],
        available=lambda: "sampled" in _kd_modes()),
    # The same losses as `tail` by construction (tests/integration/test_offline*.py); opt-in, as the dump of every
    # example costs as much as several rows.
    Row("offline_tail", "tail, k=64, offline shards", ("dump",),
        lambda ctx: ["teacher.source=offline", f"teacher.offline.path={ctx.answers}", *_kd(ctx),
                     "loss.kd_mode=tail"], available=lambda: _has_source("offline"), default=False),
    # Two-phase rows: what starting from the teacher adds. `copy_then_kd` is the control of the other
    # three: the recipe's copies (embedding, norms) with random attention and MLPs, then the same KD.
    Row("copy_then_kd", "copy (embedding, norms), then tail KD", ("remote",), _tail,
        available=lambda: _has("student_trainer.config.TrainConfig", "copy_from_teacher"),
        first_phase=lambda ctx: _recipe(ctx, "lti.enabled=false")),
    Row("lti_then_kd", "LTI + copy, then tail KD", ("remote",), _tail,
        available=lambda: _has("student_trainer.config.TrainConfig", "copy_from_teacher"),
        first_phase=lambda ctx: _recipe(ctx)),
    Row("lti_attn_then_kd", "LTI of attention alone (no copy), then tail KD", ("remote",), _tail,
        available=lambda: _has("student_trainer.config.TrainConfig", "copy_from_teacher"),
        first_phase=lambda ctx: _recipe(ctx, "copy_from_teacher=[]")),
    Row("blockwise_then_kd", "copy + blockwise, then tail KD", ("remote",), _tail,
        available=lambda: _has("student_trainer.losses.LossConfig", "blockwise"),
        first_phase=lambda ctx: _recipe(ctx, "lti.enabled=false", "loss.blockwise=true",
                                        f"loss.layer_map={json.dumps(_recipe_layer_map())}")),
    # On-policy rows (docs/on_policy.md): the student's own continuations of corpus prefixes, scored by the
    # same teacher server, for as many teacher-scored tokens as the off-policy rows (`matched_steps`).
    Row("on_policy_rkl", "on-policy reverse KL (sampled-token estimator)", ("remote",),
        _on_policy(1.0, "loss.kd_mode=reverse_kl", "loss.reverse_kl_estimator=sampled"), on_policy=1.0,
        available=lambda: "reverse_kl" in _kd_modes()),
    Row("on_policy_gkd", "on-policy GKD, beta=0.5", ("remote",),
        _on_policy(1.0, "loss.kd_mode=gkd", "loss.gkd_beta=0.5"), on_policy=1.0,
        available=lambda: "gkd" in _kd_modes()),
    Row("on_policy_mix", "half on-policy reverse KL, half corpus tail", ("remote",),
        _on_policy(0.5, "loss.kd_mode=reverse_kl", "loss.reverse_kl_estimator=sampled"), on_policy=0.5,
        available=lambda: "reverse_kl" in _kd_modes()),
    # Forward KL (tail) on the student's own samples: GKD with beta = 0 in the forward-KL sense. Opt-in: it is
    # the on-policy pipeline with the loss of the `tail` row, not one of the on-policy objectives.
    Row("on_policy_tail", "on-policy tail (forward KL on own samples)", ("remote",),
        _on_policy(1.0, "loss.kd_mode=tail"), on_policy=1.0, default=False),
)
SAMPLED_TOP_K = 8  # exact ids of the sampled row; its draws cover the tail
MAX_SAMPLES = 128  # the server's limits.max_samples in this report
MAX_SCORED_IDS = 16  # the server's limits.max_scored_ids: the on-policy rows ask one id per position
# Every command shares one JAX compilation cache: the seeds of a row compile the same programs.
ENV_CACHE = "JAX_COMPILATION_CACHE_DIR"


def on_policy_steps(steps: int, fraction: float) -> int:
  """How many of a run's first `steps` steps train on generated batches (the trainer's own choice of steps)."""
  at = LossConfig(on_policy_fraction=fraction).on_policy_at
  return sum(at(m) for m in range(steps))


def scored_positions(steps: int, fraction: float, seq_len: int, new_tokens: int) -> int:
  """Teacher-scored positions per batch row over a run's first `steps` steps, as planned.

  A teacher-scored token is a position whose teacher answer a loss reads: every position of a corpus row
  (`seq_len`; the row's last position and document ends, whose targets are masked, are counted too, as the
  teacher scores them), and the generated positions of a generated row, at most `new_tokens` (its prompt is
  scored by the teacher but read by no loss). A row that stops early holds fewer; `scored_tokens` counts
  what a run actually generated.
  """
  on = on_policy_steps(steps, fraction)
  return (steps - on) * seq_len + on * new_tokens


def matched_steps(steps: int, fraction: float, seq_len: int, new_tokens: int) -> int:
  """The step count whose planned teacher-scored positions come closest to `steps` corpus batches' (the
  fewest steps on a tie): an on-policy row reads the teacher's answers at as many tokens as an off-policy one."""
  target = steps * seq_len
  at = LossConfig(on_policy_fraction=fraction).on_policy_at
  best, scored = (math.inf, 0), 0
  for n in range(1, math.ceil(target / min(seq_len, new_tokens)) + 2):  # beyond: more than the target, farther
    scored += new_tokens if at(n - 1) else seq_len  # = scored_positions(n, ...)
    best = min(best, (abs(scored - target), n))
  return best[1]


def row_steps(row: Row, budget: Budget, seq_len: int) -> int:
  """A row's training steps: the budget's, or for an on-policy row those of the same teacher-scored tokens."""
  if not row.on_policy:
    return budget.student_steps
  return matched_steps(budget.student_steps, row.on_policy, seq_len, budget.new_tokens)


def scored_tokens(metric_rows: list[dict], batch: int, seq_len: int) -> float:
  """Teacher-scored tokens a run trained on, from its logged intervals: `batch` x `seq_len` per corpus step,
  and per generated step the tokens its rows generated (`onpolicy/sample_length` per row).

  `metric_rows`: the run's JSONL rows that hold `onpolicy/steps_fraction` (every log interval of an on-policy
  run), in step order.
  """
  total, previous = 0.0, 0
  for r in metric_rows:
    steps = int(r["step"]) - previous
    previous = int(r["step"])
    on = round(r["onpolicy/steps_fraction"] * steps)
    total += (steps - on) * batch * seq_len + on * batch * r.get("onpolicy/sample_length", 0.0)
  return total


def _env() -> dict[str, str]:
  return {ENV_CACHE: os.environ.get(ENV_CACHE) or str(REPO / "runs" / "jax_cache")}


def common_overrides(budget: Budget, data: Path, run_dir: Path, steps: int, seed: int,
                     eval_every: int | None = None) -> list[str]:
  """Options of every run: its data (batches in the order `seed` draws), budget, schedule and logging."""
  return [f"run_dir={run_dir}", f"data.path={data}", f"data.batch_size={budget.batch}", f"data.seed={seed}",
          f"steps={steps}", f"seed={seed}", f"optim.warmup_steps={warmup(steps)}",
          f"eval.every_steps={eval_every or budget.eval_every}", "eval.batches=4",
          f"checkpoint.every_steps={steps}", "logging.every_steps=4", "logging.tensorboard=false"]


def train_teacher(ctx: Context, code: str) -> Path:
  """Pretrains the report's teacher with CE on 10x a student's tokens, once (reused when settings and code match)."""
  b = ctx.budget
  run_dir = ctx.out / "teacher"
  args = ["--config", harness.DEMO_TEACHER_CONFIG,
          *common_overrides(b, ctx.data, run_dir, b.teacher_steps, 0, eval_every=max(b.teacher_steps // 10, 1)),
          f"model={b.teacher}"]
  harness.train_or_reuse(run_dir, args, key={"code": code}, label=f"teacher ({b.teacher_steps} steps)",
                         log_path=run_dir / "train.log", env=_env())
  return run_dir / "hf"


def _run(run_dir: Path, overrides: list[str], key: dict, label: str) -> Path:
  """Trains one run unless a finished run with the same settings, teacher and code is there (settings or code
  changed, or the run died: it starts again from nothing); returns its directory."""
  harness.train_or_reuse(run_dir, overrides, key=key, label=label, log_path=run_dir / "train.log", env=_env())
  return run_dir


def train_student(ctx: Context, row: Row, seed: int, key: dict) -> list[tuple[Path, int]]:
  """Trains a row's student for one seed; returns its phases as (run directory, first step).

  `key`: what else a finished run must match to be reused (the teacher's digest, the code's).
  """
  b = ctx.budget
  steps = row_steps(row, b, seq_len(ctx.data))
  eval_every = max(1, round(b.eval_every * steps / b.student_steps))  # as many periodic evaluations as any row
  base = ctx.out / row.slug / f"seed{seed}"
  first = first_steps(b) if row.first_phase else 0
  phases = []
  init: list[str] = []
  if row.first_phase is not None:
    args = row.first_phase(ctx)
    config, rest = (args[:2], args[2:]) if args[:1] == ["--config"] else ([], args)
    run_dir = _run(base / "phase1", [*config, *common_overrides(b, ctx.data, base / "phase1", first, seed),
                                     f"model={b.student}", *rest], key, f"{row.slug} seed {seed} phase 1")
    phases.append((run_dir, 0))
    init = [f"init_hf_checkpoint={run_dir / 'hf'}"]
  run_dir = base / "phase2" if phases else base
  overrides = [*common_overrides(b, ctx.data, run_dir, steps - first, seed, eval_every), f"model={b.student}",
               *init, *row.overrides(ctx)]
  if phases:  # a first phase trained again means this one must be too
    key = {**key, "after": dir_digest(phases[0][0] / "hf")}
  phases.append((_run(run_dir, overrides, key, f"{row.slug} seed {seed}"), first))
  return phases


def dump_answers(ctx: Context) -> None:
  """The teacher's answers to the train and eval splits, once, for the offline row (reused when complete)."""
  b = ctx.budget
  manifest = ctx.answers / "manifest.json"
  if manifest.exists() and json.loads(manifest.read_text()).get("complete"):
    print(f"offline answers: reusing {ctx.answers}", flush=True)
    return  # an incomplete dump is resumed by the same command
  harness.run([PY, "-m", "teacher_server.dump", f"data={ctx.data}", f"output={ctx.answers}", f"k={b.top_k}",
      f"temperatures=[{b.temperature}]", "teacher.model.source=hf", f"teacher.model.path={ctx.teacher_hf}",
      f"teacher.tokenizer_path={ctx.data / 'tokenizer.json'}", f"teacher.limits.max_k={b.top_k}",
      "teacher.limits.selectable_layers=[]"], log_path=ctx.out / "dump.log", env=_env())


def curve(phases: list[tuple[Path, int]], tokens_at: Callable[[int], int]) -> list[tuple[int, float]]:
  """(tokens at that step, held-out CE) at every periodic evaluation of a run's phases; `tokens_at(step)`: the
  training (for on-policy rows, teacher-scored) tokens of the run's first `step` steps."""
  points = []
  for run_dir, first_step in phases:
    for row in read_metrics(run_dir):
      if "eval/ce_loss" in row:
        points.append((tokens_at(first_step + int(row["step"])), float(row["eval/ce_loss"])))
  return points


def generation_config(budget: Budget) -> GenerationConfig:
  """How the reverse-KL column samples: the budget's lengths, from held-out prefixes, temperature 1, top-p 1 (the
  student's own distribution), seed 0 at step 0 (the same keys for every model)."""
  return GenerationConfig(max_new_tokens=budget.new_tokens, temperature=1.0, top_p=1.0, seed=0,
                          prompts=PromptConfig(split="eval", min_len=budget.prompt_len[0],
                                               max_len=budget.prompt_len[1]))


@jax.jit
def reverse_kl_sum(lp_student: jax.Array, lp_teacher: jax.Array, mask: jax.Array) -> jax.Array:
  """sum over positions of mask x KL(student || teacher) = sum_v p_S(v) (log p_S(v) - log p_T(v)), from both
  models' log-probabilities (..., V) over the same vocabulary."""
  kl = (jnp.exp(lp_student) * (lp_student - lp_teacher)).sum(-1)
  return (kl * mask.astype(jnp.float32)).sum()


class Evaluator:
  """Held-out CE and KL(teacher || student) of HF checkpoints, on the same tokens for every model; and the
  reverse KL of each model's own continuations of the same held-out prompts to the teacher."""

  def __init__(self, data: Path, teacher_hf: Path, batches: int, batch_size: int,
               generation: GenerationConfig | None = None, sample_batches: int = 0):
    data_cfg = DataConfig(path=str(data), batch_size=batch_size)
    it = make_eval_iterator(data_cfg)
    self.batches = []
    for _ in range(batches):
      try:
        self.batches.append(next(it))
      except StopIteration:
        break
    it.close()
    if not self.batches:
      raise SystemExit(f"{data}: the eval split has no full batch of {batch_size}")
    self.tokens = int(sum(np.asarray(b.loss_mask).sum() for b in self.batches))
    self._load = load_model
    self.teacher = load_model(None, hf_checkpoint=str(teacher_hf))
    self.vocab = self.teacher.cfg.real_vocab_size

    def log_probs(model, b):
      out = model(b.tokens, b.positions, b.segment_ids)
      z = out.logits[..., :self.vocab].astype(jnp.float32)
      return jax.nn.log_softmax(z, axis=-1)

    self._log_probs = jax.jit(log_probs)
    self.teacher_log_probs = [self._log_probs(self.teacher, b) for b in self.batches]
    # The reverse-KL column's prompts: the first `sample_batches` x `batch_size` held-out records' prefixes.
    self.generation, self.prompts = generation, []
    if generation is not None and sample_batches:
      manifest = load_manifest(data)
      generation.check_fits(manifest.seq_len, where="the report's generation")
      self._seq_len, self._pad, self._eos = manifest.seq_len, manifest.pad_id, manifest.eos_id
      prompt_set = make_prompt_set(generation, data_cfg)
      if len(prompt_set) < sample_batches * batch_size:
        raise SystemExit(f"{data}: the eval split holds {len(prompt_set)} records, fewer than the "
                         f"{sample_batches} x {batch_size} prompts of the reverse-KL column")
      self.prompts = [prompt_set.batch(range(i * batch_size, (i + 1) * batch_size)) for i in range(sample_batches)]

  def reverse_kl(self, model) -> tuple[float, int]:
    """(mean over generated tokens of KL(model || teacher) at each, the tokens): `model`'s own continuations
    of the held-out prompts, each position's exact KL over the vocabulary from both models' dense logits."""
    total, tokens = 0.0, 0
    for prompts in self.prompts:
      batch, _ = generate_batch(model, prompts, self.generation, step=0, seq_len=self._seq_len, pad_id=self._pad,
                                eos_id=self._eos)
      total += float(reverse_kl_sum(self._log_probs(model, batch), self._log_probs(self.teacher, batch),
                                    jnp.asarray(batch.loss_mask)))
      tokens += int(np.asarray(batch.loss_mask).sum())
    return total / max(tokens, 1), tokens

  def evaluate(self, hf_dir: Path | None) -> dict[str, float]:
    """{"ce", "kd", "rkl", "rkl_tokens"} of the student at `hf_dir` (None: the teacher itself, whose KLs are 0;
    "rkl" only when the evaluator has prompts)."""
    model = None if hf_dir is None else self._load(None, hf_checkpoint=str(hf_dir))
    ce = kd = 0.0
    for b, lp_t in zip(self.batches, self.teacher_log_probs):
      lp = lp_t if model is None else self._log_probs(model, b)
      mask = jnp.asarray(b.loss_mask, jnp.float32)
      nll = -jnp.take_along_axis(lp, jnp.asarray(b.targets)[..., None], axis=-1)[..., 0]
      ce += float((nll * mask).sum())
      kl = (jnp.exp(lp_t) * (lp_t - lp)).sum(-1)
      kd += float((kl * mask).sum())
    out = {"ce": ce / self.tokens, "kd": kd / self.tokens if model is not None else 0.0}
    if self.prompts:
      out["rkl"], out["rkl_tokens"] = self.reverse_kl(self.teacher if model is None else model)
    return out


def serve(ctx: Context, log_path: Path) -> harness.ServerProcess:
  """The report's teacher server on a free loopback port, serving; its address in `ctx.address`."""
  b = ctx.budget
  server = harness.TeacherServerProcess(
      ["model.source=hf", f"model.path={ctx.teacher_hf}", f"tokenizer_path={ctx.data / 'tokenizer.json'}",
       f"batcher.buckets=[[{b.batch},{seq_len(ctx.data)}]]", f"limits.max_k={b.top_k}", "serve_parameters=true",
       "limits.selectable_layers=all", f"limits.max_samples={MAX_SAMPLES}",
       f"limits.max_scored_ids={MAX_SCORED_IDS}"], log_path, env=_env(), show=True)
  ctx.address = server.address
  return server.wait_serving(timeout=600)


def answer_bytes_per_token(ctx: Context, spec) -> float:
  """Bytes per token of the server's answer to the first held-out batch (example ids 0..B-1) for `spec`."""
  it = make_eval_iterator(DataConfig(path=str(ctx.data), batch_size=ctx.budget.batch))
  batch = next(it)
  it.close()
  tokens = np.asarray(batch.tokens)
  request = wire.make_request(0, tokens, spec, segment_ids=np.asarray(batch.segment_ids),
                              positions=np.asarray(batch.positions),
                              example_ids=np.arange(tokens.shape[0], dtype=np.int64))
  limit = 1 << 30
  with grpc.insecure_channel(ctx.address, options=[("grpc.max_receive_message_length", limit)]) as channel:
    reply = teacher_pb2_grpc.TeacherStub(channel).Forward(request, timeout=600)
  return reply.ByteSize() / tokens.size


def choose_samples(ctx: Context) -> None:
  """The largest N (a multiple of 8) whose top-8 + N answer is no larger than the top-64 answer, measured."""
  b = ctx.budget
  ctx.wire["topk_bytes_per_token"] = answer_bytes_per_token(ctx, OutputSpec(k=b.top_k, pack_ids=True))

  def sampled(n: int) -> float:
    return answer_bytes_per_token(ctx, OutputSpec(k=SAMPLED_TOP_K, pack_ids=True, samples=SampleRequest(
        num_samples=n, temperature=b.temperature, seed=0, exclude=SAMPLED_TOP_K)))
  best = 8
  for n in range(16, MAX_SAMPLES + 1, 8):
    if sampled(n) > ctx.wire["topk_bytes_per_token"]:
      break
    best = n
  ctx.wire.update(sampled_n=best, sampled_bytes_per_token=sampled(best))
  print(f"sampled row: top-{SAMPLED_TOP_K} + N={best} draws, {ctx.wire['sampled_bytes_per_token']:.1f} "
        f"bytes/token, next to {ctx.wire['topk_bytes_per_token']:.1f} for top-{b.top_k}", flush=True)


def seq_len(data: Path) -> int:
  return load_manifest(data).seq_len


def mean_se(values: list[float]) -> tuple[float, float]:
  """Mean and its standard error (sample standard deviation / sqrt(n)); the error is nan for one value."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan
  return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


# Pairs the report compares beyond "each row vs CE only": (row, reference, what the difference says).
COMPARISONS = (
    ("tail", "kd_dense", "tail at k=64 vs dense KD"),
    ("renormalize", "kd_dense", "renormalize at k=64 vs dense KD"),
    ("topk", "kd_dense", "topk at k=64 vs dense KD"),
    ("sampled", "kd_dense", "sampled (the bytes of k=64) vs dense KD"),
    ("tail", "topk", "tail vs topk"),
    ("tail", "renormalize", "tail vs renormalize"),
    ("tail", "sampled", "tail vs sampled"),
    ("copy_then_kd", "tail", "copying embedding and norms vs a random start"),
    ("lti_then_kd", "copy_then_kd", "what LTI adds to the copies"),
    ("lti_attn_then_kd", "tail", "LTI of attention alone vs a random start"),
    ("blockwise_then_kd", "copy_then_kd", "what blockwise adds to the copies"),
    ("on_policy_rkl", "tail", "on-policy reverse KL vs off-policy tail"),
    ("on_policy_gkd", "tail", "on-policy GKD vs off-policy tail"),
    ("on_policy_mix", "tail", "half on-policy vs off-policy tail"),
    ("on_policy_rkl", "on_policy_gkd", "on-policy reverse KL vs GKD"),
    ("on_policy_tail", "tail", "tail on own samples vs on the corpus"),
)


def compare(row: dict, ref: dict) -> dict:
  """Difference of mean held-out CE (row - ref), its standard error, and whether it exceeds Z of them.

  `seeds_needed`: if the difference and the per-seed scatter stayed as measured, the seeds per row at
  which the difference would reach Z standard errors (the standard error falls as 1/sqrt(seeds)).
  """
  diff = row["eval_ce_mean"] - ref["eval_ce_mean"]
  se = math.sqrt(row["eval_ce_se"] ** 2 + ref["eval_ce_se"] ** 2)
  n = min(len(row["eval_ce"]), len(ref["eval_ce"]))
  separated = abs(diff) > Z * se
  if separated or math.isnan(se) or diff == 0:
    needed = None  # separated already, or nothing to estimate from
  else:
    needed = max(n + 1, math.ceil(n * (Z * se / abs(diff)) ** 2))
  return {"row": row["slug"], "ref": ref["slug"], "diff": diff, "se": se, "separated": separated,
          "seeds_needed": needed}


def summarise(rows: list[dict], teacher_ce: float) -> dict:
  """Adds mean, standard error, gain recovered and the verdict against CE-only to each row; returns the summary.

  Each row needs `slug`, `label`, `eval_ce` and `eval_kd` (per-seed values, in seed order); `eval_rkl` (the
  reverse KL of its own samples to the teacher) gets its mean and standard error where a row has it.
  """
  for r in rows:
    r["eval_ce_mean"], r["eval_ce_se"] = mean_se(r["eval_ce"])
    r["eval_kd_mean"], r["eval_kd_se"] = mean_se(r["eval_kd"])
    if "eval_rkl" in r:
      r["eval_rkl_mean"], r["eval_rkl_se"] = mean_se(r["eval_rkl"])
    r["eval_ce_min"], r["eval_ce_max"] = min(r["eval_ce"]), max(r["eval_ce"])
  by = {r["slug"]: r for r in rows}
  base, dense = by["ce_only"], by.get("kd_dense")
  gain = base["eval_ce_mean"] - dense["eval_ce_mean"] if dense is not None else None
  for r in rows:
    if r is base:
      r["gain_recovered"], r["verdict"] = None, "baseline"
      continue
    r["gain_recovered"] = (base["eval_ce_mean"] - r["eval_ce_mean"]) / gain if gain else None
    c = compare(r, base)
    r["vs_ce_only"] = c
    if c["separated"]:
      r["verdict"] = f"{'better' if c['diff'] < 0 else 'worse'} by {abs(c['diff']):.3f} ({abs(c['diff']) / c['se']:.1f} SE)"
    else:
      r["verdict"] = f"not separated ({c['diff']:+.3f} ± {c['se']:.3f})"
  comparisons = [dict(compare(by[a], by[b]), what=what) for a, b, what in COMPARISONS if a in by and b in by]
  max_se = max(r["eval_ce_se"] for r in rows)
  gap = base["eval_ce_mean"] - teacher_ce
  return {"teacher_eval_ce": teacher_ce, "ce_only_eval_ce": base["eval_ce_mean"], "gap": gap, "z": Z,
          "max_se": max_se, "gap_over_max_se": gap / max_se if max_se > 0 else math.inf,
          "comparisons": comparisons,
          "not_separated": [c for c in comparisons if not c["separated"]]}


def plot(rows: list[dict], teacher_ce: float, path: Path, budget: Budget) -> None:
  """Periodic-eval CE curves (the trainer's eval batches); `teacher_ce` must come from the same batches."""
  # matplotlib is heavy (about half a second) and only this plot needs it; Agg is chosen before pyplot loads
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
  for r in rows:
    steps = sorted({t for seed in r["curves"] for t, _ in seed})
    means = [sum(dict(seed)[t] for seed in r["curves"]) / len(r["curves"]) for t in steps
             if all(t in dict(seed) for seed in r["curves"])]
    ax.plot([t / 1e3 for t in steps[:len(means)]], means, marker="o", ms=3, label=r["label"])
  ax.axhline(teacher_ce, color="black", ls="--", lw=1, label=f"teacher, same eval batches ({teacher_ce:.2f})")
  ax.set_xlabel("training tokens seen by the student; on-policy rows: teacher-scored tokens (thousands)")
  ax.set_ylabel("held-out CE (periodic eval, mean over seeds)")
  ax.set_title(f"{budget.student} distilled from {budget.teacher}: held-out CE by mode")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="CI-sized budgets (a small corpus, 8 student steps); writes under "
                      "--out-dir and --results-dir like the full report, so point those elsewhere.")
  parser.add_argument("--data-dir", default=None, help="Prepared dataset, prepared when missing (default "
                      f"{DEFAULT.data}; with --quick {QUICK.data}, 40 files).")
  parser.add_argument("--out-dir", default=None, help="Run directories (default runs/quality, "
                      "runs/quality_quick with --quick).")
  parser.add_argument("--results-dir", default=None, help="Where quality.json and quality.png go (default "
                      "benchmarks/results; with --quick, <out-dir>).")
  parser.add_argument("--results-name", default="quality", help="File names of the results (<name>.json, "
                      "<name>.png): the README's on-policy table reads quality_on_policy, a run of the on-policy rows "
                      "and their controls.")
  parser.add_argument("--rows", default=None, help="Comma-separated row slugs to run (default: every "
                      f"available row but {', '.join(r.slug for r in ROWS if not r.default)}; all: "
                      f"{', '.join(r.slug for r in ROWS)}); ce_only is always included.")
  args = parser.parse_args(argv)
  budget = QUICK if args.quick else DEFAULT
  out = REPO / (args.out_dir or ("runs/quality_quick" if args.quick else "runs/quality"))
  results_dir = Path(args.results_dir) if args.results_dir else (out if args.quick else RESULTS_DIR)
  data = REPO / (args.data_dir or budget.data)
  started = time.perf_counter()
  commit = git_commit()  # before this report writes its own (tracked) results
  harness.ensure_corpus(data, *budget.prepare, env=_env())
  wanted = set(args.rows.split(",")) | {"ce_only"} if args.rows else None
  rows = [r for r in ROWS if r.available() and (r.slug in wanted if wanted else r.default)]
  if wanted and wanted - {r.slug for r in ROWS}:
    raise SystemExit(f"--rows: unknown {', '.join(sorted(wanted - {r.slug for r in ROWS}))} (known: "
                     f"{', '.join(r.slug for r in ROWS)})")
  skipped = [r.slug for r in ROWS if not r.available()]
  if skipped:
    print(f"rows this trainer does not offer, left out: {', '.join(skipped)}", flush=True)
  ctx = Context(budget, data, out, out / "teacher" / "hf")
  out.mkdir(parents=True, exist_ok=True)
  code = code_digest()
  print(f"code digest {code} (finished runs are reused only when it is unchanged)", flush=True)
  train_teacher(ctx, code)
  key = {"teacher": dir_digest(ctx.teacher_hf), "code": code}
  if any("dump" in r.needs for r in rows):
    dump_answers(ctx)
  server = serve(ctx, out / "teacher_server.log") if any("remote" in r.needs for r in rows) else None
  try:
    if any(r.slug == "sampled" for r in rows):
      choose_samples(ctx)
    runs, failed = {}, []
    for r in rows:
      try:
        runs[r.slug] = [train_student(ctx, r, s, key) for s in budget.seeds]
      except (harness.CommandFailed, RuntimeError) as e:  # one row's failure must not cost the others'; see below
        print(f"row {r.slug} FAILED: {e}", file=sys.stderr, flush=True)
        failed.append(r.slug)
  finally:
    if server is not None:
      server.stop()
  rows = [r for r in rows if r.slug in runs]
  if "ce_only" not in runs:
    raise SystemExit("the CE-only baseline failed; nothing to compare with")
  print("evaluating every student on the same held-out tokens", flush=True)
  ev = Evaluator(data, ctx.teacher_hf, budget.eval_batches, budget.batch, generation_config(budget),
                 budget.sample_batches)
  teacher_scores = ev.evaluate(None)
  teacher_ce = teacher_scores["ce"]
  t = seq_len(data)
  batch_tokens = budget.batch * t
  table = []
  for r in rows:
    scores = [ev.evaluate(phases[-1][0] / "hf") for phases in runs[r.slug]]
    steps = row_steps(r, budget, t)

    def tokens_at(step: int, fraction: float = r.on_policy) -> int:
      return budget.batch * scored_positions(step, fraction, t, budget.new_tokens)
    scored = [scored_tokens(read_metrics(phases[-1][0], "onpolicy/steps_fraction"), budget.batch, t)
              if r.on_policy else float(steps * batch_tokens) for phases in runs[r.slug]]
    table.append({"slug": r.slug, "label": r.label, "seeds": list(budget.seeds), "steps": steps,
                  "on_policy_fraction": r.on_policy, "scored_tokens": scored,
                  "eval_ce": [s["ce"] for s in scores], "eval_kd": [s["kd"] for s in scores],
                  "eval_rkl": [s["rkl"] for s in scores], "eval_rkl_tokens": [s["rkl_tokens"] for s in scores],
                  "curves": [curve(phases, tokens_at) for phases in runs[r.slug]]})
  summary = summarise(table, teacher_ce)
  summary["teacher_eval_rkl"] = teacher_scores["rkl"]
  results_dir.mkdir(parents=True, exist_ok=True)
  teacher_curve = curve([(ctx.out / "teacher", 0)], lambda step: step * batch_tokens)
  plot(table, teacher_curve[-1][1] if teacher_curve else teacher_ce, results_dir / f"{args.results_name}.png",
       budget)
  report = {"setup": {**dataclasses.asdict(budget), "student_tokens": budget.student_steps * batch_tokens,
                      "teacher_tokens": budget.teacher_steps * batch_tokens, "eval_tokens": ev.tokens,
                      "first_steps": first_steps(budget), "seq_len": t,
                      "rkl_prompts": len(ev.prompts) * budget.batch,
                      "data": str(data.relative_to(REPO)) if data.is_relative_to(REPO) else str(data)},
            "rows": table, "failed_rows": failed, "summary": summary, "wire": ctx.wire, "command": invocation(),
            "commit": commit, "code_digest": code,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(), "seconds": time.perf_counter() - started}
  (results_dir / f"{args.results_name}.json").write_text(json.dumps(report, indent=1) + "\n")
  print(f"\nteacher held-out CE {teacher_ce:.3f} on {ev.tokens:,} tokens; {len(budget.seeds)} seeds, "
        f"± = standard error of the mean")
  for row in table:
    print(f"  {row['label']:48s} CE {row['eval_ce_mean']:.3f} ± {row['eval_ce_se']:.3f}  "
          f"KD {row['eval_kd_mean']:.3f}  reverse KL {row['eval_rkl_mean']:.3f} ± {row['eval_rkl_se']:.3f}  "
          f"{row['verdict']}")
  print(f"gap teacher -> CE only {summary['gap']:.3f} = {summary['gap_over_max_se']:.1f}x the largest standard error")
  for c in summary["comparisons"]:
    print(f"  {c['what']:48s} {c['diff']:+.3f} ± {c['se']:.3f}  " + (
        "separated" if c["separated"] else f"NOT separated at {budget.student_steps} steps x "
        f"{len(budget.seeds)} seeds" + (f"; would need ~{c['seeds_needed']} seeds per row" if c["seeds_needed"]
                                        else "")))
  print(f"wrote {results_dir / (args.results_name + '.json')} and {results_dir / (args.results_name + '.png')}")
  if failed:
    print(f"rows that FAILED and are missing from the report: {', '.join(failed)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
