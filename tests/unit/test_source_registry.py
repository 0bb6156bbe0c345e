"""The teacher-source registry: names, capabilities, and no source told apart by its name anywhere else."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from distill_core.config import ConfigError, load_config
from student_trainer.config import LocalTeacherConfig, OfflineTeacherConfig, TrainConfig
from student_trainer.sources import SourceKind, Student, source_kind, source_names
from student_trainer.sources import registry
from student_trainer.sources.base import TeacherSource

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("student_trainer", "teacher_server", "distill_core", "benchmarks", "scripts")
REGISTRY = REPO / "student_trainer" / "sources" / "registry.py"
# An expression that holds a source name: `cfg.teacher.source`, `source`, `kind`, a cursor's
# `state["source"]` or `state.get("source")`, or the registry's list of names.
_SOURCE_EXPR = re.compile(r"""((.*\.)?(source|kind|source_name)|.*\[['"]source['"]\]|.*\.get\(['"]source['"].*|"""
                          r""".*source_names\(\).*|.*_sources\(\).*)""")


def _literals(node: ast.AST) -> set[str]:
  """String constants of `node`, or of the elements of a tuple, list or set literal."""
  if isinstance(node, ast.Constant) and isinstance(node.value, str):
    return {node.value}
  if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
    return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
  return set()


def name_comparisons(text: str, names: tuple[str, ...]) -> list[tuple[int, str]]:
  """(line, code) of every comparison (or match case) of a source-name expression with a source name."""
  found = []
  for node in ast.walk(ast.parse(text)):
    if isinstance(node, ast.Compare):
      operands = [node.left, *node.comparators]
      named = [o for o in operands if _SOURCE_EXPR.fullmatch(ast.unparse(o))]
      if named and any(_literals(o) & set(names) for o in operands):
        found.append((node.lineno, ast.unparse(node)))
    elif isinstance(node, ast.Match) and _SOURCE_EXPR.fullmatch(ast.unparse(node.subject)):
      for case in node.cases:
        values = {n.value.value for n in ast.walk(case.pattern)
                  if isinstance(n, ast.MatchValue) and isinstance(n.value, ast.Constant)}
        if values & set(names):
          found.append((case.pattern.lineno, ast.unparse(case.pattern)))
  return found


def test_the_scan_finds_what_it_is_for():
  names = source_names()
  flagged = ['if cfg.teacher.source == "local": pass', 'x = source not in ("none", "local")',
             'ok = state.get("source") != "cached"', 'ok = state["source"] == "offline"', 'ok = kind in ["remote"]',
             'ok = "offline" in source_names()',
             'match cfg.teacher.source:\n  case "remote":\n    pass']
  for code in flagged:
    assert name_comparisons(code, names), code
  left_alone = ['ok = source["kernels_from"] == "remote"', 'ok = self.source in ("hf", "orbax")',
                'ok = value not in ("none", "false")', 'ok = phase == "remote"',
                'ok = state.get("source") != self.name']
  for code in left_alone:
    assert not name_comparisons(code, names), code


def test_no_source_name_is_compared_outside_the_registry():
  names = source_names()
  found = []
  for top in SCANNED:
    for path in sorted((REPO / top).rglob("*.py")):
      if path == REGISTRY:
        continue
      found += [f"{path.relative_to(REPO)}:{line}: {code}"
                for line, code in name_comparisons(path.read_text(), names)]
  assert not found, "ask the registry (sources/registry.py) instead:\n" + "\n".join(found)


def test_every_source_is_registered_with_its_class_and_options():
  assert source_names() == ("none", "local", "remote", "offline", "cached")
  teacher = load_config(TrainConfig, None, []).teacher
  for name in source_names():
    kind = source_kind(name)
    cls = kind.load()
    assert issubclass(cls, TeacherSource) and cls.name == name
    assert all(sub is getattr(teacher, field) for sub, field in zip(kind.sub_configs(teacher), kind.options))
  assert source_kind("local").sub_configs(teacher) == (teacher.local,)
  assert source_kind("cached").sub_configs(teacher) == (teacher.cached, teacher.remote)
  assert [n for n in source_names() if source_kind(n).shares_student_devices] == ["local"]
  assert [n for n in source_names() if source_kind(n).falls_back_per_process] == ["offline", "cached"]
  assert [n for n in source_names() if not source_kind(n).teacher] == ["none"]


def test_an_unknown_source_names_the_known_ones():
  with pytest.raises(ConfigError, match=r"teacher.source: .*unknown teacher source 'ofline' \(known: none, local, "
                                        r"remote, offline, cached\); did you mean 'offline'\?"):
    load_config(TrainConfig, None, ["teacher.source=ofline"])
  with pytest.raises(ValueError, match=r"unknown teacher source 'grpc' \(known: none, local, remote, offline, "
                                       r"cached\)$"):
    source_kind("grpc")
  with pytest.raises(ValueError, match="already registered"):
    registry.register_source(SourceKind("local", "student_trainer.sources.local:LocalTeacher"))
  wrong = SourceKind("local2", "student_trainer.sources.local:LocalTeacher")
  with pytest.raises(TypeError, match="registered as teacher source 'local2' but names itself 'local'"):
    wrong.load()


def test_each_source_s_own_options_say_what_they_lack():
  assert LocalTeacherConfig().missing() and LocalTeacherConfig(model="tiny").missing() is None
  assert OfflineTeacherConfig().missing() == "teacher.offline.path: required when teacher.source is offline"
  with pytest.raises(ConfigError, match="teacher.cached.path: required by the cached source"):
    load_config(TrainConfig, None, ["teacher.source=cached"])
  with pytest.raises(ConfigError, match="teacher.cached.path: required by the cached source"):
    load_config(TrainConfig, None, ["teacher.source=remote", "teacher.remote.on_timeout=cached_shards"])
  assert load_config(TrainConfig, None, ["teacher.source=remote"]).teacher.own_options.missing() is None
  local = load_config(TrainConfig, None, ["teacher.source=local", "teacher.local.model=tiny"])
  assert local.teacher.local.known_teacher()[1] == "teacher.local.model"
  assert load_config(TrainConfig, None, ["teacher.source=local", "teacher.local.model=tiny",
                                         "teacher.local.hf_checkpoint=x"]).teacher.local.known_teacher() is None


def test_the_student_side_of_a_run_is_what_sources_read():
  cfg = load_config(TrainConfig, None, ["loss.beta=0.5", "teacher.value_dtype=bfloat16"])
  student = Student.of(cfg)
  assert (student.model, student.loss, student.data, student.value_dtype) == (cfg.model, cfg.loss, cfg.data,
                                                                               "bfloat16")
  assert student.state_names == ("attn_out",)
  depth = cfg.model.num_hidden_layers
  assert student.feature_layers(depth) == tuple(range(depth))
  assert student.teacher_layers(layers=depth, width=cfg.model.hidden_size + 8, where="t") == tuple(range(depth))
  blockwise = Student.of(load_config(TrainConfig, None, ["loss.blockwise=true", "teacher.source=remote"]))
  with pytest.raises(ValueError, match=r"model.hidden_size is \d+ and t.hidden_size is 999"):
    blockwise.teacher_layers(layers=depth, width=999, where="t")
