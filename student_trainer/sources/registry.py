"""Every kind of teacher source, by the name `teacher.source` gives it, with what it can do.

A source is registered once, here, with its class (as "module:Class") and its
declared capabilities; the trainer, the preflight checks and the config ask
these instead of comparing names:

    register_source(SourceKind("mine", "my_package.my_source:MySource", options=("mine",),
                               may_fall_back=True))

`options` names the `teacher.*` sub-configs the source reads; `make_source`
hands exactly those (in that order) to the class's `create`, with what the
run's student asks of a teacher (`sources.common.Student`), the mesh and the
interrupt event:

    @classmethod
    def create(cls, mine: MineConfig, *, student: Student, mesh, rules, interrupt) -> "MySource": ...

The classes are imported on first use: each source module imports the trainer's
config (through its preflight errors), which imports this registry to check
`teacher.source`, and some pull in heavy readers (grain, the stream client) a
run of another source never needs.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import TYPE_CHECKING, Any

from student_trainer.sources.common import Student

if TYPE_CHECKING:
  from jax.sharding import Mesh
  from student_trainer.sources.base import TeacherSource


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """A registered teacher source: its name, where its class lives, what it reads and what it can do."""

  name: str  # the value of teacher.source
  target: str  # "module:Class" of its TeacherSource, imported on first use
  options: tuple[str, ...] = ()  # the teacher.* sub-configs it reads, handed to `create` in this order
  teacher: bool = True  # False: no teacher at all, every batch trains on cross-entropy alone
  #: May answer a batch with None (cross-entropy alone) while a teacher is away or an answer is missing;
  #: the trainer compiles that step ahead. An instance may know better (`TeacherSource.may_fall_back`).
  may_fall_back: bool = False
  #: One process may fall back on a batch that another has targets for: with several processes the
  #: trainer then makes the batch CE-only on all of them (the step is one program).
  falls_back_per_process: bool = False
  #: The teacher computes on the student's own devices (so throughput measures both together).
  shares_student_devices: bool = False
  #: Answers every batch from its tokens as sent, so it can score text the student has just generated
  #: (on-policy steps); stored answers and a cache are found by example id instead.
  scores_new_text: bool = False

  def load(self) -> type["TeacherSource"]:
    """The source class (imported now, see the module docstring)."""
    module, attr = self.target.split(":")
    cls = getattr(importlib.import_module(module), attr)
    if cls.name != self.name:
      raise TypeError(f"{self.target} is registered as teacher source {self.name!r} but names itself {cls.name!r}")
    return cls

  def sub_configs(self, teacher_cfg) -> tuple[Any, ...]:
    """The sub-configs of a `TeacherConfig` this source reads, in the order `create` takes them."""
    return tuple(getattr(teacher_cfg, field) for field in self.options)


_KINDS: dict[str, SourceKind] = {}


def register_source(kind: SourceKind) -> SourceKind:
  """Adds `kind` under its name; ValueError when the name is taken."""
  if kind.name in _KINDS:
    raise ValueError(f"teacher source {kind.name!r} is already registered")
  _KINDS[kind.name] = kind
  return kind


def source_names() -> tuple[str, ...]:
  """Every registered source name, in registration order."""
  return tuple(_KINDS)


def source_kind(name: str) -> SourceKind:
  """The source registered as `name`; ValueError naming the known ones (and the closest) otherwise."""
  if name in _KINDS:
    return _KINDS[name]
  near = difflib.get_close_matches(str(name), list(_KINDS), n=1, cutoff=0.6)
  hint = f"; did you mean {near[0]!r}?" if near else ""
  raise ValueError(f"unknown teacher source {name!r} (known: {', '.join(_KINDS)}){hint}")


def make_source(train_cfg, mesh: "Mesh", rules, *, interrupt=None) -> "TeacherSource":
  """The source `train_cfg.teacher.source` names, given its own sub-configs and the student's side of the
  run; `interrupt` (a threading.Event, set on SIGTERM/SIGINT) stops its waits."""
  kind = source_kind(train_cfg.teacher.source)
  source = kind.load().create(*kind.sub_configs(train_cfg.teacher), student=Student.of(train_cfg), mesh=mesh,
                              rules=rules, interrupt=interrupt)
  source.interrupt = interrupt
  return source


register_source(SourceKind("none", "student_trainer.sources.none:NoTeacher", teacher=False))
register_source(SourceKind("local", "student_trainer.sources.local:LocalTeacher", options=("local",),
                           shares_student_devices=True, scores_new_text=True))  # always answers
# teacher.cached: what its cached_shards policy reads. Its processes agree on fallbacks among themselves.
register_source(SourceKind("remote", "student_trainer.sources.remote:RemoteTeacher", options=("remote", "cached"),
                           may_fall_back=True, scores_new_text=True))
# A process whose rows are missing (on_missing: ce_only) trains CE-only.
register_source(SourceKind("offline", "student_trainer.sources.offline:OfflineTeacher", options=("offline",),
                           may_fall_back=True, falls_back_per_process=True))
# The remote policy's CE-only answer for one process's rows the cache lacks.
register_source(SourceKind("cached", "student_trainer.sources.cached:CachedTeacher", options=("cached", "remote"),
                           may_fall_back=True, falls_back_per_process=True))
