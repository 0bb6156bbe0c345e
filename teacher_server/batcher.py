"""Packs requests from every stream and client into the engine's bucket shapes.

One bounded asyncio queue takes validated requests from all calls. A loop moves
them into per-(length, state dtype or none, other parts asked for) groups (one compiled engine program each),
splitting requests along B: a
request whose batch exceeds the largest bucket batch of its length is spread
over several engine batches and reassembled. A group is flushed when it fills
its largest bucket batch or when its oldest row has waited ``max_wait_ms``;
the smallest bucket batch that holds the rows is used, padded with segment id
0. The engine runs on one worker thread (the event loop stays responsive), at
most ``max_inflight_batches`` at a time. Each batch asks the engine for the union
of its requests' outputs (``Fetch.union``), so only that leaves the device;
per-request slicing (k, length, temperatures, layers) and the rare host cast
(a batch mixing value dtypes) happen on that thread.

Backpressure: :meth:`Batcher.submit` waits while the queue is full (a stream's
reading slows down); :meth:`Batcher.submit_nowait` raises :class:`QueueFullError`.

Abandoned work: a caller that goes away (a cancelled stream or call) cancels its
futures. Cancelled requests, and the rows of a split request not yet run, are
dropped before they reach the engine (counted in ``teacher_abandoned_requests``);
only the live rows of a batch are computed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import concurrent.futures
import dataclasses
import logging
import time

import grpc
import numpy as np

from distill_core.parts import BY_NAME, PARTS
from distill_core.targets import TeacherTargets, concat
from teacher_server.engine_api import Engine, EngineBatch, EngineOutput, Fetch
from teacher_server.metrics import Metrics
from teacher_server.validation import Prepared, RequestError

log = logging.getLogger(__name__)


def new_future() -> asyncio.Future:
  """A future whose exception counts as retrieved even if its caller went away (no GC warnings)."""
  future = asyncio.get_running_loop().create_future()
  future.add_done_callback(lambda f: f.cancelled() or f.exception())
  return future


class QueueFullError(Exception):
  """The batcher queue is full (answered as RESOURCE_EXHAUSTED)."""


class ShuttingDownError(Exception):
  """The batcher no longer accepts requests (answered as UNAVAILABLE)."""


_Key = tuple[int, "np.dtype | None", tuple[str, ...]]  # length, state dtype, the other parts asked for


@dataclasses.dataclass
class _Job:
  req: Prepared
  future: asyncio.Future
  pieces: dict[int, TeacherTargets] = dataclasses.field(default_factory=dict)  # first row -> piece
  rows_done: int = 0
  dropped: bool = False  # counted as abandoned


@dataclasses.dataclass
class _Slice:
  job: _Job
  start: int
  stop: int
  arrived: float


def extract(out: EngineOutput, row: int, req: Prepared, start: int, stop: int) -> TeacherTargets:
  """Rows ``[start, stop)`` of ``req``, found at batch row ``row``, trimmed and cast by every part (host copies)."""
  rows = slice(row, row + stop - start)
  return TeacherTargets(**{key: value for part in PARTS for key, value in
                           part.from_engine(out, rows, req.length, req).items()})


class Batcher:
  """Bounded request queue -> bucket-shaped engine batches -> per-request futures."""

  def __init__(self, engine: Engine, *, max_wait_ms: float, queue_size: int, max_inflight_batches: int,
               metrics: Metrics | None = None):
    self._engine = engine
    self._info = engine.info
    self._max_wait = max_wait_ms / 1000.0
    self._queue_size = queue_size
    self._max_inflight = max_inflight_batches
    self._metrics = metrics or Metrics()
    self._batches_for: dict[int, list[int]] = collections.defaultdict(list)
    for b, t in self._info.buckets:
      self._batches_for[t].append(b)
    for sizes in self._batches_for.values():
      sizes.sort()
    self._lengths = sorted(self._batches_for)
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="engine")
    self._pending: dict[_Key, collections.deque[_Slice]] = {}
    self._tasks: set[asyncio.Task] = set()
    self._closing = False
    self._loop_task: asyncio.Task | None = None

  async def start(self) -> None:
    self._queue: asyncio.Queue[_Job] = asyncio.Queue(self._queue_size)
    self._wakeup = asyncio.Event()
    self._inflight = asyncio.Semaphore(self._max_inflight)
    self._loop_task = asyncio.create_task(self._run(), name="batcher")

  def _job(self, req: Prepared) -> _Job:
    if self._closing:
      raise ShuttingDownError("the server is shutting down")
    return _Job(req, new_future())

  async def submit(self, req: Prepared) -> asyncio.Future:
    """Queues ``req`` (waiting while the queue is full); the future yields ``TeacherTargets``."""
    job = self._job(req)
    await self._queue.put(job)
    self._queued()
    return job.future

  def submit_nowait(self, req: Prepared) -> asyncio.Future:
    """Like :meth:`submit` but raises :class:`QueueFullError` instead of waiting."""
    job = self._job(req)
    try:
      self._queue.put_nowait(job)
    except asyncio.QueueFull:
      raise QueueFullError(f"request queue full ({self._queue_size} requests waiting)") from None
    self._queued()
    return job.future

  def _queued(self) -> None:
    self._metrics.queue_depth.set(self._queue.qsize())
    self._wakeup.set()

  async def close(self) -> None:
    """Stops accepting, answers everything queued or running, then stops the worker thread."""
    self._closing = True
    if self._loop_task is not None:
      self._wakeup.set()
      await self._loop_task
    while not self._queue.empty():  # put by callers that were waiting for room as the loop ended
      job = self._queue.get_nowait()
      job.future.done() or job.future.set_exception(ShuttingDownError("the server is shutting down"))
    self._executor.shutdown(wait=True)

  def _length_class(self, t: int) -> int:
    for length in self._lengths:
      if length >= t:
        return length
    raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "tokens",
                       f"length {t} exceeds the longest bucket ({self._lengths[-1]})")

  async def _run(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      while not self._queue.empty():
        job = self._queue.get_nowait()
        self._metrics.queue_depth.set(self._queue.qsize())
        if self._abandoned(job):
          continue
        try:
          key = (self._length_class(job.req.length), job.req.fetch.state_dtype, job.req.part_names)
        except RequestError as e:
          job.future.done() or job.future.set_exception(e)
          continue
        self._pending.setdefault(key, collections.deque()).append(_Slice(job, 0, job.req.rows, loop.time()))
        await self._flush(force=False, full_only=True)
      await self._flush(force=self._closing, full_only=False)
      if self._closing and self._queue.empty() and not self._pending:
        break
      deadlines = [q[0].arrived + self._max_wait for q in self._pending.values()]
      timeout = max(0.0, min(deadlines) - loop.time()) if deadlines else None
      self._wakeup.clear()
      if self._queue.empty() and not self._closing:
        try:
          await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
          pass
    if self._tasks:
      await asyncio.gather(*self._tasks, return_exceptions=True)

  def _abandoned(self, job: _Job) -> bool:
    """True when the job's caller went away (its future is done); counts it once."""
    if not job.future.done():
      return False
    if job.future.cancelled() and not job.dropped:
      job.dropped = True
      self._metrics.abandoned.inc()
    return True

  async def _flush(self, *, force: bool, full_only: bool) -> None:
    now = asyncio.get_running_loop().time()
    for key in list(self._pending):
      queue = self._pending[key]
      if any(s.job.future.done() for s in queue):  # drop the rows of callers that went away
        kept = [s for s in queue if not self._abandoned(s.job)]
        queue.clear()
        queue.extend(kept)
      max_rows = self._batches_for[key[0]][-1]
      while queue:
        rows = sum(s.stop - s.start for s in queue)
        due = force or (not full_only and now - queue[0].arrived >= self._max_wait)
        if rows < max_rows and not due:
          break
        await self._dispatch(key, queue, max_rows)
      if not queue:
        del self._pending[key]

  async def _dispatch(self, key: _Key, queue: collections.deque[_Slice], max_rows: int) -> None:
    taken: list[_Slice] = []
    rows = 0
    while queue and rows < max_rows:
      s = queue[0]
      n = min(s.stop - s.start, max_rows - rows)
      if s.start + n < s.stop:  # split: the rest stays queued
        taken.append(_Slice(s.job, s.start, s.start + n, s.arrived))
        s.start += n
      else:
        taken.append(queue.popleft())
      rows += n
    await self._inflight.acquire()
    # Callers may have gone away while the engine was busy: run only the rows still wanted.
    taken = [s for s in taken if not self._abandoned(s.job)]
    if not taken:
      self._inflight.release()
      return
    rows = sum(s.stop - s.start for s in taken)
    task = asyncio.create_task(self._execute(key, taken, rows))
    self._tasks.add(task)
    task.add_done_callback(self._tasks.discard)

  def _build(self, key: _Key, taken: list[_Slice], rows: int) -> EngineBatch:
    length, _, names = key
    bb = next(b for b in self._batches_for[length] if b >= rows)
    tokens = np.zeros((bb, length), np.int32)
    segments = np.zeros((bb, length), np.int32)
    positions = np.zeros((bb, length), np.int32)
    temps = np.ones((bb, self._info.max_temperatures), np.float32)
    limits = self._info.part_limits
    inputs = {name: BY_NAME[name].engine_inputs(bb, length, limits) for name in names}
    row = 0
    for s in taken:
      req, n = s.job.req, s.stop - s.start
      tokens[row:row + n, :req.length] = req.tokens[s.start:s.stop]
      segments[row:row + n, :req.length] = req.segment_ids[s.start:s.stop]
      positions[row:row + n, :req.length] = req.positions[s.start:s.stop]
      temps[row:row + n, :len(req.temperatures)] = req.temperatures
      for name, request in req.parts:
        BY_NAME[name].fill_inputs(inputs[name], slice(row, row + n), request, req.inputs[name], s.start, s.stop)
      row += n
    fetch = Fetch.union([s.job.req.fetch for s in taken], self._info.selectable_layers)
    return EngineBatch(tokens, segments, positions, temps, fetch, inputs)

  def _run_engine(self, batch: EngineBatch, taken: list[_Slice]) -> list[TeacherTargets]:
    """Worker thread: one forward, then every slice's trimmed, cast piece."""
    start = time.perf_counter()
    out = self._engine.forward(batch)
    pieces, row = [], 0
    for s in taken:
      pieces.append(extract(out, row, s.job.req, s.start, s.stop))
      self._metrics.count_states(s.job.req.states, s.job.req.layers, (s.stop - s.start) * s.job.req.length)
      row += s.stop - s.start
    self._metrics.engine_seconds.observe(time.perf_counter() - start)
    self._metrics.host_bytes.observe(out.nbytes)
    self._metrics.compilations.set(self._engine.compilations())
    return pieces

  async def _execute(self, key: _Key, taken: list[_Slice], rows: int) -> None:
    try:
      batch = self._build(key, taken, rows)
      real = sum((s.stop - s.start) * s.job.req.length for s in taken)
      self._metrics.batch_fill.observe(real / batch.tokens.size)
      self._metrics.batches.labels(f"{batch.tokens.shape[0]}x{batch.tokens.shape[1]}").inc()
      loop = asyncio.get_running_loop()
      pieces = await loop.run_in_executor(self._executor, self._run_engine, batch, taken)
    except Exception as e:  # noqa: BLE001 - every affected request gets the error
      log.exception("engine batch failed")
      err = RequestError(grpc.StatusCode.INTERNAL, "", f"engine failure: {type(e).__name__}: {e}")
      for s in taken:
        if not s.job.future.done():
          with contextlib.suppress(asyncio.InvalidStateError):  # cancelled meanwhile, as above
            s.job.future.set_exception(err)
      return
    finally:
      self._inflight.release()
    for s, piece in zip(taken, pieces):
      job = s.job
      job.pieces[s.start] = piece
      job.rows_done += s.stop - s.start
      if job.rows_done == job.req.rows and not job.future.done():
        # A SIGINT handler may cancel the waiter (and so this future) between the check and the call.
        with contextlib.suppress(asyncio.InvalidStateError):
          job.future.set_result(concat([job.pieces[i] for i in sorted(job.pieces)]))
