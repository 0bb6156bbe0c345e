"""Offline teacher answers: bytes on disk, dump throughput and teacher busy fraction, read speed vs the student.

    python -m benchmarks.bench_offline [--data data/stdlib] [--examples 256] [--steps 24]

1. Dump: the demo teacher (in process, `python -m teacher_server.dump`'s own code) answers the
   first `--examples` training examples at k = 128; the teacher busy fraction is its engine time
   over the dump's wall time (encoding and writing run on their own threads).
2. Size at the demo vocabulary: those real answers, re-encoded at k = 16, 64, 128, without and
   with zstd (level 3), written as shards; bytes per token and per top-k entry of the files.
3. Size at a 131,072-entry vocabulary: synthetic answers (the exact top-k order statistics of
   131,072 i.i.d. N(0, 3^2) logits per position, random ids), same encodings, plus the plain f16
   layout (no delta coding) and the bytes per entry of one row's ids and values alone.
4. Read: the `offline` source serving the dumped batches (grain lookup by id, decode, trim, place
   on the device) with 1 and 2 read threads, batches from memory; next to the student's own
   training tokens/s from the same shards. The 2-thread read and the student run take turns over
   `--rounds` rounds; their ratio is the median of the rounds' ratios (benchmarks.common).

Figures go to the benchmark results file (benchmarks/results.py); keys in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from scipy.special import ndtri

from benchmarks.bench_train import HelpFormatter, throughput
from benchmarks.common import interleaved, paired_ratio
from benchmarks.results import record
from distill_core import shards, sorted_delta, wire
from distill_core.config import load_config
from distill_core.data import load_manifest, make_iterator
from distill_core.harness import ensure_corpus
from distill_core.sharding import make_mesh
from distill_core.shards import StoredSpec
from distill_core.shards_io import AnswerStore, ShardWriter
from distill_core.targets import TeacherTargets
from student_trainer.config import TrainConfig
from student_trainer.sources import Student
from student_trainer.sources.offline import OfflineTeacher
from student_trainer.train import run
from teacher_server.dump import dump
from teacher_server.dump_config import DumpConfig

K_VALUES = (16, 64, 128)
ZSTD_LEVEL = 3
BIG_VOCAB = 131072


def synthetic_answers(rng, positions: int, k: int, vocab: int, sigma: float = 3.0):
  """(ids, values): the k largest of `vocab` i.i.d. N(0, sigma^2) logits per position, exactly sampled
  (Renyi: the i-th largest uniform is the previous one times W^(1/(vocab - i + 1))), minus the max."""
  log_u = np.cumsum(np.log(rng.random((positions, k))) / (vocab - np.arange(k)), axis=1)
  x = -ndtri(-np.expm1(log_u)) * sigma  # (positions, k), descending
  ids = rng.integers(0, vocab, (positions, k), dtype=np.int32)
  return ids, (x - x[:, :1]).astype(np.float16)


def write_shard(root: Path, name: str, records: list[bytes], positions: int) -> int:
  """Writes `records` as one shard with the real writer; returns the file's bytes."""
  header = _header(name)
  writer = ShardWriter(root / name, header, name_of=lambda i: f"{name}-{i}{shards.SHARD_SUFFIX}",
                       records_per_shard=len(records) + 1)
  for i, encoded in enumerate(records):
    writer.add(i, encoded, positions=positions, tokens=positions, temperatures=(1.0,))
  return writer.finish_shard().bytes


def _header(name: str):
  teacher = shards.TeacherInfo(model_type="synthetic", weights_fingerprint="", tokenizer_fingerprint="",
                               vocab_size=BIG_VOCAB, num_layers=0, hidden_size=0)
  dataset = shards.DatasetInfo(path="", dataset_fingerprint="", tokenizer_fingerprint="", seq_len=0, splits={})
  spec = shards.StoredSpec.build(wire.OutputSpec(k=1), id_bits=0, value_coding="raw", zstd_level=0)
  return shards.Progress(teacher=teacher, dataset=dataset, spec=spec, writer=name)


