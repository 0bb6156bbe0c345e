"""Orbax checkpoints of the whole training state, and preemption handling.

One checkpoint holds, per step: `state` (model + optimizer, sharded arrays,
each process writing its own shards), `data` (every process's data-iterator
state at the first batch not yet trained on, one file per process:
`process_<i>-of-<n>.json`, written by grain's Orbax handler) and `meta` (step,
teacher-stream cursor, model config, the whole run config; written by process 0).
A run with on-policy steps adds `generated`: the batches it sampled but has not
trained yet, per process (`process_<i>-of-<n>.npz`, plain arrays written by
`np.savez`, read without pickle), because the parameters they were drawn with
are older than the checkpoint's (`on_policy`). Resuming restores them all, so
the data order and the teacher stream continue
exactly; the saved config is compared with the current one first
(`config_changes`).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import dataclasses
import io

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp

from student_trainer.distributed import preemption_reached

log = logging.getLogger(__name__)


class Checkpointer:
  """Keep-last-N Orbax checkpoints of (state, data iterator, meta)."""

  def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
    self.directory = Path(directory).resolve()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta", "generated"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict,
           generated: dict[str, np.ndarray] | None = None) -> None:
    """`generated`: this process's arrays of a run with on-policy steps (None: no such item)."""
    items = dict(state=ocp.args.StandardSave(state), data=grain_ckpt.CheckpointSave(_Position(data_state)),
                 meta=ocp.args.JsonSave(meta))
    if generated is not None:
      items["generated"] = ArraysSave(generated)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    log.info("checkpoint saved at step %d in %s", step, self.directory)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings); `data` is this process's."""
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain_ckpt.CheckpointRestore(_Position()),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["data"].value, out["meta"]

  def restore_generated(self, step: int) -> dict[str, np.ndarray] | None:
    """This process's `generated` arrays of a checkpoint; None when it has no such item."""
    if not (self.directory / str(step) / "generated").is_dir():
      return None
    return self._manager.restore(step, args=ocp.args.Composite(generated=ArraysRestore()))["generated"]

  def restore_meta(self, step: int) -> dict:
    """Only the `meta` item of a checkpoint (no arrays read): step, teacher cursor, run config."""
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


class ArraysHandler(ocp.CheckpointHandler):
  """An Orbax item of plain numpy arrays, one `.npz` per process (each process saves its own rows)."""

  @staticmethod
  def _file(directory) -> Any:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.npz"

  def save(self, directory, args: "ArraysSave") -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **args.arrays)
    self._file(directory).write_bytes(buffer.getvalue())

  def restore(self, directory, args: "ArraysRestore | None" = None) -> dict[str, np.ndarray]:
    del args
    path = self._file(directory)
    if not path.exists():
      raise ValueError(f"{path} does not exist (a checkpoint written by another number of processes?)")
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as f:
      return {name: f[name] for name in f.files}

  def metadata(self, directory) -> None:
    del directory

  def finalize(self, directory) -> None:
    del directory

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(ArraysHandler, for_save=True)
@dataclasses.dataclass
class ArraysSave(ocp.args.CheckpointArgs):
  arrays: dict[str, np.ndarray]


@ocp.args.register_with_handler(ArraysHandler, for_restore=True)
@dataclasses.dataclass
class ArraysRestore(ocp.args.CheckpointArgs):
  pass


# Fields that never change what is trained (where output goes, how often, how it is read or
# served, which devices): they may differ on resume. `steps` may grow (checked apart). Where the
# teacher's weights or LTI kernels are read from may move too: their fingerprints are checked
# on resume (teacher.remote.allow_teacher_change, lti's check_restored).
OPERATIONAL_FIELDS = ("run_dir", "steps", "export_hf", "checkpoint", "logging", "eval", "mesh",
                      "data.read_threads", "data.prefetch_buffer_size", "data.verify_shards",
                      "data.eval_batch_size", "teacher.remote", "lti.kernels_path", "lti.parameters_token_file",
                      "lti.collapse_at_end")
_KEEP_REMOTE = ("teacher.remote.state_dtype",)  # the one remote option that changes the targets


class ConfigChanged(ValueError):
  """A resume whose config differs from the checkpoint's in fields that change the run."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      yield from _flatten(value, name + ".")
    else:
      yield name, value


def _matches(name: str, patterns: Sequence[str]) -> bool:
  return any(p == "*" or name == p or name.startswith(p + ".") for p in patterns)


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any], *, saved_step: int,
                   allow: Sequence[str] = ()) -> list[str]:
  """`field: old -> new` for every changed field that changes the run and is not in `allow`.

  Both configs are `TrainConfig.model_dump(mode="json")` dicts. `steps` may grow, but not fall
  to or below the checkpoint's step.
  """
  old, new = dict(_flatten(saved)), dict(_flatten(current))
  out = []
  for name in sorted(old.keys() | new.keys()):
    a, b = old.get(name, "<absent>"), new.get(name, "<absent>")
    if a == b or _matches(name, allow):
      continue
    if name == "steps":
      if isinstance(b, int) and b <= saved_step:
        out.append(f"steps: {a} -> {b} (the checkpoint is at step {saved_step}; set steps above it)")
      continue
    if _matches(name, OPERATIONAL_FIELDS) and not _matches(name, _KEEP_REMOTE):
      continue
    out.append(f"{name}: {_short(a)} -> {_short(b)}")
  return out


def _short(value: Any, limit: int = 80) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def check_resume_config(saved: Mapping[str, Any] | None, current: Mapping[str, Any], *, saved_step: int,
                        allow: Sequence[str], where: str) -> None:
  """Raises ConfigChanged naming every field whose change the user did not allow."""
  if saved is None:
    log.warning("%s holds no run config (an older checkpoint): resuming without comparing configs", where)
    return
  changes = config_changes(saved, current, saved_step=saved_step, allow=allow)
  if changes:
    names = ", ".join(c.split(":", 1)[0] for c in changes if not c.startswith("steps:"))
    hint = f"pass checkpoint.allow_changes=[{names}] to accept them, " if names else ""
    raise ConfigChanged(
        f"{where} was written by another run config; resuming would silently change the run:\n  "
        + "\n  ".join(changes) + f"\n{hint}or set checkpoint.resume=false (or another run_dir) to start over")
  if current.get("steps") != saved.get("steps"):
    log.info("steps changed from %s to %s since the checkpoint (a decay that follows run.steps now spans the "
             "new length)", saved.get("steps"), current.get("steps"))


class PreemptionFlag:
  """Turns SIGTERM (and SIGINT) into a stop the train loop checks at step boundaries.

  With several processes, SIGTERM is caught by XLA's preemption notifier
  (installed by `jax.distributed.initialize`; no Python handler replaces it)
  and `reached(step)` is true on every process at the same step, so they all
  checkpoint that step and stop together. One process alone polls a flag set
  by its signal handlers.

  `event` is also handed to the teacher source, so a step blocked waiting for its teacher
  stops waiting at once (`sources.base.Interrupted`): the loop then checkpoints what is
  trained and exits; the abandoned step runs again after the resume (one process; with
  several, a process's wait ends when its own event is set).
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
    log.warning("received %s: checkpointing what is trained and stopping (a step still waiting for its "
                "teacher is abandoned and runs again on resume)", signal.Signals(signum).name)
    self._event.set()

  @property
  def event(self) -> threading.Event:
    return self._event

  def set(self) -> None:
    self._event.set()

  def reached(self, step: int) -> bool:
    """Whether to stop at this step boundary (every process calls it at every step)."""
    if self._multi and not self._event.is_set():
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
