"""``python -m teacher_server.dump``: answer every example of a prepared dataset once, into shards.

    python -m teacher_server.dump data=data/stdlib output=runs/answers model-or-remote-options...

The teacher is either loaded in this process (the server's own engine and
batcher, so the answers are the server's) or asked over gRPC (``--remote``)
through the trainer's stream client (``distill_core.stream``): requests are
spread over every replica, a replica that dies, hangs or drains hands its
requests to the others, lanes reconnect with backoff, and every answer is
checked (ids in the vocabulary, the requested temperatures, one set of
teacher weights for the whole dump).
Writer i of N (``--process-index/--process-count``, default: the JAX process)
answers the i-th contiguous block of the example ids, in shards of
``records_per_shard``. Three stages overlap: the teacher (event loop, ``window``
requests in flight), an encoder thread (one record per example, ``shards.py``)
and a writer thread (ArrayRecord files, sha256, progress file, manifest merge),
joined by bounded queues. Finished shards are listed in the writer's progress
file, so a dump that is interrupted and started again keeps them (after
checking their sha256) and rewrites only the rest. Format: ``docs/offline.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import queue
import re
import sys
import threading
import time
from pathlib import Path
from typing import Awaitable

import jax
import numpy as np
import uvloop
from etils import epath

from distill_core import shards, wire
from distill_core.client import TeacherError
from distill_core.config import ConfigError, describe, load_config
from distill_core.data import Batch, DataConfig, open_split
from distill_core.logs import setup_logging
from distill_core.parts import BY_NAME, PARTS
from distill_core.progress import ProgressBar
from distill_core.sharding import maybe_initialize_distributed
from distill_core.shards import DatasetInfo, Progress, ShardError, StoredSpec, TeacherInfo
from distill_core.shards_io import ShardWriter, file_sha256
from distill_core.stream.checks import RequestShape, Requirements
from distill_core.stream.pool import Item, RemoteTeacherError
from distill_core.stream.runner import StreamRunner
from distill_core.targets import TeacherTargets, slice_batch
from teacher_server.batcher import Batcher
from teacher_server.dump_config import DumpConfig
from teacher_server.engine import JaxEngine
from teacher_server.metrics import Metrics
from teacher_server.servicer import info_message
from teacher_server.validation import prepare

log = logging.getLogger("teacher_server.dump")
_DONE = object()


@dataclasses.dataclass(frozen=True)
class Request:
  """One teacher request: examples of one shard."""

  shard: int
  ids: np.ndarray  # (B,) int64
  tokens: np.ndarray  # (B, T) int32
  segment_ids: np.ndarray
  positions: np.ndarray
  last_of_shard: bool


@dataclasses.dataclass
class DumpSummary:
  """What one writer did (also printed as the final line)."""

  writer: str
  records: int  # written by this run
  kept_shards: int  # finished by an earlier run and kept
  written_shards: int
  positions: int
  tokens: int
  bytes: int
  k: int
  wall_s: float
  teacher_busy_fraction: float | None  # in process: engine time / wall time
  manifest: shards.Manifest | None
  failovers: int | None = None  # remote: streams lost (replica died, hung or drained) whose requests went elsewhere
  retries: int | None = None  # remote: requests sent again after a failure

  @property
  def bytes_per_position(self) -> float:
    return self.bytes / max(self.positions, 1)

  @property
  def bytes_per_entry(self) -> float:
    return self.bytes / max(self.positions * self.k, 1)

  def line(self) -> str:
    busy = "n/a (remote)" if self.teacher_busy_fraction is None else f"{self.teacher_busy_fraction:.2f}"
    return (f"dump {self.writer}: {self.records} examples in {self.written_shards} new shards "
            f"({self.kept_shards} kept), {self.positions / max(self.wall_s, 1e-9):.0f} tokens/s, "
            f"{self.bytes_per_position:.1f} bytes/token, {self.bytes_per_entry:.3f} bytes per top-k entry, "
            f"teacher busy {busy}, {self.wall_s:.1f} s"
            + ("" if self.failovers is None else f", {self.failovers} failovers, {self.retries} retries"))


def writer_name(index: int, count: int) -> str:
  return f"p{index:05d}-of-{count:05d}"


_WRITER = re.compile(r"^p(\d{5})-of-(\d{5})$")


def check_layout(root, count: int) -> None:
  """Refuses to add writers of `count` to an output that holds writers of another count: the two
  layouts cut the examples differently, so their shards would overlap and the manifest count twice."""
  root = epath.Path(root)
  if not root.exists():
    return
  prefix = shards.PROGRESS_PREFIX
  names = [path.name[len(prefix):-len(".json")] for path in root.glob(f"{prefix}*.json")]
  others = sorted({int(m[2]) for name in names if (m := _WRITER.match(name)) and int(m[2]) != count})
  if others:
    raise ShardError(f"output: {root} holds a dump written by {others[0]} writer(s) (progress-p*-of-{others[0]:05d}"
                     f".json), this command is one of {count} writers (--process-count {count}); one output holds one "
                     f"layout: dump into a new output directory, or use --process-count {others[0]}")


def shard_name(writer: str, index: int) -> str:
  return f"answers-{writer}-{index:05d}{shards.SHARD_SUFFIX}"


class _Examples:
  """Random access over the answered splits' examples, in split order."""

  def __init__(self, cfg: DumpConfig):
    data_cfg = DataConfig(path=cfg.data, verify_shards=cfg.verify_data)
    self.sources = []
    for split in cfg.splits:
      self.manifest, source = open_split(data_cfg, split)
      self.sources.append(source)
    self.counts = [min(len(s), cfg.max_examples or len(s)) for s in self.sources]
    self.starts = np.cumsum([0] + self.counts)
    self._first_ids = [self.manifest.splits[split].first_example_id for split in cfg.splits]
    self.dataset = DatasetInfo(
        path=str(cfg.data), dataset_fingerprint=self.manifest.dataset_fingerprint,
        tokenizer_fingerprint=self.manifest.tokenizer_fingerprint, seq_len=self.manifest.seq_len,
        splits={split: n for split, n in zip(cfg.splits, self.counts)})

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _split_of(self, index: int) -> int:
    return int(np.searchsorted(self.starts, index, side="right")) - 1

  def example_id(self, index: int) -> int:
    """The id of example `index` without reading it (record i of a prepared split has id first + i)."""
    split = self._split_of(index)
    return self._first_ids[split] + int(index - self.starts[split])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    split = self._split_of(index)
    row = self.sources[split][int(index - self.starts[split])]
    if int(row["example_ids"]) != self.example_id(index):
      raise ShardError(f"{self.dataset.path}: example {index} of the answered splits has id {row['example_ids']}, "
                       f"expected {self.example_id(index)} (ids of a prepared split are consecutive)")
    return row