STAMP = "0" * 64  # every record names its teacher: a sha256 hex weights fingerprint, as a real dump's


def size_figures(answers, vocab: int, seq_len: int, out: Path, prefix: str) -> dict:
  """Bytes per token and per entry for every k and zstd setting; `answers` yields B=1 targets at k = 128."""
  figures = {}
  for k in K_VALUES:
    for level in (0, ZSTD_LEVEL):
      spec = StoredSpec.build(wire.OutputSpec(k=k), id_bits=wire.bits_for(vocab), value_coding="sorted_delta",
                              zstd_level=level)
      trimmed = [shards.select(a, temperature=1.0, k=k) for a in answers]
      size = write_shard(out, f"{prefix}k{k}z{level}", [shards.encode_record(i, a, spec, weights_fingerprint=STAMP)
                                                        for i, a in enumerate(trimmed)], seq_len)
      positions = len(answers) * seq_len
      suffix = "_zstd" if level else ""
      figures[f"{prefix}disk_bytes_per_token_k{k}{suffix}"] = (size / positions, "bytes/token")
      figures[f"{prefix}disk_bytes_per_entry_k{k}{suffix}"] = (size / positions / k, "bytes/entry")
  return figures


def big_vocab_figures(examples: int, seq_len: int, out: Path) -> dict:
  rng = np.random.default_rng(0)
  answers = []
  for _ in range(examples):
    ids, values = synthetic_answers(rng, seq_len, max(K_VALUES), BIG_VOCAB)
    lse = np.log1p(np.exp(values[:, 1:].astype(np.float64)).sum(1)).astype(np.float32)  # a stand-in column
    answers.append(TeacherTargets(topk_ids=ids[None], topk_logits=values[None], logsumexp=lse[None, :, None],
                                  temperatures=(1.0,)))
  figures = size_figures(answers, BIG_VOCAB, seq_len, out, "")
  raw = StoredSpec.build(wire.OutputSpec(k=64), id_bits=wire.bits_for(BIG_VOCAB), value_coding="raw", zstd_level=0)
  size = write_shard(out, "rawk64", [shards.encode_record(i, shards.select(a, temperature=1.0, k=64), raw,
                                                          weights_fingerprint=STAMP)
                                     for i, a in enumerate(answers)], seq_len)
  figures["disk_bytes_per_entry_k64_raw_f16"] = (size / (examples * seq_len * 64), "bytes/entry")
  values = np.concatenate([np.asarray(a.topk_logits[0, :, :64]) for a in answers])
  ids = np.concatenate([np.asarray(a.topk_ids[0, :, :64]) for a in answers])
  row = len(sorted_delta.encode(values)) + len(wire.pack_uints(ids, wire.bits_for(BIG_VOCAB)))
  figures["row_bytes_per_entry_k64"] = (row / values.size, "bytes/entry")
  return figures


def train_cfg(args, answers: Path, run_dir: Path, *extra: str):
  base = [f"run_dir={run_dir}", f"data.path={args.data}", f"data.batch_size={args.batch_size}", "data.shuffle=false",
          f"steps={args.steps}", f"model={args.student}", "logging.every_steps=4", "logging.progress=false",
          "logging.tensorboard=false", "eval.every_steps=0", "eval.batches=1", "checkpoint.every_steps=1000000",
          "checkpoint.async_save=false", "checkpoint.resume=false", "export_hf=false", "loss.top_k=64",
          "loss.beta=0", "teacher.source=offline", f"teacher.offline.path={answers}",
          "teacher.offline.on_missing=ce_only"]
  return load_config(TrainConfig, None, base + list(extra))


