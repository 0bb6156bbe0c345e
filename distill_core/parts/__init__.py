"""The registry of teacher-target parts: every kind of teacher answer, in the order they are handled.

`TeacherTargets` (distill_core/targets.py) is a composition of part values; the wire
codec, the shards, the server's answer checks and the sources iterate over `PARTS`
rather than naming any part. A new part is one module (see docs/targets.md) plus one
line in `PARTS` (or `register(part)`; `registered(part)` for the duration of a block).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

from distill_core.parts import dense, samples, scored, states, topk
from distill_core.parts.base import Block, Part, Rows, Selection

# Mutated in place by `register`, so every module that imported them sees a new part.
PARTS: list[Part] = []
BY_NAME: dict[str, Part] = {}
FIELD_OWNER: dict[str, Part] = {}
COMPUTE_ARG_OWNER: dict[str, Part] = {}
# Called with (part, True) after a part is registered and (part, False) after it is removed
# (`TeacherTargets` adds and removes its field properties so).
HOOKS: list[Callable[[Part, bool], None]] = []


def register(part: Part) -> None:
  """Adds `part` after the registered ones; its name, fields and compute arguments must be new."""
  if part.name in BY_NAME:
    raise ValueError(f"a teacher-target part named {part.name!r} is registered already")
  if "." in part.name:
    raise ValueError(f"part name {part.name!r}: no '.' (it separates part and field in the wire's map keys)")
  clash = [f for f in part.fields if f in FIELD_OWNER] + [a for a in part.compute_args if a in COMPUTE_ARG_OWNER]
  if clash:
    raise ValueError(f"part {part.name!r}: {', '.join(clash)} already belong to another part")
  PARTS.append(part)
  BY_NAME[part.name] = part
  FIELD_OWNER.update({field: part for field in part.fields})
  COMPUTE_ARG_OWNER.update({arg: part for arg in part.compute_args})
  for hook in HOOKS:
    hook(part, True)


def unregister(name: str) -> None:
  part = BY_NAME.pop(name)
  PARTS.remove(part)
  for table, keys in ((FIELD_OWNER, part.fields), (COMPUTE_ARG_OWNER, part.compute_args)):
    for key in keys:
      table.pop(key)
  for hook in HOOKS:
    hook(part, False)


@contextlib.contextmanager
def registered(part: Part) -> Iterator[Part]:
  """`part` registered for the duration of the block (tests, experiments)."""
  register(part)
  try:
    yield part
  finally:
    unregister(part.name)


class ByPart(tuple):
  """(part name, entry) pairs (a hashable tuple, iterated as pairs) that read like a mapping by part name:
  `get`, `[name]`, `in`, `items`, `keys`, `values`."""

  def get(self, name: str, default: Any = None) -> Any:
    for key, value in self:
      if key == name:
        return value
    return default

  def __getitem__(self, key):
    if isinstance(key, str):
      for name, value in self:
        if name == key:
          return value
      raise KeyError(key)
    return tuple.__getitem__(self, key)

  def __contains__(self, name) -> bool:
    return any(key == name for key, _ in self)

  def items(self) -> tuple[tuple[str, Any], ...]:
    return tuple(self)

  def keys(self) -> tuple[str, ...]:
    return tuple(key for key, _ in self)

  def values(self) -> tuple[Any, ...]:
    return tuple(value for _, value in self)


def ordered(entries) -> ByPart:
  """(part name, entry) pairs of a mapping or pairs, without None entries, in registry order."""
  order = {part.name: i for i, part in enumerate(PARTS)}
  pairs = entries.items() if hasattr(entries, "items") else entries
  return ByPart(sorted(((name, value) for name, value in pairs if value is not None),
                       key=lambda pair: (order.get(pair[0], len(order)), pair[0])))


def by_part_name(cls: type) -> type:
  """Lets a frozen dataclass whose `parts` field holds (part name, entry) pairs take and give each entry by the
  part's name: `cls(..., <part>=entry)` (None: none; overrides `parts`) and `obj.<part>` (None when absent).

  `parts` must be a keyword-only field; `dataclasses.replace(obj, <part>=entry)` works too.
  """
  init = cls.__init__
  own = {f.name for f in dataclasses.fields(cls)}  # a field named like a part (`states`) stays a field

  @functools.wraps(init)
  def __init__(self, *args, **kwargs):
    entries = dict(kwargs.pop("parts", None) or ())
    for name in [key for key in kwargs if key in BY_NAME and key not in own]:
      entries[name] = kwargs.pop(name)
    init(self, *args, parts=ordered(entries), **kwargs)

  def __getattr__(self, name: str):
    if name in BY_NAME:
      return dict(object.__getattribute__(self, "parts")).get(name)
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  if "parts" not in {f.name for f in dataclasses.fields(cls) if f.kw_only}:
    raise TypeError(f"{cls.__name__}: by_part_name needs a keyword-only field 'parts'")
  cls.__init__ = __init__
  cls.__getattr__ = __getattr__
  return cls


def limit_values(source: Any) -> dict[str, int]:
  """Every registered part's limits (`Part.limits`) read from the attributes of `source` (0 when absent)."""
  return {name: int(getattr(source, name, 0) or 0) for part in PARTS for name in part.limits}


for _part in (topk.PART, states.PART, samples.PART, scored.PART, dense.PART):
  register(_part)

__all__ = ["BY_NAME", "Block", "ByPart", "COMPUTE_ARG_OWNER", "FIELD_OWNER", "HOOKS", "PARTS", "Part", "Rows",
           "Selection", "by_part_name", "limit_values", "ordered", "register", "registered", "unregister"]
