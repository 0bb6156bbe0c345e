"""`StreamRunner`: the stream pool on its own event-loop thread, behind a synchronous API.

    runner = StreamRunner(cfg, need, place=lambda t: t)     # starts the thread and the lanes
    runner.wait_first_contact(timeout)                      # a replica was accepted (or a fatal error)
    item = runner.enqueue(batch, temperatures=(1.0,))       # -> Item; item.done is set when answered
    runner.close()

Both users of the teacher's `Stream` RPC go through it: the trainer's remote
source (`student_trainer.sources.remote`, which adds the fallback policy,
metrics and a checkpointed cursor) and `python -m teacher_server.dump
--remote`. So both fail over between replicas, reconnect with backoff, drop
hung replicas and check every answer (ids in the vocabulary, the requested
temperatures, one replica identity and set of weights per batch) the same way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import threading
from typing import Any, Callable

import numpy as np
import uvloop

from distill_core.data import Batch
from distill_core.stream.checks import RequestShape, Requirements, diagnose_connection
from distill_core.stream.config import StreamClientConfig
from distill_core.stream.pool import Item, Lane, RemoteTeacherError, StreamCore
from distill_core.stream.stats import StreamStats
from distill_core.targets import TeacherTargets

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 30.0


class StreamRunner:
  """Lanes to every configured address, run on a background uvloop thread.

  Args:
    cfg: addresses, reconnect and failover options.
    need: what the caller needs from the teacher (checked against every replica's GetInfo).
    place: host targets of one finished batch -> what `Item.targets` holds (runs on a worker thread).
    stats: counters to update (a new `StreamStats` by default).
    shape: request sizes and encodings (default: read from `cfg`).
    options: the prefix of the caller's config keys, for advice in diagnoses.
  """

  def __init__(self, cfg: StreamClientConfig, need: Requirements, place: Callable[[TeacherTargets], Any], *,
               stats: StreamStats | None = None, shape: RequestShape | None = None,
               options: str = "teacher.remote."):
    self.cfg = cfg
    self.options = options
    self.stats = stats if stats is not None else StreamStats()
    self.core = StreamCore(cfg, need, place, self.stats, shape)
    self._seq = itertools.count()
    self._closed = False
    self._loop = uvloop.new_event_loop()
    self.core.loop = self._loop
    self._stop: asyncio.Event | None = None
    self._started = threading.Event()
    self._thread = threading.Thread(target=self._run_loop, name="teacher-stream", daemon=True)
    self._thread.start()
    self._started.wait()

  # -- the loop thread ------------------------------------------------------------------------------

  def _run_loop(self) -> None:
    asyncio.set_event_loop(self._loop)
    try:
      self._loop.run_until_complete(self._main())
    except BaseException as e:  # noqa: BLE001 - reported to the caller through `fatal`
      self.core.fail(RemoteTeacherError(f"the remote teacher thread failed: {type(e).__name__}: {e}"))
    finally:
      self._started.set()
      # Like asyncio.run: let gRPC's own tasks see their cancellation before the loop closes.
      leftover = asyncio.all_tasks(self._loop)
      for task in leftover:
        task.cancel()
      self._loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
      self._loop.run_until_complete(self._loop.shutdown_asyncgens())
      self._loop.close()

  async def _main(self) -> None:
    cfg = self.cfg
    self._stop = asyncio.Event()
    options = [("grpc.initial_reconnect_backoff_ms", int(cfg.backoff_initial_s * 1000)),
               ("grpc.max_reconnect_backoff_ms", int(cfg.backoff_max_s * 1000))]
    clients = [cfg.make_client(address, options) for address in cfg.addresses]
    for client, address in zip(clients, cfg.addresses):
      for i in range(cfg.streams_per_address):
        name = address if cfg.streams_per_address == 1 else f"{address}#{i}"
        self.core.lanes.append(Lane(self.core, client, name))
    tasks = [asyncio.create_task(lane.run(), name=f"lane {lane.name}") for lane in self.core.lanes]
    tasks.append(asyncio.create_task(self._watchdog(), name="deadlines"))
    self._started.set()
    try:
      await self._stop.wait()
    finally:
      self.core.closing = True
      for task in tasks:
        task.cancel()
      await asyncio.gather(*tasks, return_exceptions=True)
      await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
      self.core.close()

  async def _watchdog(self) -> None:
    period = min(1.0, (self.cfg.request_timeout_s or 4.0) / 4)
    while True:
      await asyncio.sleep(period)
      self.core.check_deadlines()

  # -- the caller's thread --------------------------------------------------------------------------

  @property
  def alive(self) -> bool:
    return not self._closed and self._thread.is_alive()

  @property
  def fatal(self) -> BaseException | None:
    """The error that stopped the client (an incompatible replica, a rejected batch...), if any."""
    return self.core.fatal

  def raise_if_fatal(self) -> None:
    if self.core.fatal is not None:
      raise RemoteTeacherError(str(self.core.fatal)) from self.core.fatal

  def on_loop(self, fn: Callable, *args) -> Any:
    """Runs `fn(*args)` on the loop thread and returns its result."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def call():
      try:
        future.set_result(fn(*args))
      except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
        future.set_exception(e)

    self._loop.call_soon_threadsafe(call)
    return future.result(CLOSE_TIMEOUT_S)

  def enqueue(self, batch: Batch, temperatures: tuple[float, ...], *, priority: int = 1,
              states: tuple[str, ...] | None = None, part_inputs: dict[str, np.ndarray] | None = None) -> Item:
    """Sends `batch` (split into requests, spread over the ready lanes); `Item.done` is set when it is answered.
    `part_inputs`: per-position inputs of parts ("<part>.<input>" -> (B, T, ...)), split with the rows."""
    if self._closed:
      raise RuntimeError("the teacher stream client is closed")
    self.raise_if_fatal()
    item = Item(seq=next(self._seq), priority=priority, batch=batch,
                temperatures=tuple(float(t) for t in temperatures),
                states=None if states is None else tuple(states), part_inputs=dict(part_inputs or {}))
    self._loop.call_soon_threadsafe(self.core.add, item)
    return item

  def cancel(self, item: Item) -> None:
    """Drops `item`'s requests (late answers are ignored)."""
    self._loop.call_soon_threadsafe(self.core.cancel, item)

  def describe(self) -> str:
    """Each lane's state, in words."""
    return self.core.describe()

  def diagnosis(self) -> str:
    """'; <what a direct look at each address finds>' or '' (see checks.diagnose_connection)."""
    tls = bool(self.cfg.tls or self.cfg.root_certificates or self.cfg.client_cert)
    found = [d for d in (diagnose_connection(a, tls=tls, options=self.options) for a in self.cfg.addresses) if d]
    return "".join(f"; {d}" for d in found)

  def close(self) -> None:
    """Cancels the streams, closes the channels and joins the loop thread."""
    if self._closed:
      return
    self._closed = True
    if self._thread.is_alive() and self._stop is not None:
      self._loop.call_soon_threadsafe(self._stop.set)
      self._thread.join(CLOSE_TIMEOUT_S)
      if self._thread.is_alive():
        log.error("the remote teacher thread did not stop within %.0f s", CLOSE_TIMEOUT_S)