def plan(total: int, index: int, count: int, per_shard: int) -> list[np.ndarray]:
  """Example positions of writer `index` of `count`, cut into shards (deterministic)."""
  block = np.array_split(np.arange(total, dtype=np.int64), count)[index]
  return [block[i:i + per_shard] for i in range(0, len(block), per_shard)]


def _check_same(old: Progress, new: Progress, path) -> None:
  for field in ("teacher", "dataset", "spec"):
    a, b = getattr(old, field), getattr(new, field)
    if shards.differs(a, b):
      diff = [f"{key}: stored {value!r}, now {getattr(b, key)!r}" for key, value in a
              if value != getattr(b, key)]
      raise ShardError(f"{path}: this output holds answers with another {field} ({'; '.join(diff)}); "
                       "dump into a new output directory")


def kept_shards(root, progress: Progress, planned: list[list[int]]) -> list[shards.ShardInfo]:
  """The finished shards of an earlier run that are intact and match the plan (a prefix)."""
  kept = []
  for index, info in enumerate(progress.shards):
    path = root / info.file
    if (index >= len(planned) or info.file != shard_name(progress.writer, index)
        or shards.expand_runs(info.ids).tolist() != planned[index]):
      break
    if not path.exists() or file_sha256(path) != info.sha256:
      log.warning("%s: missing or its sha256 differs from the progress file; rewriting it", path)
      break
    kept.append(info)
  return kept


