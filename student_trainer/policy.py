"""What a streaming teacher source does with a batch whose answer is overdue.

A source that waits on a remote teacher asks its `FallbackPolicy` once the
teacher has made no progress for `teacher.remote.timeout_s` while the batch is
still unanswered, and again at every further interval. The policy either keeps
waiting or supplies the batch's targets from elsewhere (None = train that
batch on cross-entropy alone). Policies are looked up by name in a registry,
so a new one (for example one that reads cached offline shards by example id)
plugs in with `register_policy` and a config value, without touching the
source:

    @register_policy("my_policy")
    def _make(context: PolicyContext) -> FallbackPolicy:
      return MyPolicy(context.cached...)

Built in: `wait` (keep waiting, warn at every interval), `ce_only`, and `cached_shards`
(`sources/cached.py`: serve overdue batches from cached answer shards, the rest by a secondary policy; named
here as "module:factory" and imported on first use, because that module pulls in JAX and the answer store).

This module sits outside `student_trainer.sources` and imports nothing of the trainer, so the config
(`student_trainer.config`, which checks `teacher.remote.on_timeout` against `policy_names()`) can import
it at the top without importing the sources, which import the config.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
  from distill_core.data import Batch
  from distill_core.targets import TeacherTargets


@dataclasses.dataclass(frozen=True)
class Overdue:
  """A batch whose teacher answer is late."""

  batch: "Batch"  # this process's rows of the batch (host arrays)
  temperature: float  # the temperature its targets were requested at
  waited_s: float  # time the train loop has been blocked on it
  stalled_s: float  # time the teacher has made no progress


@dataclasses.dataclass(frozen=True)
class Decision:
  """`wait`, or use `targets` (None = CE only) for the overdue batch; `note` goes in the log."""

  wait: bool
  targets: "TeacherTargets | None" = None
  note: str = ""

  @classmethod
  def keep_waiting(cls) -> "Decision":
    return cls(wait=True)

  @classmethod
  def use(cls, targets: "TeacherTargets | None", note: str) -> "Decision":
    return cls(wait=False, targets=targets, note=note)


class FallbackPolicy(abc.ABC):
  """Decides about overdue batches. Called on the train loop's thread."""

  name: str = ""
  #: Whether `decide` may ever answer with None (the batch trains on cross-entropy alone); the trainer
  #: compiles that step ahead when it may.
  may_fall_back: bool = True

  @abc.abstractmethod
  def decide(self, overdue: Overdue) -> Decision:
    """What to do with `overdue` now (called again after each interval while waiting)."""

  def close(self) -> None:
    """Releases what the policy opened (files, readers)."""


class WaitPolicy(FallbackPolicy):
  """Never gives up: training pauses until a teacher answers (the source warns at intervals)."""

  name = "wait"
  may_fall_back = False

  def decide(self, overdue: Overdue) -> Decision:
    del overdue
    return Decision.keep_waiting()


class CEOnlyPolicy(FallbackPolicy):
  """The overdue batch trains on cross-entropy alone; the stream continues with the next batch."""

  name = "ce_only"

  def decide(self, overdue: Overdue) -> Decision:
    return Decision.use(None, f"no teacher answer for {overdue.stalled_s:.1f} s: training this batch on CE only")


@dataclasses.dataclass(frozen=True)
class PolicyContext:
  """What a policy factory may use: the student's side of the run, the cache options and the trainer's mesh."""

  student: Any  # student_trainer.sources.common.Student: the student's model, losses, data and value dtype
  cached: Any  # student_trainer.config.CachedTeacherConfig (teacher.cached: the cache cached_shards reads)
  mesh: Any  # jax.sharding.Mesh


PolicyFactory = Callable[[PolicyContext], FallbackPolicy]

_FACTORIES: dict[str, PolicyFactory] = {
    "wait": lambda context: WaitPolicy(),
    "ce_only": lambda context: CEOnlyPolicy(),
}
# Policies defined in modules imported only when used: name -> "module:factory".
_LAZY: dict[str, str] = {"cached_shards": "student_trainer.sources.cached:make_cached_shards_policy"}


def register_policy(name: str, factory: PolicyFactory | None = None):
  """Registers `factory` under `name` (usable as a decorator)."""

  def add(f: PolicyFactory) -> PolicyFactory:
    if name in _FACTORIES or name in _LAZY:
      raise ValueError(f"fallback policy {name!r} is already registered")
    _FACTORIES[name] = f
    return f

  return add(factory) if factory is not None else add


def policy_names() -> tuple[str, ...]:
  """Every registered policy name, sorted."""
  return tuple(sorted({*_FACTORIES, *_LAZY}))


def make_policy(name: str, context: PolicyContext) -> FallbackPolicy:
  """The policy registered as `name`; ValueError naming the known ones otherwise."""
  if name not in _FACTORIES and name in _LAZY:
    module, attr = _LAZY[name].split(":")
    _FACTORIES[name] = getattr(importlib.import_module(module), attr)
  if name not in _FACTORIES:
    raise ValueError(f"teacher.remote.on_timeout: unknown policy {name!r} (known: {', '.join(policy_names())})")
  return _FACTORIES[name](context)
