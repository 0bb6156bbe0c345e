"""Orbax checkpoints of the whole training state, and preemption handling.

One checkpoint holds, per step: `state` (model + optimizer, sharded arrays,
each process writing its own shards), `data` (every process's data-iterator
state at the first batch not yet trained on, one file per process:
`process_<i>-of-<n>.json`, written by grain's Orbax handler) and `meta` (step,
teacher-stream cursor, model config; written by process 0). Resuming restores
all three, so the data order and the teacher stream continue exactly.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import grain.checkpoint as grain_ckpt
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:
  """Keep-last-N Orbax checkpoints of (state, data iterator, meta)."""

  def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
    self.directory = Path(directory).resolve()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain_ckpt.CheckpointSave(_Position(data_state)),
        meta=ocp.args.JsonSave(meta)), force=True)
    log.info("checkpoint saved at step %d in %s", step, self.directory)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings); `data` is this process's."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain_ckpt.CheckpointRestore(_Position()),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"].value, out["meta"]

  def restore_meta(self, step: int) -> dict:
    """Only the `meta` item of a checkpoint (no arrays read)."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class _Position:
  """A data-iterator state in the shape grain's checkpoint handler saves per process (JSON bytes)."""

  def __init__(self, value: dict | None = None):
    self.value = value

  def get_state(self) -> bytes:
    return json.dumps(self.value).encode()

  def set_state(self, state: bytes) -> None:
    self.value = json.loads(state)

  def start_prefetch(self) -> None:
    """Called by the handler after a restore; the trainer's iterator starts itself."""


class PreemptionFlag:
  """Turns SIGTERM (and SIGINT) into a stop the train loop checks at step boundaries.

  With several processes, SIGTERM is caught by XLA's preemption notifier
  (installed by `jax.distributed.initialize`; no Python handler replaces it)
  and `reached(step)` is true on every process at the same step, so they all
  checkpoint that step and stop together. One process alone polls a flag set
  by its signal handlers.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self._previous = {}
    self._multi = jax.process_count() > 1
    if self._multi:
      return
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    log.warning("received %s: will checkpoint and stop after the current step", signal.Signals(signum).name)
    self._event.set()

  def set(self) -> None:
    self._event.set()

  def reached(self, step: int) -> bool:
    """Whether to stop at this step boundary (every process calls it at every step)."""
    if self._multi and not self._event.is_set():
      from student_trainer.distributed import preemption_reached
      if preemption_reached(step):
        log.warning("preemption notice: every process checkpoints step %d and stops", step)
        self._event.set()
    return self._event.is_set()

  def __bool__(self) -> bool:
    return self._event.is_set()

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