# -- the teacher ---------------------------------------------------------------------------------

class _InProcess:
  """The server's engine and batcher in this process."""

  def __init__(self, cfg: DumpConfig, seq_len: int):
    server = cfg.teacher
    if "buckets" not in server.batcher.model_fields_set:  # one compiled shape: the dump's requests
      server = server.model_copy(update={"batcher": server.batcher.model_copy(
          update={"buckets": [(cfg.rows_per_request, seq_len)]})})
    part_limits = {name: 0 for part in PARTS for name in part.limits}  # other parts: only those stored
    for name, request in cfg.parts:
      part_limits.update(BY_NAME[name].limits_for(request))
    limits = {key: value for key, value in (("max_k", cfg.k), ("selectable_layers", list(cfg.layers)),
                                            *part_limits.items())
              if key not in server.limits.model_fields_set}  # compute and move only what is stored
    server = server.model_copy(update={"limits": server.limits.model_copy(update=limits)})
    self.engine = JaxEngine.from_config(server)
    log.info("warm-up: %s", self.engine.warmup())
    self.metrics = Metrics()
    b = server.batcher
    self.batcher = Batcher(self.engine, max_wait_ms=b.max_wait_ms, queue_size=b.queue_size,
                           max_inflight_batches=b.max_inflight_batches, metrics=self.metrics)
    self.limits = server.limits
    self.info = info_message(self.engine.info, server)
    self.spec = cfg.output_spec()
    self._request_ids = 0

  async def __aenter__(self):
    await self.batcher.start()
    return self

  async def __aexit__(self, *exc):
    await self.batcher.close()

  async def submit(self, request: "Request") -> Awaitable[TeacherTargets]:
    self._request_ids += 1
    msg = wire.make_request(self._request_ids, request.tokens, self.spec, request.segment_ids, request.positions,
                            request.ids)
    return await self.batcher.submit(prepare(msg, self.engine.info, self.limits))

  def busy_seconds(self) -> float:
    return float(self.metrics.registry.get_sample_value("teacher_engine_seconds_sum") or 0.0)

  def counters(self) -> dict[str, int]:
    return {}


_POLL_S = 0.25  # how often a wait for an answer re-checks for fatal errors and the timeout


class _Remote:
  """Teacher server replicas through the stream client (``distill_core.stream``), as the trainer asks them."""

  def __init__(self, cfg: DumpConfig, examples: "_Examples"):
    manifest = examples.manifest
    layers = tuple(cfg.layers)
    self.need = Requirements(
        k=cfg.k, value_dtype=cfg.value_dtype, vocab_size=None, data_vocab_size=manifest.vocab_size,
        seq_len=manifest.seq_len, batch_rows=cfg.rows_per_request,
        tokenizer_fingerprint=manifest.tokenizer_fingerprint, hidden_size=None,
        feature_layers=lambda depth: layers, state_names=tuple(cfg.states) or ("attn_out",), parts=cfg.parts)
    self.cfg = cfg
    self.remote = cfg.remote
    self.runner: StreamRunner | None = None
    self.info = None

  async def __aenter__(self):
    self.runner = StreamRunner(self.remote, self.need, place=lambda targets: targets,
                               shape=RequestShape.of(self.cfg), options="remote.")
    try:
      contact = await asyncio.to_thread(self.runner.core.first_contact.wait, self.remote.timeout_s)
      self.runner.raise_if_fatal()
      if not contact:
        raise RemoteTeacherError(f"no teacher reachable at {self.remote.address} after {self.remote.timeout_s:g} s "
                                 f"({self.runner.describe()}{self.runner.diagnosis()})")
    except BaseException:
      self.runner.close()
      raise
    self.info = self.runner.core.info
    log.info("teacher: %d replica address(es), weights %s...", len(self.remote.addresses),
             self.info.weights_fingerprint[:16])
    return self

  async def __aexit__(self, *exc):
    await asyncio.to_thread(self.runner.close)

  async def submit(self, request: "Request") -> Awaitable[TeacherTargets]:
    batch = Batch.from_examples({"example_ids": request.ids, "tokens": request.tokens,
                                 "segment_ids": request.segment_ids, "positions": request.positions})
    return self._answer(self.runner.enqueue(batch, tuple(self.cfg.temperatures)))

  async def _answer(self, item: Item) -> TeacherTargets:
    """The item's targets; stops after remote.timeout_s without any answer (every replica down or silent)."""
    timeout = self.remote.timeout_s
    while not await asyncio.to_thread(item.done.wait, _POLL_S):
      self.runner.raise_if_fatal()
      stalled = time.monotonic() - max(self.runner.core.last_progress, item.created)
      if stalled > timeout:
        raise RemoteTeacherError(f"no answer from the teacher for {stalled:.0f} s (remote.timeout_s={timeout:g}); "
                                 f"replicas: {self.runner.describe()}{self.runner.diagnosis()}")
    if item.error is not None:
      raise RemoteTeacherError(str(item.error)) from item.error
    if item.weights != self.info.weights_fingerprint:  # on_weights_change=stop makes this unreachable
      raise RemoteTeacherError(f"answers from teacher weights {item.weights[:16]}..., the dump started with "
                               f"{self.info.weights_fingerprint[:16]}...")
    return item.targets

  def busy_seconds(self) -> None:
    return None

  def counters(self) -> dict[str, int]:
    """Failovers and retries of the stream client so far."""
    totals = self.runner.stats.totals
    return {"failovers": totals["failovers"], "retries": totals["retries"]}