def read_throughput(cfg, batches: list, threads: int) -> float:
  cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"offline": cfg.teacher.offline.model_copy(
      update={"read_threads": threads})})})
  with OfflineTeacher(cfg.teacher.offline, Student.of(cfg), make_mesh(cfg.mesh)) as source:
    for batch in batches[:2]:  # warm-up: threads started, first lookups done
      source.submit(batch, 1.0)
      jax.block_until_ready(source.next())
    start = time.perf_counter()
    ahead = 0
    for i, batch in enumerate(batches[2:]):
      source.submit(batch, 1.0)
      ahead += 1
      if ahead > source.lookahead or i == len(batches) - 3:
        while ahead:
          jax.block_until_ready(source.next())
          ahead -= 1
    wall = time.perf_counter() - start
  return sum(b.tokens.size for b in batches[2:]) / wall


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
  parser.add_argument("--data", default="data/stdlib", help="Prepared dataset (prepared here when missing).")
  parser.add_argument("--teacher", default="demo_teacher", help="Teacher preset (random weights unless --teacher-hf).")
  parser.add_argument("--teacher-hf", default=None, help="Hugging Face teacher folder (e.g. runs/demo/teacher/hf).")
  parser.add_argument("--student", default="demo_student", help="Student preset of the training run.")
  parser.add_argument("--examples", type=int, default=256, help="Training examples dumped (and read back).")
  parser.add_argument("--size-examples", type=int, default=256, help="Synthetic examples per size measurement.")
  parser.add_argument("--batch-size", type=int, default=8, help="Student batch size.")
  parser.add_argument("--steps", type=int, default=24, help="Student training steps (the first 4 hold compilation).")
  parser.add_argument("--rounds", type=int, default=3,
                      help="Interleaved rounds of the 2-thread read and the student run (the speed-up's two sides).")
  args = parser.parse_args(argv)
  ensure_corpus(args.data)
  seq_len = load_manifest(args.data).seq_len
  model = ([f"teacher.model.source=hf", f"teacher.model.path={args.teacher_hf}"] if args.teacher_hf
           else [f"teacher.model.preset={args.teacher}"])
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp)
    answers = out / "answers"
    summary = dump(load_config(DumpConfig, None, [
        f"data={args.data}", "splits=[train]", f"max_examples={args.examples}", f"output={answers}", "k=128",
        "progress=false", f"teacher.tokenizer_path={Path(args.data) / 'tokenizer.json'}", *model]))
    print(summary.line())
    figures = {"dump_teacher_busy_fraction": (summary.teacher_busy_fraction, "fraction"),
               "dump_tokens_per_s": (summary.positions / summary.wall_s, "tokens/s")}
    store = AnswerStore(answers)
    vocab = store.manifest.teacher.vocab_size
    figures.update(size_figures([store.read(i) for i in range(args.examples)], vocab, seq_len, out, "demo_"))
    figures.update(big_vocab_figures(args.size_examples, seq_len, out))
    cfg = train_cfg(args, answers, out / "student")
    data = make_iterator(cfg.data, "train")
    batches = [next(data) for _ in range(args.examples // args.batch_size)]
    data.close()
    figures["shard_read_tokens_per_s_1_thread"] = (read_throughput(cfg, batches, 1), "tokens/s")

    def student_run() -> float:
      shutil.rmtree(out / "student", ignore_errors=True)  # a fresh run: no earlier round's checkpoint or metrics
      run(cfg)
      return throughput(out / "student", "offline student")

    rounds = interleaved({"read": lambda: read_throughput(cfg, batches, 2), "student": student_run}, args.rounds)
  figures["shard_read_tokens_per_s_2_threads"] = (statistics.median(rounds["read"]), "tokens/s")
  figures["offline_student_tokens_per_s"] = (statistics.median(rounds["student"]), "tokens/s")
  figures["shard_read_speedup_over_student"] = (paired_ratio(rounds["read"], rounds["student"]), "ratio")
  width = max(map(len, figures))
  for key, (value, unit) in figures.items():
    spread = f"  (median of {value.rounds} interleaved rounds, {value.low:.4g} to {value.high:.4g})" \
        if hasattr(value, "rounds") else ""
    print(f"{key:<{width}}  {getattr(value, 'value', value):12.4g} {unit}{spread}")
  record(figures)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
