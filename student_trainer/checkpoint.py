"""Orbax checkpoints of the whole training state, and preemption handling.

One checkpoint holds, per step: `state` (model + optimizer, sharded arrays),
`data` (the data iterator's state at the first batch not yet trained on) and
`meta` (step, teacher-stream cursor, config fingerprint). Resuming restores
all three, so the data order and the teacher stream continue exactly.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

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
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    log.info("checkpoint saved at step %d in %s", step, self.directory)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings)."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["meta"]

  def restore_meta(self, step: int) -> dict:
    """Only the `meta` item of a checkpoint (no arrays read)."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class PreemptionFlag:
  """Turns SIGTERM (and SIGINT) into a flag the train loop polls at step boundaries."""

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    log.warning("received %s: will checkpoint and stop after the current step", signal.Signals(signum).name)
    self._event.set()

  def set(self) -> None:
    self._event.set()

  def __bool__(self) -> bool:
    return self._event.is_set()

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