def stored_spec(cfg: DumpConfig, info) -> StoredSpec:
  return StoredSpec.build(cfg.output_spec(), id_bits=wire.bits_for(info.vocab_size) if cfg.pack_ids else 0,
                          value_coding=cfg.value_coding, zstd_level=cfg.zstd_level)


# -- the pipeline --------------------------------------------------------------------------------

class _Progress:
  """The dump's progress (examples, tokens/s, ETA): a bar on a terminal, a log line every 10 s otherwise."""

  def __init__(self, total: int, done: int, enabled: bool, writer: str):
    self._start, self._tokens = time.monotonic(), 0
    self._bar = ProgressBar(enabled=enabled, logger=log)
    self._task = self._bar.add_task(f"dump {writer}", total=total, completed=done, info="- tokens/s")

  def advance(self, examples: int, positions: int) -> None:
    self._tokens += positions
    rate = self._tokens / max(time.monotonic() - self._start, 1e-9)
    self._bar.update(self._task, advance=examples, info=f"examples, {rate:.0f} tokens/s")

  def close(self) -> None:
    self._bar.close()


def _encode_loop(inbox: queue.Queue, outbox: queue.Queue, spec: StoredSpec, weights_fingerprint: str,
                 errors: list) -> None:
  """Encoder thread: one answer of B rows -> B records."""
  try:
    while (item := inbox.get()) is not _DONE:
      request, targets = item
      records = []
      for row, example_id in enumerate(request.ids.tolist()):
        one = slice_batch(targets, row, row + 1)
        record = shards.encode_record(example_id, one, spec, weights_fingerprint=weights_fingerprint)
        records.append((example_id, record,
                        int(np.count_nonzero(request.segment_ids[row]))))
      outbox.put((request, records, tuple(float(t) for t in np.asarray(targets.temperatures))))
  except BaseException as e:  # noqa: BLE001 - reported by the main thread
    errors.append(e)
    while inbox.get() is not _DONE:  # keep draining so the teacher side never blocks
      pass
  finally:
    outbox.put(_DONE)


def _write_loop(inbox: queue.Queue, writer: ShardWriter, bar: _Progress, seq_len: int, errors: list,
                totals: dict) -> None:
  """Writer thread: records -> shard files; finishes a shard at its planned end."""
  try:
    while (item := inbox.get()) is not _DONE:
      request, records, temps = item
      for example_id, record, tokens in records:
        writer.add(example_id, record, positions=seq_len, tokens=tokens, temperatures=temps)
        totals["records"] += 1
        totals["tokens"] += tokens
      if request.last_of_shard:
        info = writer.finish_shard()
        totals["bytes"] += info.bytes
        totals["shards"] += 1
      bar.advance(len(records), len(records) * seq_len)
  except BaseException as e:  # noqa: BLE001 - reported by the main thread
    errors.append(e)
    while inbox.get() is not _DONE:  # keep draining so the encoder never blocks
      pass


