"""Serving efficiency of the teacher server: raw engine tokens/s vs tokens/s through gRPC.

    python -m benchmarks.bench_server                       # demo_teacher, bucket 8x128, k=64
    python -m benchmarks.bench_server --preset tiny --batches 10 --length 32

Both measurements use the same model, bucket shape and k, each in its own
child process; both processes stay up for the whole run and take turns:

1. engine: the jitted forward + on-device top-k/logsumexp + transfer to host,
   full bucket-shaped batches, no gRPC (``--engine-only`` runs this part; it
   measures once per line read from its stdin).
2. served: ``python -m teacher_server`` in a child process, this process as the
   client, ``--streams`` bidirectional streams each keeping ``--window``
   requests of one full bucket in flight.

3. batching: on the same server, ``--clients`` concurrent clients (one channel
   each), each keeping one half-empty request (B/2 rows) in flight, against one
   such client: the gain of the server's batcher, which packs requests of many
   clients into one bucket.

The measurements are interleaved over ``--rounds`` rounds (engine, served,
engine, served, ...; 1 client, N clients, ...), and each ratio is the median of
its rounds' ratios with their range (benchmarks.common.paired_ratio), so a
neighbour's load on a shared machine hits both sides of a ratio alike. Two
processes hold the teacher at once: on a GPU that needs
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (set here for the children); a TPU,
which one process holds, cannot run this benchmark as is.

Prints tokens/s of each, their ratios (serving efficiency, batching gain), and
the bytes on the wire per token of the request and of the answer (k values as
float16, ids as int32 and bit-packed), and records them in the benchmark
results file (benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import interleaved, paired_ratio
from benchmarks.results import record
from distill_core import harness, wire
from distill_core.client import OutputSpec, TeacherClient
from distill_core.config import load_config
from teacher_server.config import ServerConfig
from teacher_server.engine import JaxEngine
from teacher_server.engine_api import EngineBatch, Fetch

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", default="demo_teacher", help="model preset (configs/models)")
  p.add_argument("--batch", type=int, default=8, help="bucket batch B")
  p.add_argument("--length", type=int, default=128, help="bucket length T")
  p.add_argument("--k", type=int, default=64, help="top-k per position")
  p.add_argument("--batches", type=int, default=10, help="measured full batches per phase")
  p.add_argument("--streams", type=int, default=2, help="client streams (served phase)")
  p.add_argument("--window", type=int, default=4, help="requests in flight per stream")
  p.add_argument("--clients", type=int, default=4, help="concurrent clients of the batching phase")
  p.add_argument("--batching-requests", type=int, default=8,
                 help="half-empty requests per client in the batching phase")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every measurement")
  p.add_argument("--engine-only", action="store_true", help="run only the engine phase, print JSON")
  p.add_argument("--json", action="store_true", help="print the results as one JSON object")
  return p.parse_args(argv)


def server_overrides(args) -> list[str]:
  return [f"model.preset={args.preset}", f"batcher.buckets=[[{args.batch},{args.length}]]",
          f"limits.max_k={args.k}", "limits.selectable_layers=[]", "batcher.max_wait_ms=2",
          f"limits.max_tokens_per_request={args.batch * args.length}", f"limits.max_batch={args.batch}"]


def engine_phase(args) -> None:
  """Child process: raw engine throughput, measured once per line on stdin (one JSON line each)."""
  engine = JaxEngine.from_config(load_config(ServerConfig, None, server_overrides(args)))
  engine.warmup()
  rng = np.random.default_rng(0)
  b, t = args.batch, args.length
  batches = [EngineBatch(rng.integers(0, engine.info.vocab_size, (b, t), dtype=np.int32),
                         np.ones((b, t), np.int32), np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                         np.ones((b, engine.info.max_temperatures), np.float32), Fetch(k=args.k))
             for _ in range(4)]
  engine.forward(batches[0])
  print(json.dumps({"vocab_size": engine.info.vocab_size}), flush=True)
  for _ in sys.stdin:
    start = time.perf_counter()
    for i in range(args.batches):
      engine.forward(batches[i % len(batches)])
    seconds = time.perf_counter() - start
    print(json.dumps({"engine_tokens_per_s": args.batches * b * t / seconds, "compilations": engine.compilations()}),
          flush=True)


class EngineChild:
  """The engine phase in its own process, measuring on request."""

  def __init__(self, args):
    cmd = [sys.executable, "-m", "benchmarks.bench_server", "--engine-only", f"--preset={args.preset}",
           f"--batch={args.batch}", f"--length={args.length}", f"--k={args.k}", f"--batches={args.batches}"]
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the engine process exited with {self.proc.wait()} (its log is above)")
    return json.loads(line)

  def measure(self) -> float:
    self.proc.stdin.write("measure\n")
    self.proc.stdin.flush()
    return self._read()["engine_tokens_per_s"]

  def close(self) -> None:
    self.proc.stdin.close()
    self.proc.wait(60)


def child_env() -> dict:
  return dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # two JAX processes share one accelerator


def message_sizes(args, address: str, vocab: int) -> dict:
  """Request and answer bytes per token of one full bucket."""
  b, t = args.batch, args.length
  tokens = np.random.default_rng(1).integers(0, vocab, (b, t), dtype=np.int32)

  async def sizes() -> dict:
    async with TeacherClient(address) as client:
      await client.wait_until_serving(timeout=600)
      out = {}
      for packed in (False, True):
        resp = await client.stub.Forward(wire.make_request(0, tokens, OutputSpec(k=args.k, pack_ids=packed)))
        out["packed" if packed else "plain"] = resp.ByteSize()
      return out

  out = asyncio.run(sizes())
  return {"request_bytes_per_token": wire.make_request(0, tokens, OutputSpec(k=args.k, value_dtype="float16"))
          .ByteSize() / (b * t),
          "response_bytes_per_token": out["plain"] / (b * t),
          "response_bytes_per_token_packed_ids": out["packed"] / (b * t)}


def _tokens(args, vocab: int) -> list[np.ndarray]:
  rng = np.random.default_rng(1)
  return [rng.integers(0, vocab, (args.batch, args.length), dtype=np.int32) for _ in range(4)]


async def served_phase(args, address: str, vocab: int) -> float:
  """Tokens/s served through gRPC: `--streams` streams, `--window` full buckets in flight each."""
  tokens, spec = _tokens(args, vocab), OutputSpec(k=args.k, value_dtype="float16")
  per_stream = [args.batches // args.streams + (i < args.batches % args.streams) for i in range(args.streams)]
  async with TeacherClient(address) as client:

    async def run(n: int) -> None:
      async with client.stream(window=args.window) as stream:
        futures = [await stream.submit(tokens[i % len(tokens)], spec) for i in range(n)]
        for f in futures:
          await f

    await run(2)  # warm connection and code paths
    start = time.perf_counter()
    await asyncio.gather(*(run(n) for n in per_stream))
    seconds = time.perf_counter() - start
  return args.batches * args.batch * args.length / seconds


async def batching_phase(args, address: str, vocab: int, clients: int) -> float:
  """Real tokens/s served to `clients` clients, each with one half-empty request in flight at a time."""
  rows, spec = half_rows(args), OutputSpec(k=args.k, value_dtype="float16")
  half = [x[:rows] for x in _tokens(args, vocab)]
  warmed, go = asyncio.Semaphore(0), asyncio.Event()

  async def one_client() -> None:
    async with TeacherClient(address) as client:
      async with client.stream(window=1) as stream:
        await (await stream.submit(half[0], spec))  # connected and warm before the clock starts
        warmed.release()
        await go.wait()
        for i in range(args.batching_requests):
          await (await stream.submit(half[i % len(half)], spec))

  tasks = [asyncio.create_task(one_client()) for _ in range(clients)]
  for _ in range(clients):
    await warmed.acquire()
  start = time.perf_counter()
  go.set()
  await asyncio.gather(*tasks)
  return clients * args.batching_requests * rows * args.length / (time.perf_counter() - start)


def half_rows(args) -> int:
  return max(1, args.batch // 2)


def record_results(args, results: dict) -> None:
  k = args.k
  figures = {"engine_tokens_per_s": (results["engine_tokens_per_s"], "tokens/s"),
             "served_tokens_per_s": (results["served_tokens_per_s"], "tokens/s"),
             "serving_efficiency": (results["serving_efficiency"], "ratio"),
             "request_bytes_per_token": (results["request_bytes_per_token"], "bytes/token"),
             f"wire_bytes_per_token_k{k}": (results["response_bytes_per_token_packed_ids"], "bytes/token"),
             f"wire_bytes_per_entry_k{k}": (results["response_bytes_per_token_packed_ids"] / k, "bytes/entry"),
             f"batching_gain_{args.clients}_clients": (results[f"batching_gain_{args.clients}_clients"], "ratio")}
  record(figures)


def measure(args) -> dict:
  """Every figure, the engine and served tokens/s (and 1 vs N clients) interleaved over `--rounds` rounds."""
  engine = EngineChild(args)
  server = harness.TeacherServerProcess(["log_level=WARNING", *server_overrides(args)], env=child_env())
  address = server.address
  try:
    server.wait_serving(timeout=600)
    vocab = engine.info["vocab_size"]
    results = message_sizes(args, address, vocab)
    n = args.clients
    rounds = interleaved({
        "engine": engine.measure,
        "served": lambda: asyncio.run(served_phase(args, address, vocab)),
        "batching_1": lambda: asyncio.run(batching_phase(args, address, vocab, 1)),
        f"batching_{n}": lambda: asyncio.run(batching_phase(args, address, vocab, n)),
    }, args.rounds)
  finally:
    server.stop()
    engine.close()
  median = {name: float(np.median(values)) for name, values in rounds.items()}
  results.update({
      "engine_tokens_per_s": median["engine"], "served_tokens_per_s": median["served"],
      "serving_efficiency": paired_ratio(rounds["served"], rounds["engine"], limit=1.0,
                                         why="the server runs the same engine, plus gRPC and encoding"),
      "batching_1_client_tokens_per_s": median["batching_1"],
      f"batching_{n}_clients_tokens_per_s": median[f"batching_{n}"],
      f"batching_gain_{n}_clients": paired_ratio(rounds[f"batching_{n}"], rounds["batching_1"], limit=float(n),
                                                 why=f"{n} clients, each no faster than one client alone"),
      "rounds": rounds})
  return results


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.engine_only:
    engine_phase(args)
    return 0
  results = measure(args)
  results.update(preset=args.preset, bucket=[args.batch, args.length], k=args.k)
  record_results(args, results)
  n = args.clients
  efficiency, gain = results["serving_efficiency"], results[f"batching_gain_{n}_clients"]
  if args.json:
    print(json.dumps({key: (vars(value) if hasattr(value, "rounds") else value) for key, value in results.items()}))
    return 0
  print(f"teacher {args.preset}, bucket {args.batch}x{args.length}, k={args.k}, {args.batches} batches, "
        f"{args.rounds} interleaved rounds (medians; ratios: median of the rounds' ratios [lowest, highest])")
  print(f"  engine (no gRPC)   {results['engine_tokens_per_s']:12,.0f} tokens/s")
  print(f"  served over gRPC   {results['served_tokens_per_s']:12,.0f} tokens/s "
        f"({args.streams} streams x window {args.window})")
  print(f"  serving efficiency {efficiency.value:12.3f} [{efficiency.low:.3f}, {efficiency.high:.3f}]")
  print(f"  wire bytes/token   request {results['request_bytes_per_token']:.1f}, answer "
        f"{results['response_bytes_per_token']:.1f} (f16 values + int32 ids), "
        f"{results['response_bytes_per_token_packed_ids']:.1f} with packed ids")
  print(f"  batching           1 client {results['batching_1_client_tokens_per_s']:,.0f} tokens/s, {n} clients "
        f"{results[f'batching_{n}_clients_tokens_per_s']:,.0f} tokens/s (each B/2 rows, one in flight): "
        f"gain {gain.value:.2f} [{gain.low:.2f}, {gain.high:.2f}]")
  for ratio in (efficiency, gain):
    if ratio.note:
      print(f"  note: {ratio.note}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
