"""The registry of teacher-target parts: every kind of teacher answer, in the order they are handled.

`TeacherTargets` (distill_core/targets.py) is a composition of part values; the wire
codec, the shards, the server and the sources iterate over `PARTS` rather than naming
any part. A new part is one module (see docs/targets.md) plus one line here.
"""

from __future__ import annotations

from distill_core.parts import dense, samples, states, topk
from distill_core.parts.base import Block, Part, Rows, Selection

PARTS: tuple[Part, ...] = (topk.PART, states.PART, samples.PART, dense.PART)
BY_NAME: dict[str, Part] = {part.name: part for part in PARTS}
FIELD_OWNER: dict[str, Part] = {field: part for part in PARTS for field in part.fields}
COMPUTE_ARG_OWNER: dict[str, Part] = {arg: part for part in PARTS for arg in part.compute_args}

if len(FIELD_OWNER) != sum(len(part.fields) for part in PARTS):
  raise RuntimeError("two teacher-target parts declare the same field name")

__all__ = ["BY_NAME", "Block", "COMPUTE_ARG_OWNER", "FIELD_OWNER", "PARTS", "Part", "Rows", "Selection"]