async def _run(cfg: DumpConfig, index: int, count: int) -> DumpSummary:
  examples = _Examples(cfg)
  seq_len = examples.dataset.seq_len
  teacher = _Remote(cfg, examples) if cfg.remote.address else _InProcess(cfg, seq_len)
  async with teacher:
    info = teacher.info
    name = writer_name(index, count)
    root = epath.Path(cfg.output)
    root.mkdir(parents=True, exist_ok=True)
    header = Progress(teacher=TeacherInfo.from_info(info), dataset=examples.dataset,
                      spec=stored_spec(cfg, info), writer=name)
    if info.tokenizer_fingerprint and info.tokenizer_fingerprint != examples.dataset.tokenizer_fingerprint:
      raise ShardError(f"tokenizer: the teacher's fingerprint {info.tokenizer_fingerprint[:16]}... differs from "
                       f"the dataset's {examples.dataset.tokenizer_fingerprint[:16]}...")
    shard_plan = plan(len(examples), index, count, cfg.records_per_shard)
    planned_ids = [[examples.example_id(int(i)) for i in positions] for positions in shard_plan]
    old = shards.read_progress(root, name)
    kept: list[shards.ShardInfo] = []
    if old is not None:
      _check_same(old, header, shards.progress_path(root, name))
      kept = kept_shards(root, old, planned_ids)
      if kept:
        log.info("resuming: %d of %d shards are finished and intact", len(kept), len(shard_plan))
    progress = header.model_copy(update={"shards": kept})
    shards.write_progress(root, progress)
    writer = ShardWriter(root, progress, name_of=lambda i: shard_name(name, i), next_index=len(kept),
                         records_per_shard=cfg.records_per_shard + 1)  # shards end where planned
    todo = shard_plan[len(kept):]
    done_examples = sum(len(p) for p in shard_plan[:len(kept)])
    bar = _Progress(sum(len(p) for p in shard_plan), done_examples, cfg.progress, name)
    to_encode: queue.Queue = queue.Queue(cfg.queue_size)
    to_write: queue.Queue = queue.Queue(cfg.queue_size)
    errors: list[BaseException] = []
    totals = dict(records=0, tokens=0, bytes=0, shards=0)
    threads = [threading.Thread(target=_encode_loop,
                                args=(to_encode, to_write, header.spec, header.teacher.weights_fingerprint, errors),
                                name="dump-encode", daemon=True),
               threading.Thread(target=_write_loop, args=(to_write, writer, bar, seq_len, errors, totals),
                                name="dump-write", daemon=True)]
    for thread in threads:
      thread.start()
    start = time.monotonic()
    busy0 = teacher.busy_seconds()
    try:
      await _produce(cfg, examples, todo, len(kept), teacher, to_encode, errors)
    finally:
      await asyncio.to_thread(to_encode.put, _DONE)
      for thread in threads:
        await asyncio.to_thread(thread.join)
      bar.close()
      writer.close(keep_partial=False)
    if errors:
      raise errors[0]
    wall = time.monotonic() - start
    busy = teacher.busy_seconds()
    counters = teacher.counters()
    manifest = shards.write_manifest(root)
  return DumpSummary(writer=name, records=totals["records"], kept_shards=len(kept), written_shards=totals["shards"],
                     positions=totals["records"] * seq_len, tokens=totals["tokens"], bytes=totals["bytes"], k=cfg.k,
                     wall_s=wall, teacher_busy_fraction=None if busy is None else (busy - busy0) / max(wall, 1e-9),
                     manifest=manifest, **counters)


