"""The student as a JAX multi-controller program: start-up, agreement, metrics, failure.

Every host runs the same program (one process per host, `jax.distributed`);
the processes meet in the collectives of the jitted step. What they must agree
on outside the step goes through JAX's own coordination service (the
key-value store and preemption sync points of `jax.distributed`), never
through a home-made channel:

- `initialize`: `jax.distributed.initialize()` with the configured timeouts
  when the environment describes several processes (the variables JAX reads:
  `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, or a
  cluster JAX detects itself: a multi-host TPU slice, SLURM, ...). On CPU the
  collectives go over gloo.
- Preemption: XLA's preemption notifier catches SIGTERM on any process and
  `reached_preemption_sync_point(step)` is true on every process at the same
  step, so all of them checkpoint the same step and stop.
- Metrics: every process posts its host-side metrics (throughput, waits,
  teacher latencies) to the key-value store; process 0 reduces them
  (`reduce_metrics`) and is the only one that writes JSONL/TensorBoard.
- Failure: a process that hits a fatal error publishes it (`PeerWatch.announce`)
  and every other process, polling the store, logs it and exits within
  `poll_s`, instead of waiting forever in a collective that will never
  complete. A process that dies without a word (SIGKILL, out of memory) is
  caught by the coordination service's heartbeat (`heartbeat_timeout_s`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from typing import Mapping

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
from pydantic import Field

from distill_core.config import ConfigBase
from distill_core.sharding import maybe_initialize_distributed

log = logging.getLogger(__name__)

_FATAL_DIR = "distill/fatal/"
_METRICS_DIR = "distill/metrics/"
EXIT_FATAL = 1  # this process failed
EXIT_PEER_FAILED = 3  # another process failed; this one stopped because of it


class DistributedConfig(ConfigBase):
  """Multi-process runs (`jax.distributed`); ignored when the run has one process."""

  initialization_timeout_s: int = Field(
      300, ge=1, description="How long `jax.distributed.initialize` waits for every process to join.")
  heartbeat_timeout_s: int = Field(
      100, ge=1, description="A process silent this long (killed, hung host) is declared dead by the "
      "coordination service, which then ends every other process.")
  poll_s: float = Field(0.5, gt=0, description="How often each process checks whether another one "
                        "reported a fatal error (it then logs it and exits).")
  fatal_exit_s: float = Field(
      30.0, gt=0, description="A process with a fatal error gets this long to close its resources "
      "before it exits hard (its peers are already gone; a clean close could wait on them).")
  metrics_timeout_s: float = Field(
      120.0, gt=0, description="How long process 0 waits for the other processes' metrics at a log point.")


def initialize(cfg: DistributedConfig) -> bool:
  """`jax.distributed.initialize` when several processes are configured; True if it ran."""
  return maybe_initialize_distributed(initialization_timeout=cfg.initialization_timeout_s,
                                      heartbeat_timeout_seconds=cfg.heartbeat_timeout_s)


def align(name: str, timeout_s: float) -> None:
  """Waits for every process at a coordination-service barrier (no device work involved).

  Used before the first device collectives, so a slow host (importing,
  compiling) does not make another one's first collective time out: gloo,
  for one, gives up on a peer after 30 s.
  """
  if jax.process_count() > 1:
    _client().wait_at_barrier(name, int(timeout_s * 1000))


def _client():
  client = jax_distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed is not initialised")
  return client


def preemption_reached(step: int) -> bool:
  """True on every process at the same step once any process got SIGTERM (multi-process only)."""
  return multihost_utils.reached_preemption_sync_point(step)


def barrier(name: str) -> None:
  """Waits until every process got here (device collective: also orders the devices' work)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def gather_ints(*values: int) -> list[list[int]]:
  """Every process's `values` (each process calls this with its own): one list per value, by process."""
  if jax.process_count() == 1:
    return [[int(v)] for v in values]
  table = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int32)))  # (processes, values)
  return [table[:, i].astype(int).tolist() for i in range(len(values))]


def agree_targets(targets, step: int):
  """`targets`, or None on every process when any process has none for this batch (logged on all)."""
  if jax.process_count() == 1:
    return targets
  (have,) = gather_ints(int(targets is not None))
  missing = [p for p, ok in enumerate(have) if not ok]
  if not missing:
    return targets
  log.warning("teacher: batch of step %d trains on CE only on every process: no teacher answer on "
              "process(es) %s", step, missing)
  return None


# ----------------------------------------------------------------------------- metrics

# How each host-side metric combines across processes (by name suffix); anything else is averaged.
# Losses come out of the jitted step already reduced over the global batch, so every process holds
# the same value and the mean leaves them unchanged.
_SUMMED = ("tokens_per_s", "_total", "received_mb_per_s", "inflight_requests", "replicas_ready")
# fallback_batches: agreed over the processes (a batch is CE-only on all or none), so equal everywhere.
_MAXED = ("latency_ms_mean", "latency_ms_p50", "latency_ms_p95", "teacher_wait_fraction", "step_time_s",
          "fallback_batches")


