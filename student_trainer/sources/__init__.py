"""Teacher sources: one batch in, `TeacherTargets` out (or None for CE-only).

Which sources exist, what each can do and how one is built: `registry.py`.
"""

from __future__ import annotations

from student_trainer.sources.common import Student
from student_trainer.sources.registry import SourceKind, make_source, register_source, source_kind, source_names

__all__ = ["SourceKind", "Student", "make_source", "register_source", "source_kind", "source_names"]