async def _produce(cfg: DumpConfig, examples: _Examples, todo: list[np.ndarray], first_shard: int, teacher,
                   to_encode: queue.Queue, errors: list) -> None:
  """Sends every request (``window`` in flight) and hands the answers, in order, to the encoder."""
  inflight: list[tuple[Request, Awaitable]] = []

  async def settle(request: Request, future) -> None:
    targets = await future
    await asyncio.to_thread(to_encode.put, (request, targets))

  for shard, positions in enumerate(todo, start=first_shard):
    for lo in range(0, len(positions), cfg.rows_per_request):
      if errors:
        return
      rows = [examples[int(i)] for i in positions[lo:lo + cfg.rows_per_request]]
      request = Request(shard=shard, ids=np.asarray([r["example_ids"] for r in rows], np.int64),
                        tokens=np.stack([r["tokens"] for r in rows]),
                        segment_ids=np.stack([r["segment_ids"] for r in rows]),
                        positions=np.stack([r["positions"] for r in rows]),
                        last_of_shard=lo + cfg.rows_per_request >= len(positions))
      inflight.append((request, await teacher.submit(request)))
      if len(inflight) >= cfg.window:
        await settle(*inflight.pop(0))
  for request, future in inflight:
    await settle(request, future)


def dump(cfg: DumpConfig) -> DumpSummary:
  """Runs one writer of the dump described by `cfg` (see the module docstring)."""
  index, count = cfg.process_index, cfg.process_count
  if index is None or count is None:
    maybe_initialize_distributed()
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
  if index >= count:
    raise ValueError(f"process_index {index} must be < process_count {count}")
  check_layout(cfg.output, count)  # before the teacher is loaded
  with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
    return runner.run(_run(cfg, index, count))


# -- command line --------------------------------------------------------------------------------

_EPILOG = """\
Examples:
  python -m teacher_server.dump teacher.model.source=hf teacher.model.path=runs/demo/teacher/hf
  python -m teacher_server.dump --remote 127.0.0.1:50051 k=128 zstd_level=3
  python -m teacher_server.dump 'remote.address=[10.0.0.5:50051,10.0.0.6:50051]'   # replicas, with failover
  python -m teacher_server.dump --process-index 1 --process-count 4 ...   # writer 1 of 4

Options (key=value, nested keys with dots):
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m teacher_server.dump", add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Answer every example of a prepared dataset with a teacher, once, into ArrayRecord shards "
                  "that the `offline` teacher source reads (docs/offline.md).",
      epilog=_EPILOG + "\n".join("  " + line for line in describe(DumpConfig)))
  parser.add_argument("-h", "--help", action="help", help="show this help (every option) and exit")
  parser.add_argument("--config", help="YAML config file (may name a `base:` file)")
  parser.add_argument("--remote", metavar="ADDRESS", help="ask the teacher server at ADDRESS (= remote.address; for several replicas, "
                      "which the dump fails over between, remote.address=[A,B])")
  parser.add_argument("--process-index", type=int, help="this writer's index (= process_index)")
  parser.add_argument("--process-count", type=int, help="number of writers (= process_count)")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
  return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  overrides = list(args.overrides)
  if args.remote:
    overrides.append(f"remote.address={args.remote}")
  if args.process_index is not None:
    overrides.append(f"process_index={args.process_index}")
  if args.process_count is not None:
    overrides.append(f"process_count={args.process_count}")
  try:
    cfg = load_config(DumpConfig, args.config, overrides)
  except ConfigError as e:
    print(f"dump: {e}", file=sys.stderr)
    return 2
  setup_logging(cfg.teacher.log_format, cfg.teacher.log_level)
  try:
    summary = dump(cfg)
  except (ShardError, ValueError, OSError, TeacherError, RemoteTeacherError) as e:
    print(f"dump: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(f"dump: interrupted; the finished shards in {cfg.output} are kept: run the same command again to "
          "resume", file=sys.stderr)
    return 130
  print(summary.line(), flush=True)
  if summary.manifest is not None:
    m = summary.manifest
    print(f"manifest {Path(cfg.output) / shards.MANIFEST_NAME}: {m.records} records in {len(m.shards)} shards from "
          f"{len(m.writers)} writers, complete={m.complete}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