def reduction_of(name: str) -> str:
  """'sum', 'max' or 'mean': how metric `name` combines over processes."""
  if name.endswith(_SUMMED):
    return "sum"
  if name.endswith(_MAXED):
    return "max"
  return "mean"


def reduce_metrics(per_process: list[Mapping[str, float]]) -> dict[str, float]:
  """Combines the metrics of every process (keys present on only some processes combine over those)."""
  keys = sorted({k for m in per_process for k in m})
  out = {}
  for key in keys:
    values = [float(m[key]) for m in per_process if key in m]
    how = reduction_of(key)
    out[key] = sum(values) if how == "sum" else max(values) if how == "max" else sum(values) / len(values)
  return out


def gather_metrics(step: int, metrics: Mapping[str, float], timeout_s: float) -> dict[str, float] | None:
  """Process 0: every process's `metrics` at this log point, reduced; other processes: None.

  Goes through the coordination service's key-value store, so a log point costs
  no device synchronisation.
  """
  if jax.process_count() == 1:
    return dict(metrics)
  client = _client()
  me = jax.process_index()
  if me != 0:
    client.key_value_set(f"{_METRICS_DIR}{step}/{me}", json.dumps(dict(metrics)))
    return None
  gathered = [dict(metrics)]
  for other in range(1, jax.process_count()):
    key = f"{_METRICS_DIR}{step}/{other}"
    gathered.append(json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000))))
    client.key_value_delete(key)
  return reduce_metrics(gathered)


# ----------------------------------------------------------------------------- failure


class PeerWatch:
  """Ends this process when another one reports a fatal error; reports this process's own.

  Use as a context manager around the run: inside it a thread polls the
  coordination service every `poll_s`. On leaving normally the thread stops
  (after a barrier, so no process mistakes another's normal exit for a failure).
  """

  def __init__(self, cfg: DistributedConfig):
    self.cfg = cfg
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.active = jax.process_count() > 1

  def __enter__(self) -> "PeerWatch":
    if self.active:
      self._thread = threading.Thread(target=self._watch, name="peer-watch", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if not self.active:
      return
    if exc is not None:
      self.announce(exc)
      return  # the caller exits (see `exit_after_failure`); peers are ending now
    barrier("distill-run-end")  # every process finished its run: stop watching
    self._stop.set()
    if self._thread is not None:
      self._thread.join()

  def _watch(self) -> None:
    me = jax.process_index()
    client = _client()
    while not self._stop.wait(self.cfg.poll_s):
      try:
        entries = client.key_value_dir_get(_FATAL_DIR)
      except Exception as e:  # noqa: BLE001 - the coordinator (process 0) is gone
        if self._stop.is_set():
          return
        _hard_exit(EXIT_PEER_FAILED, f"process {me}: lost the coordination service ({e}); "
                   "another process has ended: stopping this one")
        return
      others = [(key, value) for key, value in entries if not key.endswith(f"/{me}")]
      if others:
        who = ", ".join(f"process {key.rsplit('/', 1)[-1]}: {value}" for key, value in others)
        _hard_exit(EXIT_PEER_FAILED, f"process {me}: stopping because another process failed ({who})")
        return

  def announce(self, exc: BaseException) -> None:
    """Publishes this process's fatal error so the others stop; arms the hard exit."""
    me = jax.process_index()
    message = f"{type(exc).__name__}: {exc}"[:2000]
    log.critical("process %d: fatal error, ending every process: %s", me, message)
    self._stop.set()
    try:
      _client().key_value_set(f"{_FATAL_DIR}{me}", message)
    except Exception as e:  # noqa: BLE001 - the coordinator is gone: peers learn it by heartbeat
      log.error("process %d: could not report the failure to the other processes: %s", me, e)
    timer = threading.Timer(self.cfg.fatal_exit_s, _hard_exit,
                            (EXIT_FATAL, f"process {me}: cleanup did not finish in {self.cfg.fatal_exit_s:g} s"))
    timer.daemon = True
    timer.start()


def _hard_exit(code: int, message: str) -> None:
  log.critical(message)
  print(message, file=sys.stderr, flush=True)
  for handler in logging.getLogger().handlers:
    try:
      handler.flush()
    except Exception:  # noqa: BLE001
      pass
  os._exit(code)  # noqa: SLF001 - leaving a collective that never completes takes a hard exit


def exit_after_failure(code: int = EXIT_FATAL) -> None:
  """In a multi-process run, leaves without `jax.distributed.shutdown`'s barrier (peers are gone)."""
  if jax.process_count() > 1:
    _hard_exit(code, f"process {jax.process_index()}: exiting after a fatal error")
