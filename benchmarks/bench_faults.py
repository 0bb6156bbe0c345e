"""What the teacher server does under the faults real clusters produce, measured on a real server process.

    python -m benchmarks.bench_faults            # tiny model, the server's default limits
    python -m benchmarks.bench_faults --json

`python -m teacher_server` (tiny random model, bucket 8x256, every limit at its
default, bearer token on) in a child process, this process as the client:

1. slow reader: one stream sends `--slow-requests` requests whose answers are
   about 12.6 MB each (64 x 256 positions, k=128, float16) and reads nothing.
   Peak bytes the stream holds (the server's `teacher_stream_held_bytes`), what
   the requests would have held unbounded, and the server's RSS growth.
2. idle streams: `--idle-streams` Stream calls over `--connections` connections,
   none sending anything: how many the server keeps open, and whether health
   still answers.
3. abandoned work: a stream sends 40 requests of 64 rows (8 engine batches
   each) and is cancelled after the first answer: the share of the other 39
   the server drops before its engine runs them.
4. malformed bytes: `--malformed` random byte strings on Forward: answers/s,
   the server's RSS growth, and the log lines they caused.

Records the figures in the benchmark results file (benchmarks/results.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from benchmarks.probes import rss_bytes, scrape_metrics
from benchmarks.results import record
from distill_core import harness, wire
from distill_core.client import OutputSpec, TeacherClient
from distill_core.netutil import free_port

TOKEN = "bench-faults-token"
MIB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--slow-requests", type=int, default=64, help="requests of the slow reader (its window is 64)")
  p.add_argument("--idle-streams", type=int, default=500, help="idle Stream calls opened")
  p.add_argument("--connections", type=int, default=20, help="client connections the idle streams use")
  p.add_argument("--malformed", type=int, default=2000, help="malformed messages sent to Forward")
  p.add_argument("--json", action="store_true", help="print the results as one JSON line")
  return p.parse_args(argv)


async def slow_reader(args, address: str, metrics_url: str, pid: int) -> dict:
  tokens = np.random.default_rng(0).integers(0, 384, (64, 256), dtype=np.int32)
  spec = OutputSpec(k=128)
  async with TeacherClient(address, token=TOKEN, max_message_bytes=256 * MIB) as client:
    one = await client.stub.Forward(wire.make_request(0, tokens, spec), metadata=client.metadata)
    answer = one.ByteSize()
    rss0 = rss_bytes(pid)
    call = client.stub.Stream(metadata=client.metadata)
    for i in range(args.slow_requests):
      await call.write(wire.make_request(i, tokens, spec))
    peak, deadline = 0.0, time.monotonic() + 10
    while time.monotonic() < deadline:  # the client reads nothing
      peak = max(peak, scrape_metrics(metrics_url).get("teacher_stream_held_bytes", 0.0))
      await asyncio.sleep(0.2)
    rss1 = rss_bytes(pid)
    call.cancel()
  return {"faults_slow_reader_held_mib": peak / MIB,
          "faults_slow_reader_unbounded_mib": args.slow_requests * answer / MIB,
          "faults_slow_reader_rss_growth_mib": (rss1 - rss0) / MIB}


async def idle_streams(args, address: str) -> dict:
  clients = [TeacherClient(address, token=TOKEN, options=[("grpc.use_local_subchannel_pool", 1)])
             for _ in range(args.connections)]
  calls = [clients[i % len(clients)].stub.Stream(metadata=clients[0].metadata) for i in range(args.idle_streams)]
  await asyncio.sleep(3.0)
  refused = 0
  for c in calls:
    refused += c.done() and await c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
  health = await clients[0].health(timeout=10)
  for c in calls:
    c.cancel()
  for c in clients:
    await c.close()
  return {"faults_idle_streams_open": float(args.idle_streams - refused),
          "faults_idle_streams_refused": float(refused), "faults_health_at_cap": float(health == "SERVING")}


async def abandoned(address: str, metrics_url: str) -> dict:
  n = 40
  tokens = np.random.default_rng(1).integers(0, 384, (64, 256), dtype=np.int32)
  before = scrape_metrics(metrics_url).get("teacher_abandoned_requests_total", 0.0)
  async with TeacherClient(address, token=TOKEN) as client:
    call = client.stub.Stream(metadata=client.metadata)
    for i in range(n):
      await call.write(wire.make_request(i, tokens, OutputSpec(k=4)))
    await call.read()
    call.cancel()
    await client.forward(tokens[:8], OutputSpec(k=4), timeout=300)  # queued behind what the stream left
  dropped = scrape_metrics(metrics_url)["teacher_abandoned_requests_total"] - before
  return {"faults_abandoned_dropped_fraction": dropped / (n - 1)}


async def malformed(args, address: str, pid: int, log_path: Path) -> dict:
  rng = np.random.default_rng(2)
  blobs = [rng.bytes(int(rng.integers(1, 400))) for _ in range(args.malformed)]
  lines_before = log_path.read_text(errors="replace").count("malformed request")
  async with grpc.aio.insecure_channel(address) as channel:
    forward = channel.unary_unary("/distill.teacher.v1.Teacher/Forward")
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    rss0 = rss_bytes(pid)
    start = time.perf_counter()
    codes = {}
    for blob in blobs:
      try:
        await forward(blob, metadata=metadata, timeout=30)
        codes["OK"] = codes.get("OK", 0) + 1
      except grpc.aio.AioRpcError as e:
        codes[e.code().name] = codes.get(e.code().name, 0) + 1
    seconds = time.perf_counter() - start
    rss1 = rss_bytes(pid)
  lines = log_path.read_text(errors="replace").count("malformed request") - lines_before
  return {"faults_malformed_answers_per_s": len(blobs) / seconds,
          "faults_malformed_rss_growth_mib": (rss1 - rss0) / MIB, "faults_malformed_log_lines": float(lines),
          "faults_malformed_invalid_argument_fraction": codes.get("INVALID_ARGUMENT", 0) / len(blobs)}


UNITS = {"faults_slow_reader_held_mib": "MiB", "faults_slow_reader_unbounded_mib": "MiB",
         "faults_slow_reader_rss_growth_mib": "MiB", "faults_idle_streams_open": "streams",
         "faults_idle_streams_refused": "streams", "faults_health_at_cap": "bool",
         "faults_abandoned_dropped_fraction": "ratio", "faults_malformed_answers_per_s": "answers/s",
         "faults_malformed_rss_growth_mib": "MiB", "faults_malformed_log_lines": "lines",
         "faults_malformed_invalid_argument_fraction": "ratio"}


def main(argv=None) -> int:
  args = parse_args(argv)
  log_dir = tempfile.TemporaryDirectory(prefix="bench_faults_")
  log_path = Path(log_dir.name) / "server.log"
  server = harness.TeacherServerProcess(["model.preset=tiny", "batcher.buckets=[[8,256]]",
                                        f"security.auth_token={TOKEN}"], log_path, metrics_port=free_port(),
                                        env={"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")})
  address, url = server.address, server.metrics_url
  try:
    server.wait_serving(timeout=300)
    results = asyncio.run(slow_reader(args, address, url, server.pid))
    results.update(asyncio.run(idle_streams(args, address)))
    results.update(asyncio.run(abandoned(address, url)))
    results.update(asyncio.run(malformed(args, address, server.pid, log_path)))
    server_log = log_path.read_text(errors="replace")
  finally:
    server.stop()
    log_dir.cleanup()
  if "Traceback" in server_log:  # every fault above must be answered without one
    print(f"the server logged a traceback:\n{server_log[max(0, server_log.index('Traceback') - 1500):][:3000]}",
          file=sys.stderr)
    return 1
  record({key: (value, UNITS[key]) for key, value in results.items()})
  if args.json:
    print(json.dumps(results))
  else:
    for key, value in results.items():
      print(f"  {key:45s} {value:12,.2f} {UNITS[key]}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
