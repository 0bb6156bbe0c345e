"""What blockwise distillation costs in bandwidth, and what the student gets from a remote teacher.

    python -m benchmarks.bench_blockwise                    # demo_student (2 layers) <- demo_teacher layers 1, 3
    python -m benchmarks.bench_blockwise --student tiny --teacher tiny --layer-map 0,1 --seq-len 32 --steps 10

Four measurements in one run, on the same teacher weights and shapes:

1. Engine host bytes per batch (in a child process): what the teacher engine
   copies from its device to the host for one blockwise batch (top-k at k in
   the value dtype, attn_in and attn_out of the mapped layers in bfloat16).
2. State bytes per token on the wire: one real `Forward` answer of the teacher
   server, its layer-state tensors' bytes divided by B * T.
3. Served-state bandwidth: blockwise requests streamed to the teacher server
   (window `--window`, answers read as raw bytes), bytes per second, against the
   loopback gRPC bandwidth of a server that streams a prepared message of the
   same size (no model), measured the same way. Their ratio is
   `state_bandwidth_fraction` (1.0: serving states is as fast as the transport).
4. Student tokens/s in blockwise mode with the remote teacher vs the same
   targets (states included) already in memory (`blockwise_streaming_efficiency`).

Servers run in child processes on the second half of the cores, the student on
the first (as in bench_streaming). The teacher server and the loopback server
are up together, and each ratio's two sides are interleaved over `--rounds`
rounds (served, loopback, served, ...; memory, remote, memory, ...): each ratio
is the median of its rounds' ratios with the lowest and highest round
(benchmarks.common.paired_ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from benchmarks.bench_streaming import REPO, core_split
from benchmarks.common import (interleaved, measured_intervals, paired_ratio, precompute_targets, run_from_memory,
                               weighted)
from benchmarks.results import record
from distill_core import harness, wire
from distill_core.config import build, load_config, resolve_preset
from distill_core.harness import pinned
from distill_core.model.config import ModelConfig
from distill_core.netutil import free_port
from distill_core.prepare import PrepareConfig, prepare
from distill_core.proto import teacher_pb2 as pb
from distill_core.wire import OutputSpec
from student_trainer import train
from student_trainer.config import TrainConfig
from teacher_server.config import ServerConfig
from teacher_server.engine import JaxEngine
from teacher_server.engine_api import EngineBatch, Fetch

PHASES = ("memory", "remote")  # training runs; "engine" is the host-bytes measurement
_STREAM = "/distill.teacher.v1.Teacher/Stream"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--student", default="demo_student", help="student model preset (configs/models)")
  p.add_argument("--teacher", default="demo_teacher", help="teacher model preset (same width and vocabulary)")
  p.add_argument("--layer-map", default="1,3", help="teacher layer of each student layer, comma-separated")
  p.add_argument("--batch", type=int, default=8, help="global batch B (and the server's bucket batch)")
  p.add_argument("--seq-len", type=int, default=128, help="sequence length T")
  p.add_argument("--k", type=int, default=64, help="top-k teacher ids per position")
  p.add_argument("--max-k", type=int, default=128, help="the server's limits.max_k")
  p.add_argument("--window", type=int, default=4, help="requests in flight (bandwidth) and prefetch window")
  p.add_argument("--requests", type=int, default=40, help="requests per bandwidth measurement")
  p.add_argument("--log-every", type=int, default=5, help="steps per training measurement interval")
  p.add_argument("--steps", type=int, default=20, help="measured training steps (after one warm-up interval)")
  p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each ratio's two sides")
  p.add_argument("--max-files", type=int, default=200, help="standard-library files in the benchmark corpus")
  p.add_argument("--workdir", default="runs/bench_blockwise", help="data and run directories")
  p.add_argument("--json", action="store_true", help="print the results as one JSON object")
  p.add_argument("--phase", choices=(*PHASES, "engine"), help=argparse.SUPPRESS)  # child process: one phase
  p.add_argument("--address", help=argparse.SUPPRESS)
  p.add_argument("--loopback-server", type=int, metavar="BYTES", help=argparse.SUPPRESS)  # child: raw server
  return p.parse_args(argv)


def layer_map(args) -> list[int]:
  return [int(x) for x in args.layer_map.split(",")]


def data_dir(args) -> Path:
  return Path(args.workdir) / f"data_{args.student}_T{args.seq_len}"


def server_overrides(args) -> list[str]:
  return ["model.source=preset", f"model.preset={args.teacher}", "model.seed=0",
          f"batcher.buckets=[[{args.batch},{args.seq_len}]]", f"limits.max_k={args.max_k}",
          f"limits.max_batch={args.batch}", f"limits.max_tokens_per_request={args.batch * args.seq_len}",
          "batcher.max_wait_ms=2"]


def blockwise_spec(args):
  return OutputSpec(k=args.k, layers=tuple(sorted(set(layer_map(args)))), states=("attn_in", "attn_out"),
                    state_dtype="bfloat16", pack_ids=True)


# -- 1. engine host bytes ---------------------------------------------------------------------------


def engine_bytes(args) -> dict:
  engine = JaxEngine.from_config(load_config(ServerConfig, None, server_overrides(args)))
  info, spec = engine.info, blockwise_spec(args)
  b, t = args.batch, args.seq_len
  ones = np.ones((b, t), np.int32)
  fetch = Fetch(k=spec.k, value_dtype=spec.value_dtype, layers=spec.layers, states=spec.states,
                state_dtype=spec.state_dtype)
  engine.forward(EngineBatch(np.zeros((b, t), np.int32), ones, np.cumsum(ones, 1, dtype=np.int32) - 1,
                             np.ones((b, info.max_temperatures), np.float32), fetch))
  return {"host_bytes": engine.last_host_bytes}


# -- 2./3. wire bytes and bandwidth -----------------------------------------------------------------


async def stream_bytes(address: str, requests: list[bytes], window: int) -> tuple[float, int, int]:
  """(seconds, response bytes, responses) for `requests` streamed `window` ahead, answers kept raw."""
  async with grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 30),
                                                          ("grpc.max_send_message_length", 1 << 30)]) as channel:
    call = channel.stream_stream(_STREAM, request_serializer=lambda b: b, response_deserializer=lambda b: b)()
    answered = asyncio.Semaphore(window)
    sizes: list[int] = []

    async def send():
      for request in requests:
        await answered.acquire()
        await call.write(request)
      await call.done_writing()

    start = time.perf_counter()
    writer = asyncio.create_task(send())
    async for response in call:
      sizes.append(len(response))
      answered.release()
    await writer
    return time.perf_counter() - start, sum(sizes), len(sizes)


def blockwise_requests(args) -> list[bytes]:
  rng = np.random.default_rng(0)
  tokens = [rng.integers(0, 256, (args.batch, args.seq_len), dtype=np.int32) for _ in range(4)]
  return [wire.make_request(i, tokens[i % 4], blockwise_spec(args)).SerializeToString()
          for i in range(args.requests)]


def answer_sizes(args, address: str) -> dict:
  """Bytes of one real blockwise answer: its message, its states per token, the whole answer per token."""
  one = pb.ForwardResponse.FromString(_first_answer(address, blockwise_requests(args)[0]))
  state_bytes = sum(len(t.data) for t in one.layer_states.values())
  return {"message_bytes": one.ByteSize(), "state_bytes_per_token": state_bytes / (args.batch * args.seq_len),
          "response_bytes_per_token": one.ByteSize() / (args.batch * args.seq_len)}


def stream_bandwidth(args, address: str, requests: list[bytes]) -> float:
  """Answer bytes per second of `requests` streamed `--window` ahead (after a warm-up of two windows)."""
  asyncio.run(stream_bytes(address, requests[:args.window * 2], args.window))  # warm the connection and code
  seconds, total, _ = asyncio.run(stream_bytes(address, requests, args.window))
  return total / seconds


def _first_answer(address: str, request: bytes) -> bytes:
  with grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 1 << 30)]) as channel:
    call = channel.unary_unary("/distill.teacher.v1.Teacher/Forward", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
    return call(request, timeout=600)


def loopback_server(size: int, port: int) -> None:
  """Child process: answers every Stream request with a prepared `size`-byte message (no model)."""
  message = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()

  async def stream(requests, context):
    async for _ in requests:
      yield message

  async def serve():
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 1 << 30),
                                      ("grpc.max_receive_message_length", 1 << 30)])
    handler = grpc.stream_stream_rpc_method_handler(stream, request_deserializer=lambda b: b,
                                                    response_serializer=lambda b: b)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("distill.teacher.v1.Teacher",
                                                                          {"Stream": handler})])
    checker = health.aio.HealthServicer()
    await checker.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()

  asyncio.run(serve())


def start_loopback(message_bytes: int, cores):
  """The loopback server answering `message_bytes`-byte messages, serving (a `distill_core.harness.ServerProcess`)."""
  address = f"127.0.0.1:{free_port()}"
  return harness.ServerProcess([sys.executable, "-m", "benchmarks.bench_blockwise",
                                f"--loopback-server={message_bytes}", f"--address={address}"], address,
                               cores=cores).wait_serving(timeout=120)


# -- 4. student tokens/s ----------------------------------------------------------------------------


def train_overrides(args, phase: str) -> list[str]:
  total = args.log_every + args.steps
  common = [f"run_dir={Path(args.workdir) / phase}", f"data.path={data_dir(args)}", f"data.batch_size={args.batch}",
            f"model={args.student}", f"steps={total + 1}", f"logging.every_steps={args.log_every}",
            "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0", "checkpoint.resume=false",
            f"checkpoint.every_steps={total + 1}", "export_hf=false", "mesh.data=1", f"loss.top_k={args.k}",
            "loss.blockwise=true", f"loss.layer_map=[{args.layer_map}]", "teacher.source=remote",
            f"teacher.remote.address={args.address}", f"teacher.remote.window={args.window}"]
  return common


def run_phase(args) -> dict:
  """Child process: one blockwise training run (from the remote teacher or from memory)."""
  cfg = load_config(TrainConfig, None, train_overrides(args, args.phase))
  total = args.log_every + args.steps
  shutil.rmtree(cfg.run_dir, ignore_errors=True)
  if args.phase == "memory":  # the same answers (states included), fetched first, served from memory
    run_from_memory(cfg, precompute_targets(cfg, total), stop_after=total)
  else:
    train.run(cfg, stop_after=total)
  rows, walls, wall = measured_intervals(cfg.run_dir, args.log_every)
  return {"tokens_per_s": weighted(rows, walls, wall, "perf/tokens_per_s"),
          "teacher_wait_fraction": weighted(rows, walls, wall, "perf/teacher_wait_fraction"),
          "feature_loss": rows[-1]["train/feature_loss"]}


def child(args, phase: str, cores, address: str) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.bench_blockwise", f"--phase={phase}", f"--address={address}",
         f"--student={args.student}", f"--teacher={args.teacher}", f"--layer-map={args.layer_map}",
         f"--batch={args.batch}", f"--seq-len={args.seq_len}", f"--k={args.k}", f"--max-k={args.max_k}",
         f"--window={args.window}",
         f"--log-every={args.log_every}", f"--steps={args.steps}", f"--workdir={args.workdir}"]
  env = harness.child_env(harness.cpu_env(1))  # one CPU device
  out = subprocess.run(cmd, cwd=REPO, env=env, preexec_fn=pinned(cores), capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"phase {phase} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.loopback_server:
    loopback_server(args.loopback_server, int(args.address.rpartition(":")[2]))
    return 0
  if args.phase:  # JAX runs in child processes only, so the parent can fork the servers safely
    print(json.dumps(engine_bytes(args) if args.phase == "engine" else run_phase(args)))
    return 0
  vocab = build(ModelConfig, resolve_preset(args.teacher)).real_vocab_size
  prepare(PrepareConfig(max_files=args.max_files, vocab_size=vocab, seq_len=args.seq_len,
                        output_dir=str(data_dir(args))), show_progress=False)
  student_cores, teacher_cores = core_split()
  host = child(args, "engine", teacher_cores, "")
  server = harness.TeacherServerProcess(["log_level=WARNING", *server_overrides(args),
                                   f"tokenizer_path={data_dir(args) / 'tokenizer.json'}"],
                                  env=harness.cpu_env(1), cores=teacher_cores)
  address = server.address
  loopback = None
  try:
    server.wait_serving(timeout=600)
    sizes = answer_sizes(args, address)
    loopback = start_loopback(sizes["message_bytes"], teacher_cores)
    loopback_address = loopback.address
    zeros = np.zeros((args.batch, args.seq_len), np.int32)
    same_size = [wire.make_request(0, zeros, blockwise_spec(args)).SerializeToString()] * args.requests
    bandwidth = interleaved({"served": lambda: stream_bandwidth(args, address, blockwise_requests(args)),
                             "loopback": lambda: stream_bandwidth(args, loopback_address, same_size)}, args.rounds)
    args.address = address
    training = interleaved({phase: (lambda phase=phase: child(args, phase, student_cores, address)["tokens_per_s"])
                            for phase in PHASES}, args.rounds)
  finally:
    for proc in (server, loopback):
      if proc is not None:
        proc.stop()
  figures = {
      "engine_host_bytes_per_batch": (host["host_bytes"], "bytes"),
      "state_bytes_per_token": (sizes["state_bytes_per_token"], "bytes/token"),
      "blockwise_response_bytes_per_token": (sizes["response_bytes_per_token"], "bytes/token"),
      "served_state_mb_per_s": (statistics.median(bandwidth["served"]) / 1e6, "MB/s"),
      "loopback_grpc_mb_per_s": (statistics.median(bandwidth["loopback"]) / 1e6, "MB/s"),
      "state_bandwidth_fraction": (paired_ratio(bandwidth["served"], bandwidth["loopback"], limit=1.0,
                                                why="the teacher's answers travel over the same transport"),
                                   "ratio"),
      "blockwise_memory_tokens_per_s": (statistics.median(training["memory"]), "tokens/s"),
      "blockwise_remote_tokens_per_s": (statistics.median(training["remote"]), "tokens/s"),
      "blockwise_streaming_efficiency": (paired_ratio(training["remote"], training["memory"], limit=1.0,
                                                      why="streaming cannot beat the same answers in memory"),
                                         "ratio"),
  }
  record(figures)
  if args.json:
    print(json.dumps({key: getattr(value, "value", value) for key, (value, _) in figures.items()}))
    return 0
  print(f"student {args.student} <- teacher {args.teacher} layers [{args.layer_map}], B={args.batch} "
        f"T={args.seq_len} k={args.k}, window {args.window}; servers on cores {sorted(teacher_cores or [])}, "
        f"student on {sorted(student_cores or [])}")
  print(f"  {args.rounds} interleaved rounds: medians; ratios are the median of the rounds' ratios "
        f"[lowest, highest]")
  for key, (value, unit) in figures.items():
    spread = f" [{value.low:.3f}, {value.high:.3f}]" if hasattr(value, "rounds") else ""
    print(f"  {key:40s} {getattr(value, 'value', value):14,.3f} {unit}{spread}")
    if getattr(value, "note", None):
      print(f"    note: {value.note}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
