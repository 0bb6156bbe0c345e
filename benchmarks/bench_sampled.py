"""Choosing N for sampled teacher targets: gradient variance against dense KD, bytes per token, engine cost.

    python -m benchmarks.bench_sampled                        # demo presets, data/stdlib (or random tokens)
    python -m benchmarks.bench_sampled --teacher-hf runs/demo/teacher/hf --ns 4,8,16,32,64,128
    python -m benchmarks.bench_sampled --preset tiny --student tiny --batch 2 --length 32 --seeds 4

For one batch of the dataset (random tokens when `--data` is not prepared) and
a teacher (a preset with random weights, or a Hugging Face checkpoint), it
measures, in one run:

1. variance: the gradient of the KD loss with respect to the student's logits,
   from N samples per position (kd_mode sampled, tau = T, no exact ids), over
   `--seeds` seeds, against the dense gradient: E ||g_N - g_dense||^2 / ||g_dense||^2
   (unbiased, so this is the variance; it falls as 1/N), and the same with the
   exact top-16 and N samples drawn outside it. Next to them, the same
   relative squared error of the deterministic `tail` estimator at k = 16, 64,
   128 (its bias, which no amount of training averages away).
2. bytes: the answer message bytes per token on the wire (f16 values, packed
   ids, one temperature) for N samples (alone and after the exact top-16) and
   for top-k at k = 16, 64, 128, from
   the real encoding of this teacher's answers (repeated draws of one id
   travel once, so a peaked teacher needs fewer bytes).
3. engine: teacher engine tokens/s (jitted forward, top-64, transfer) with and
   without max(N) samples drawn in the same program.

The student is a preset with random weights (`--student`) or an HF checkpoint
(`--student-hf`). Figures are recorded in the benchmark results file.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import interleaved, paired_ratio
from benchmarks.results import record
from distill_core import checkpoints, wire
from distill_core.config import build, resolve_preset
from distill_core.data import DataConfig, load_manifest, make_iterator
from distill_core.model.config import ModelConfig
from distill_core.parts.samples import SampleBatch
from distill_core.sampling import split_u64
from distill_core.sharding import MeshConfig
from distill_core.targets import compute_targets
from student_trainer import losses
from teacher_server.engine import JaxEngine
from teacher_server.engine_api import EngineBatch, Fetch

TOPK = (16, 64, 128)
EXACT = 16  # exact top-k ids of the combined variant (samples drawn outside them)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", default="demo_teacher", help="teacher model preset (random weights, seed 0)")
  p.add_argument("--teacher-hf", help="teacher Hugging Face checkpoint folder (instead of --preset)")
  p.add_argument("--student", default="demo_student", help="student model preset (random weights, seed 1)")
  p.add_argument("--student-hf", help="student Hugging Face checkpoint folder (instead of --student)")
  p.add_argument("--data", default="data/stdlib", help="prepared dataset (random tokens if it does not exist or "
                                                       "is '')")
  p.add_argument("--batch", type=int, default=4, help="rows B of the measured batch")
  p.add_argument("--length", type=int, default=128, help="tokens T per row")
  p.add_argument("--ns", default="4,16,64", help="comma-separated numbers of samples N per position")
  p.add_argument("--seeds", type=int, default=16, help="seeds per N for the variance")
  p.add_argument("--temperature", type=float, default=1.0, help="KD temperature T (and the proposal's tau)")
  p.add_argument("--engine-batches", type=int, default=5, help="timed engine batches per variant")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the two engine programs")
  return p.parse_args(argv)


def _load(preset: str, hf: str | None, seed: int):
  if hf:
    return checkpoints.load_model(hf_checkpoint=hf)
  return checkpoints.load_model(build(ModelConfig, resolve_preset(preset)), seed=seed)


def _batch(args, vocab: int):
  """(tokens, segment ids, positions, example ids, where from) of one batch."""
  if args.data and (Path(args.data) / "manifest.json").is_file():
    if load_manifest(args.data).vocab_size > vocab:
      raise SystemExit(f"--data {args.data}: its tokenizer has {load_manifest(args.data).vocab_size} ids, more than "
                       f"the models' {vocab} (pass models of that vocabulary, or --data '' for random tokens)")
    it = make_iterator(build(DataConfig, {"path": args.data, "batch_size": args.batch, "shuffle": False}), "train")
    try:
      b = next(iter(it))
    finally:
      it.close()
    t = min(args.length, b.tokens.shape[1])
    return b.tokens[:, :t], b.segment_ids[:, :t], b.positions[:, :t], b.example_ids, args.data
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (args.batch, args.length), dtype=np.int32)
  positions = np.tile(np.arange(args.length, dtype=np.int32), (args.batch, 1))
  return tokens, np.ones_like(tokens), positions, np.arange(args.batch), "random tokens"


def gradient_errors(s, z, mask, true_vocab: int, ns: list[int], seeds: int, temperature: float,
                    example_ids) -> dict[str, float]:
  """Relative squared gradient errors: sampled (mean over seeds) per N, and `tail` per top-k."""
  def grad_of(fn):
    return jax.jit(jax.grad(lambda x, *a: fn(x, *a)[0].sum))

  dense = np.asarray(grad_of(lambda x, zz, mm: losses.kd_dense(x, zz, mm, temperature=temperature,
                                                               true_vocab_size=true_vocab))(s, z, mask), np.float64)
  norm = float(np.sum(dense ** 2))
  eids = jnp.asarray(split_u64(example_ids))
  out = {}
  for n in ns:
    for exact, name in ((0, f"sampled_grad_rel_var_n{n}"), (EXACT, f"sampled_top{EXACT}_grad_rel_var_n{n}")):
      @jax.jit
      def sampled_grad(x, zz, mm, ee, seed_words, n=n, exact=exact):
        t = compute_targets(zz, k=max(exact, 1), temperatures=(temperature,), true_vocab_size=true_vocab,
                            num_samples=n, sample_temperature=temperature, sample_seed=seed_words, example_ids=ee,
                            sample_exclude=exact)
        return jax.grad(lambda y: losses.kd_sampled(y, t, mm, k=exact, true_vocab_size=true_vocab)[0].sum)(x)

      errs = [float(np.sum((np.asarray(sampled_grad(s, z, mask, eids, jnp.asarray(split_u64(np.asarray(i)))),
                                       np.float64) - dense) ** 2)) for i in range(seeds)]
      out[name] = float(np.mean(errs)) / norm
  for k in TOPK:
    if k > true_vocab:
      continue
    targets = compute_targets(z, k=k, temperatures=(temperature,), true_vocab_size=true_vocab)
    g = grad_of(lambda x, tt, mm: losses.kd_sparse(x, tt, mm, mode="tail", true_vocab_size=true_vocab))(
        s, targets, mask)
    out[f"tail_grad_rel_err_k{k}"] = float(np.sum((np.asarray(g, np.float64) - dense) ** 2)) / norm
  return out


def wire_bytes(z, true_vocab: int, ns: list[int], temperature: float, example_ids) -> dict[str, float]:
  """Answer bytes per token: N samples (with the one top id every answer carries) and top-k."""
  tokens = z.shape[0] * z.shape[1]
  bits = wire.bits_for(true_vocab)

  def size(**kw):
    t = jax.tree.map(np.asarray, compute_targets(z, temperatures=(temperature,), true_vocab_size=true_vocab,
                                                 value_dtype="float16", **kw))
    return wire.targets_to_response(0, t, packed_id_bits=bits).ByteSize() / tokens

  draws = dict(sample_temperature=temperature, example_ids=split_u64(example_ids))
  out = {f"sampled_bytes_per_token_n{n}": size(k=1, num_samples=n, **draws) for n in ns}
  out.update({f"sampled_top{EXACT}_bytes_per_token_n{n}": size(k=EXACT, num_samples=n, sample_exclude=EXACT, **draws)
              for n in ns})
  out.update({f"topk_bytes_per_token_k{k}": size(k=k) for k in TOPK if k <= true_vocab})
  return out


def engine_speed(teacher, tokens, segment_ids, positions, example_ids, n: int, batches: int,
                 rounds: int) -> dict[str, object]:
  """Engine tokens/s at top-64 without and with n samples per position (same bucket, same process).

  The two programs take turns over `rounds` rounds; their ratio is the median of the rounds' ratios.
  """
  b, t = tokens.shape
  k = min(64, teacher.cfg.real_vocab_size)
  engine = JaxEngine(teacher, buckets=[(b, t)], max_k=k, max_temperatures=1, selectable_layers=[], state_names=[],
                     max_samples=n, mesh=MeshConfig(data=1))
  engine.warmup()
  draws = SampleBatch.empty(b)
  draws.num_samples[:] = n
  draws.example_ids[:] = split_u64(example_ids)
  temps = np.ones((b, 1), np.float32)
  programs = {"plain": EngineBatch(tokens, segment_ids, positions, temps, Fetch(k=k)),
              "sampled": EngineBatch(tokens, segment_ids, positions, temps, Fetch(k=k, samples=n), {"samples": draws})}

  def speed(batch):
    def once() -> float:
      start = time.perf_counter()
      for _ in range(batches):
        engine.forward(batch)
      return batches * b * t / (time.perf_counter() - start)
    return once

  for batch in programs.values():
    engine.forward(batch)  # compiled before any clock starts
  speeds = interleaved({name: speed(batch) for name, batch in programs.items()}, rounds)
  return {"sampled_engine_tokens_per_s": statistics.median(speeds["sampled"]),
          "topk_engine_tokens_per_s": statistics.median(speeds["plain"]),
          "sampled_engine_speed_ratio": paired_ratio(speeds["sampled"], speeds["plain"], limit=1.0,
                                                     why="the sampled program does the top-64 program's work "
                                                         "and draws the samples")}


def main(argv=None) -> int:
  args = parse_args(argv)
  ns = sorted({int(x) for x in args.ns.split(",")})
  teacher = _load(args.preset, args.teacher_hf, seed=0)
  student = _load(args.student, args.student_hf, seed=1)
  vocab = teacher.cfg.real_vocab_size
  if student.cfg.real_vocab_size != vocab:
    raise SystemExit(f"teacher and student vocabularies differ ({vocab} vs {student.cfg.real_vocab_size})")
  tokens, seg, pos, eids, source = _batch(args, vocab)
  mask = jnp.asarray((seg > 0).astype(np.float32))
  z = jax.jit(lambda m, *a: m(*a).logits)(teacher, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
  s = jax.jit(lambda m, *a: m(*a).logits)(student, jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg))
  print(f"teacher {args.teacher_hf or args.preset}, student {args.student_hf or args.student}, vocab {vocab}, "
        f"batch {tokens.shape[0]}x{tokens.shape[1]} from {source}, T = tau = {args.temperature}, "
        f"{args.seeds} seeds", flush=True)
  figures = gradient_errors(s, z, mask, vocab, ns, args.seeds, args.temperature, eids)
  figures.update(wire_bytes(z, vocab, ns, args.temperature, eids))
  figures.update(engine_speed(teacher, tokens, seg, pos, eids, max(ns), args.engine_batches,
                              args.rounds))
  print(f"  {'N':>5} {'grad var / |g|^2':>17} {'bytes/token':>12}   top-{EXACT} + N tail samples: var, bytes/token")
  for n in ns:
    print(f"  {n:>5} {figures[f'sampled_grad_rel_var_n{n}']:17.4f} {figures[f'sampled_bytes_per_token_n{n}']:12.1f}   "
          f"{figures[f'sampled_top{EXACT}_grad_rel_var_n{n}']:17.4f} "
          f"{figures[f'sampled_top{EXACT}_bytes_per_token_n{n}']:12.1f}")
  print(f"  {'top-k':>5} {'tail |bias|^2/|g|^2':>17} {'bytes/token':>12}")
  for k in TOPK:
    if f"topk_bytes_per_token_k{k}" in figures:
      print(f"  {k:>5} {figures[f'tail_grad_rel_err_k{k}']:17.4f} {figures[f'topk_bytes_per_token_k{k}']:12.1f}")
  print(f"  engine top-64: {figures['topk_engine_tokens_per_s']:,.0f} tokens/s; with {max(ns)} samples: "
        f"{figures['sampled_engine_tokens_per_s']:,.0f} tokens/s (median ratio "
        f"{figures['sampled_engine_speed_ratio'].value:.2f} over {args.rounds} interleaved rounds, "
        f"{figures['sampled_engine_speed_ratio'].low:.2f} to {figures['sampled_engine_speed_ratio'].high:.2f})")
  if figures["sampled_engine_speed_ratio"].note:
    print(f"  note: {figures['sampled_engine_speed_ratio'].note}")
  def unit(key: str) -> str:
    return "bytes/token" if "bytes_per_token" in key else "tokens/s" if key.endswith("tokens_per_s") else "ratio"

  record({key: (value, unit(key)) for key, value in figures.items()})
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
