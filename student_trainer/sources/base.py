"""The `TeacherSource` interface shared by every way of getting teacher targets.

The train loop drives a source in two phases so that slow sources can work
ahead: `submit` is called for each upcoming batch as soon as the data pipeline
produces it (up to `lookahead` batches before it is trained on), and `next`
returns the targets of the oldest submitted batch, in submission order.
A source that has no answer for a batch (no teacher, or a fallback policy)
returns None and the step trains on cross-entropy alone for that batch.

`states` (optional on `submit` and `compute`) names the layer states the
batch's loss reads, when a run's objectives differ in that (a blockwise phase
reads `attn_in` and `attn_out`, a later KD phase `attn_out` or nothing): a
source that can fetch less should; None means every state it was built for.
The train loop drops whatever states a step does not read, so a source may
always return more.

`part_inputs` (optional on `submit` and `compute`) are the batch's inputs of
teacher-target parts, keyed "<part>.<input>" as in `ForwardRequest.part_inputs`
(`Part.input_args` turns them into an in-process teacher's arguments,
`Part.check_inputs` checks them against the batch). The train loop passes them
for a generated batch when the loss reads the teacher's scores at given ids
(`LossConfig.scores_given_ids`): the ids of each position (column 0 the sampled
next token `batch.targets`, then the student's top-k ids there:
`generation.ids_to_score`), as the part that answers them asks for them. A
source that cannot compute them is not used for such runs
(`registry.SourceKind.scores_new_text`).

A source that may block (waiting for a remote teacher) watches `interrupt`, an
event the trainer sets on SIGTERM/SIGINT, and raises `Interrupted` from
`next`/`compute` once it is set, so a preempted run never hangs on a teacher.
"""

from __future__ import annotations

import abc
import threading
from typing import Any, Mapping

import numpy as np

from distill_core.data import Batch
from distill_core.targets import TeacherTargets


class Interrupted(Exception):
  """The run was asked to stop while a source waited; the batch it waited for stays untrained."""


class TeacherSource(abc.ABC):
  """Maps training batches to teacher targets, in order."""

  #: The name it is registered under (`registry.py`), also in the cursors it checkpoints.
  name: str = ""
  #: How many batches the trainer should submit ahead of the one being trained.
  lookahead: int = 0
  #: False when this source, as configured, never answers a batch with None while its kind of source
  #: may (`registry.SourceKind.may_fall_back`): a remote source whose policy waits. What each kind of
  #: source can do is declared where it is registered (`registry.py`).
  may_fall_back: bool = True
  #: Set by the trainer on SIGTERM/SIGINT; a blocking `next`/`compute` then raises `Interrupted`.
  interrupt: threading.Event | None = None

  @abc.abstractmethod
  def submit(self, batch: Batch, temperature: float, states: tuple[str, ...] | None = None,
             part_inputs: Mapping[str, np.ndarray] | None = None) -> None:
    """Announces an upcoming batch; `temperature` is the schedule's value at its step."""

  @abc.abstractmethod
  def next(self) -> TeacherTargets | None:
    """Targets of the oldest submitted batch not yet returned (blocks until available)."""

  @abc.abstractmethod
  def compute(self, batch: Batch, temperature: float, states: tuple[str, ...] | None = None,
              part_inputs: Mapping[str, np.ndarray] | None = None) -> TeacherTargets | None:
    """Targets for one batch outside the training stream (evaluation).

    Must not disturb the stream: batches already submitted keep their order
    and their answers.
    """

  def state(self) -> dict[str, Any]:
    """JSON-serialisable cursor stored in checkpoints."""
    return {}

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from a cursor returned by `state` (called before any submit)."""
    del state

  def metrics(self) -> dict[str, float]:
    """Source-specific metrics (latency, retries...), merged into the trainer's."""
    return {}

  def close(self) -> None:
    """Releases connections, threads and devices."""

  def __enter__(self) -> "TeacherSource":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
