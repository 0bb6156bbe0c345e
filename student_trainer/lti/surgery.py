"""Model surgery by regular expressions over parameter paths: plan first, then apply.

`make_plan` resolves every rule of an `LTIConfig` against the student's
abstract parameters and the teacher's parameter shapes (nothing is allocated,
no teacher bytes are read), and fails with a message naming the rule, the
pattern and the paths when a pattern matches nothing, names single layers of a
scanned student, or pairs tensors of different shapes. `Plan.describe()` is
what `--lti-plan` prints. `apply_plan` then performs it on a concrete student:

1. projections: each matched `...{q,k,v,o}_proj.kernel` becomes an `LTIProj`
   whose C is the teacher kernel (stacked over the layer map for scanned layers)
   and whose A, B (or W) and bias start as the configured slice of the teacher;
2. share: every path matching a share rule becomes the variable at its target;
3. copy: teacher tensors are copied into matching student parameters (the
   run's top-level `copy_from_teacher`; with `lti.enabled` false this is the
   only step, and every parameter trains);
4. train: the parameters the optimizer updates (`TrainablePaths`); all others
   stay bit-identical.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from flax import nnx

from distill_core.checkpoints import abstract_model
from distill_core.model.config import ModelConfig
from student_trainer.lti import kernels
from student_trainer.lti.config import LTIConfig, PathRule
from student_trainer.lti.modules import LTIProj, locate
from student_trainer.lti.teacher import TeacherParams

_PROJ = re.compile(r"^(?P<prefix>.*self_attn\.)(?P<kind>[qkvo])_proj\.kernel$")
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


class LTIPlanError(ValueError):
  """A surgery rule that cannot be applied; the message names the rule, pattern and paths."""


@dataclasses.dataclass(frozen=True)
class TrainablePaths:
  """An nnx filter: the `nnx.Param`s at these paths (the optimizer's `wrt`)."""

  paths: frozenset[str]

  def __call__(self, path, value) -> bool:
    return isinstance(value, nnx.Param) and ".".join(map(str, path)) in self.paths


@dataclasses.dataclass
class Projection:
  path: str  # student kernel path
  kind: str
  teacher: list[str]  # one name, or one per student layer (scanned)
  rule: int
  has_bias: bool
  teacher_bias: list[str] | None
  value_kernels: list[str] | None  # teacher value kernels, for b_init=svd


@dataclasses.dataclass
class Plan:
  """What every rule matched (all paths are student paths unless named teacher)."""

  cfg: LTIConfig
  copy_rules: list[PathRule]
  scanned: bool
  projections: list[Projection]
  share: list[tuple[int, str, str]]  # (rule, alias path, target path)
  copy: list[tuple[int, str, list[str]]]  # (rule, student path, teacher names)
  trainable: list[str]
  frozen: list[str]
  shapes: dict[str, tuple[int, ...]]  # student parameters after the surgery
  teacher_shapes: dict[str, tuple[int, ...]]
  teacher_record: dict[str, Any]

  def teacher_names(self) -> list[str]:
    names = set()
    for p in self.projections:
      names.update(p.teacher)
      names.update(p.teacher_bias or [])
      names.update(p.value_kernels or [])
    for _, _, t in self.copy:
      names.update(t)
    return sorted(names)

  def describe(self) -> str:
    cfg, lines = self.cfg, []
    nbytes = sum(int(np.prod(self.teacher_shapes[n])) * 4 for n in self.teacher_names())
    lines.append(f"teacher: {self.teacher_record}; {len(self.teacher_names())} tensors to fetch "
                 f"(~{nbytes / 2**20:.1f} MiB as f32)")
    lines.append(f"student layers: {'scanned (rules apply to whole stacks)' if self.scanned else 'unrolled'}")
    for i, rule in enumerate(cfg.projections):
      hits = [p for p in self.projections if p.rule == i]
      lines.append(f"lti.projections[{i}] {rule.student!r} ({cfg.map}, a_init={cfg.a_init}, b_init={cfg.b_init}):"
                   f" {len(hits)} projection(s)")
      for p in hits:
        src = p.teacher[0] if len(p.teacher) == 1 else f"stack of {', '.join(p.teacher)}"
        lines.append(f"  {p.path} <- C = teacher {src} {self.teacher_shapes[p.teacher[0]]}"
                     + (" (+ bias)" if p.has_bias else ""))
    for i, rule in enumerate(cfg.share):
      hits = [(a, t) for r, a, t in self.share if r == i]
      lines.append(f"lti.share[{i}] {rule.param!r} -> {rule.to!r}: {len(hits)} tied")
      lines += [f"  {a} = {t} {self.shapes[t]}" for a, t in hits]
    for i, rule in enumerate(self.copy_rules):
      hits = [(s, t) for r, s, t in self.copy if r == i]
      lines.append(f"copy_from_teacher[{i}] {rule.student!r}: {len(hits)} copied")
      for s, t in hits:
        src = t[0] if len(t) == 1 else f"stack of {', '.join(t)}"
        lines.append(f"  {s} {self.shapes[s]} <- teacher {src}")
    lines.append(f"{'lti.train ' + str(cfg.train) if cfg.enabled else 'without learn-to-init every parameter'}: "
                 f"{len(self.trainable)} trainable, {len(self.frozen)} frozen")
    lines += [f"  train  {p} {self.shapes[p]}" for p in self.trainable]
    lines += [f"  frozen {p} {self.shapes[p]}" for p in self.frozen]
    return "\n".join(lines)


def _param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  abstract = abstract_model(cfg)
  return {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def _no_match(section: str, pattern: str, paths, scanned: bool, unrolled_paths) -> LTIPlanError:
  if scanned and any(re.search(pattern, p) for p in unrolled_paths):
    return LTIPlanError(
        f"{section} {pattern!r} names single layers, but the student's layers are scanned: a scanned "
        "model has one stacked path per parameter (e.g. layers.self_attn.q_proj.kernel), so rules apply "
        "to whole stacks; use an unscanned student (model.scan_layers=false) for layer-wise rules")
  examples = ", ".join(sorted(paths)[:6])
  return LTIPlanError(f"{section} {pattern!r} matches no student parameter (paths look like: {examples}, ...)")


def _matches(section: str, pattern: str, paths, scanned: bool, unrolled_paths) -> list[str]:
  hits = [p for p in paths if re.search(pattern, p)]
  if not hits:
    raise _no_match(section, pattern, paths, scanned, unrolled_paths)
  return hits


class _Teacher:
  """Resolves teacher names for student paths (templates, layer map, stacking)."""

  def __init__(self, cfg: LTIConfig, teacher: TeacherParams, student_layers: int, scanned: bool):
    self.cfg, self.teacher, self.student_layers, self.scanned = cfg, teacher, student_layers, scanned
    if cfg.layer_map is not None:
      if len(cfg.layer_map) != student_layers:
        raise LTIPlanError(f"lti.layer_map {cfg.layer_map}: needs one teacher layer per student layer "
                           f"({student_layers})")
      bad = [i for i in cfg.layer_map if not 0 <= i < teacher.num_layers]
      if bad:
        raise LTIPlanError(f"lti.layer_map {cfg.layer_map}: layers {bad} out of range for a "
                           f"{teacher.num_layers}-layer teacher")

  def _layer(self, j: int) -> int:
    return self.cfg.layer_map[j] if self.cfg.layer_map is not None else j

  def names(self, section: str, student_path: str, match: re.Match, template: str | None) -> list[str]:
    name = match.expand(template) if template else student_path
    if _stacked(student_path, self.scanned) and name.startswith("layers.") and not _LAYER.match(name):
      names = [f"layers.{self._layer(j)}.{name[len('layers.'):]}" for j in range(self.student_layers)]
    elif not template and (m := _LAYER.match(name)):
      names = [f"layers.{self._layer(int(m.group(1)))}.{m.group(2)}"]
    else:
      names = [name]
    missing = [n for n in names if n not in self.teacher.shapes]
    if missing:
      raise LTIPlanError(f"{section}: the teacher has no parameter {missing[0]} (for student {student_path}); "
                         f"teacher paths look like: {', '.join(sorted(self.teacher.shapes)[:6])}, ...")
    return names

  def shape(self, names: list[str], section: str, student_path: str) -> tuple[int, ...]:
    shapes = {self.teacher.shapes[n] for n in names}
    if len(shapes) != 1:
      raise LTIPlanError(f"{section}: teacher tensors {names} differ in shape: {sorted(shapes)}")
    base = shapes.pop()
    return ((self.student_layers,) + base) if _stacked(student_path, self.scanned) else base


def _stacked(student_path: str, scanned: bool) -> bool:
  """Whether a student parameter is a scanned stack (one slice per layer)."""
  return scanned and student_path.startswith("layers.")


def make_plan(student: ModelConfig, cfg: LTIConfig, teacher: TeacherParams, copy_rules: Sequence[PathRule] = ()) -> Plan:
  """Resolves every rule; raises LTIPlanError naming the rule, pattern and paths on any problem.

  `copy_rules` are the run's `copy_from_teacher`. With `cfg.enabled` false only they apply (no
  projections, no ties) and every student parameter trains.
  """
  scanned = student.scan_layers
  shapes = _param_shapes(student)
  unrolled = _param_shapes(student.model_copy(update={"scan_layers": False})) if scanned else shapes
  resolve = _Teacher(cfg, teacher, student.num_hidden_layers, scanned)
  lead = (student.num_hidden_layers,) if scanned else ()

  projections: list[Projection] = []
  claimed: dict[str, int] = {}
  for i, rule in enumerate(cfg.projections if cfg.enabled else ()):
    section = f"lti.projections[{i}]"
    hits = _matches(f"{section}.student", rule.student, shapes, scanned, unrolled)
    for path in hits:
      m = _PROJ.match(path)
      if not m:
        raise LTIPlanError(f"{section}.student {rule.student!r} matches {path}, which is not an attention "
                           "projection kernel (...self_attn.{q,k,v,o}_proj.kernel)")
      if path in claimed:
        raise LTIPlanError(f"{path} is matched by lti.projections[{claimed[path]}] and [{i}]")
      claimed[path] = i
      kind = m.group("kind")
      names = resolve.names(section, path, re.search(rule.student, path), rule.teacher)
      c_shape = resolve.shape(names, section, path)
      e_axis = -1 if kind == "o" else len(lead)
      if c_shape[e_axis] != student.hidden_size:
        raise LTIPlanError(f"{section}: teacher {names[0]} has width {c_shape[e_axis]}, the student "
                           f"{student.hidden_size}; learn-to-init needs equal embedding widths")
      bias_path = path[:-len("kernel")] + "bias"
      t_bias = [n[:-len("kernel")] + "bias" for n in names]
      t_bias = t_bias if all(n in teacher.shapes for n in t_bias) else None
      value = [re.sub(r"[qko]_proj\.kernel$", "v_proj.kernel", n) for n in names] \
          if cfg.b_init == "svd" and kind in ("v", "o") else None
      if value is not None and any(n not in teacher.shapes for n in value):
        raise LTIPlanError(f"{section}: b_init=svd needs the teacher value kernels {value}")
      projections.append(Projection(path, kind, names, i, bias_path in shapes, t_bias, value))

  # The student's parameters after the projections become LTI.
  after = dict(shapes)
  for p in projections:
    del after[p.path]
    prefix = p.path[:-len("kernel")]
    c_shape = resolve.shape(p.teacher, "", p.path)
    if p.kind == "o":
      ht, dt = c_shape[len(lead)], c_shape[len(lead) + 1]
      hs, ds = shapes[p.path][len(lead)], shapes[p.path][len(lead) + 1]
    else:
      ht, dt = c_shape[len(lead) + 1], c_shape[len(lead) + 2]
      hs, ds = shapes[p.path][len(lead) + 1], shapes[p.path][len(lead) + 2]
    if ds > dt or ds % 2 or dt % 2:
      raise LTIPlanError(f"lti.projections[{p.rule}]: {p.path} has head dim {ds}, its teacher kernel {p.teacher[0]} "
                         f"{dt}; the initial maps need even head dims with the student's <= the teacher's")
    if cfg.map == "general":
      after[prefix + "w"] = lead + (ht, dt, hs, ds)
    else:
      after[prefix + "a"] = lead + (ht, hs)
      after[prefix + "b"] = lead + ((ds, dt) if p.kind == "o" else (dt, ds))

  if scanned:  # for "names single layers" errors: the per-layer names the stacks would have unrolled
    unrolled = list(unrolled) + [f"layers.{j}.{p[len('layers.'):]}" for p in after if p.startswith("layers.")
                                 for j in range(student.num_hidden_layers)]
  share, aliases = [], {}
  for i, rule in enumerate(cfg.share if cfg.enabled else ()):
    section = f"lti.share[{i}]"
    hits = _matches(f"{section}.param", rule.param, after, scanned, unrolled)
    for path in hits:
      target = re.search(rule.param, path).expand(rule.to)
      if target not in after:
        raise LTIPlanError(f"{section}: target {target} (for {path}) is not a student parameter")
      if target == path:
        continue
      if after[target] != after[path]:
        raise LTIPlanError(f"{section}: cannot tie {path} {after[path]} to {target} {after[target]}: shapes differ")
      share.append((i, path, target))
      aliases[path] = target

  copy = []
  for i, rule in enumerate(copy_rules):
    section = f"copy_from_teacher[{i}]"
    hits = _matches(f"{section}.student", rule.student, after, scanned, unrolled)
    for path in hits:
      names = resolve.names(section, path, re.search(rule.student, path), rule.teacher)
      t_shape = resolve.shape(names, section, path)
      if t_shape != after[path]:
        raise LTIPlanError(f"{section}: cannot copy teacher {names[0] if len(names) == 1 else names} "
                           f"{t_shape} into student {path} {after[path]}: shapes differ")
      copy.append((i, path, names))

  # Trainable: canonical (non-alias) paths any of whose names matches a train pattern.
  canonical = [p for p in after if p not in aliases]
  group = {p: [p] for p in canonical}
  for alias, target in aliases.items():
    group[_root(target, aliases)].append(alias)
  trainable = set() if cfg.enabled else set(canonical)
  for i, pattern in enumerate(cfg.train if cfg.enabled else ()):
    hits = [p for p in canonical if any(re.search(pattern, n) for n in group[p])]
    if not hits:
      raise _no_match(f"lti.train[{i}]", pattern, after, scanned, unrolled)
    trainable.update(hits)
  return Plan(cfg, list(copy_rules), scanned, projections, share, copy, sorted(trainable),
              sorted(p for p in canonical if p not in trainable), after, dict(teacher.shapes), teacher.record())


def _root(path: str, aliases: dict[str, str]) -> str:
  seen = set()
  while path in aliases and path not in seen:
    seen.add(path)
    path = aliases[path]
  return path


def _stack(arrays: dict[str, np.ndarray], names: list[str], stacked: bool, n_layers: int) -> np.ndarray:
  if not stacked:
    return arrays[names[0]]
  if len(names) == 1:  # one teacher layer for the whole stack
    return np.stack([arrays[names[0]]] * n_layers)
  return np.stack([arrays[n] for n in names])


def _initial_maps(p: Projection, cfg: LTIConfig, student: ModelConfig, c: np.ndarray, teacher_kv: int,
                  arrays, scanned: bool) -> dict[str, np.ndarray]:
  lead = c.shape[:1] if scanned else ()
  if p.kind == "o":
    ht, dt = c.shape[len(lead)], c.shape[len(lead) + 1]
  else:
    ht, dt = c.shape[len(lead) + 1], c.shape[len(lead) + 2]
  ds = student.dim_per_head
  a = kernels.head_map(p.kind, cfg.a_init, teacher_heads=ht if p.kind in ("q", "o") else teacher_kv,
                       teacher_kv_heads=teacher_kv, student_heads=student.num_attention_heads,
                       student_kv_heads=student.num_key_value_heads)
  value = None
  if p.value_kernels:
    value = _stack(arrays, p.value_kernels, scanned, student.num_hidden_layers)
  b = kernels.dim_map(p.kind, cfg.b_init, teacher_dim=dt, student_dim=ds, value_kernel=value)
  if scanned:
    a = np.broadcast_to(a, lead + a.shape).copy()
    if b.ndim == 2:
      b = np.broadcast_to(b, lead + b.shape).copy()
  if cfg.map == "general":
    return {"w": kernels.general_map(a, b, p.kind)}
  return {"a": a, "b": b}


def apply_plan(model, plan: Plan, arrays: dict[str, np.ndarray]) -> TrainablePaths:
  """Performs `plan` on the concrete student `model` in place; returns the optimizer's `wrt` filter."""
  student: ModelConfig = model.cfg
  scanned, n_layers = plan.scanned, student.num_hidden_layers
  dtype, param_dtype = np.dtype(student.dtype), np.dtype(student.param_dtype)
  for p in plan.projections:
    c = _stack(arrays, p.teacher, scanned, n_layers)
    k_names = [re.sub(r"[qvo]_proj\.kernel$", "k_proj.kernel", n) for n in p.teacher]
    teacher_kv = plan.teacher_shapes[k_names[0]][1] if k_names[0] in plan.teacher_shapes else \
        (c.shape[-2] if p.kind in ("k", "v") else None)
    if teacher_kv is None:
      raise LTIPlanError(f"{p.path}: cannot find the teacher's kv-head count ({k_names[0]} is missing)")
    maps = _initial_maps(p, plan.cfg, student, c, teacher_kv, arrays, scanned)
    bias = None
    if p.has_bias:
      parent, attr = locate(model, p.path)
      bias = np.asarray(parent.bias[...], np.float32)
      if p.teacher_bias:
        tb = _stack(arrays, p.teacher_bias, scanned, n_layers)
        bias = np.asarray(kernels.effective_bias(p.kind, tb, maps.get("a"), maps.get("b"), maps.get("w"),
                                                 layered=scanned))
    grand, name = locate(model, p.path[:-len(".kernel")])
    setattr(grand, name, LTIProj(p.kind, c, **maps, bias=bias, layered=scanned, dtype=dtype,
                                 param_dtype=param_dtype))
  for _, alias, target in plan.share:
    holder, attr = locate(model, target)
    alias_holder, alias_attr = locate(model, alias)
    setattr(alias_holder, alias_attr, getattr(holder, attr))
  for _, path, names in plan.copy:
    holder, attr = locate(model, path)
    var = getattr(holder, attr)
    var.set_value(np.asarray(_stack(arrays, names, _stacked(path, scanned), n_layers)).astype(var.get_value().dtype))
  # NNX keeps a shared variable under one of its paths (not necessarily the share target).
  aliases = {alias: target for _, alias, target in plan.share}
  present = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  return TrainablePaths(frozenset(p for p in present if _root(p, aliases) in plan.trainable))
