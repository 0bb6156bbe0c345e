"""Typed configuration: YAML files, `key=value` overrides, clear validation errors.

Every config class derives from :class:`ConfigBase` (pydantic, unknown keys
forbidden, every field described). A YAML file may name a ``base:`` file (a
path relative to itself, or a list of them) whose contents it extends, so
presets derive from each other instead of copying. Sub-configs that accept a
preset name (``model: tiny``) resolve it from ``configs/models/<name>.yaml``.
"""

from __future__ import annotations

import copy
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import pydantic
import yaml

from distill_core.wire import echo

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MODEL_PRESET_DIR = CONFIG_DIR / "models"

T = TypeVar("T", bound="ConfigBase")
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
  """A configuration could not be loaded; the message names the key."""


class ConfigBase(pydantic.BaseModel):
  """Base for all configs: strict keys, validated assignment, immutable-ish."""

  model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
  """Recursively merges ``update`` into a copy of ``base`` (mappings merge, rest replace)."""
  out = copy.deepcopy(dict(base))
  for key, value in update.items():
    if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
      out[key] = deep_merge(out[key], value)
    else:
      out[key] = copy.deepcopy(value)
  return out


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
  """Loads a YAML mapping, resolving ``base:`` references relative to the file."""
  path = Path(path).resolve()
  if path in _seen:
    raise ConfigError(f"{path}: circular 'base' chain: {' -> '.join(map(str, _seen + (path,)))}")
  if not path.is_file():
    raise ConfigError(f"config file not found: {path}")
  try:
    data = yaml.safe_load(path.read_text()) or {}
  except yaml.YAMLError as e:
    raise ConfigError(f"{path}: invalid YAML: {e}") from e
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
  bases = data.pop("base", None)
  if bases is None:
    return data
  merged: dict[str, Any] = {}
  for b in [bases] if isinstance(bases, str) else bases:
    merged = deep_merge(merged, load_yaml(path.parent / b, _seen + (path,)))
  return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
  """Parses ``a.b.c=value``; the value is read as YAML (``3`` int, ``[1,2]`` list, ``null``).

  A value YAML cannot read that is not meant as a list, mapping or quoted string (``**/*.md``,
  which YAML takes for an alias) is the plain string as typed.
  """
  if "=" not in text:
    raise ConfigError(f"override {text!r} is not of the form key=value")
  key, raw = text.split("=", 1)
  key = key.strip()
  if not key or any(not part for part in key.split(".")):
    raise ConfigError(f"override {text!r} has an empty key")
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError as e:
    if raw.lstrip()[:1] in "[{\"'":  # meant as a list, mapping or quoted string: a real mistake
      raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {e}") from e
    value = raw  # a plain string YAML cannot read as one, such as a glob: glob=**/*.md
  if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
    value = float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
  return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
  """Applies ``key=value`` overrides; intermediate mappings are created as needed."""
  data = copy.deepcopy(data)
  for text in overrides:
    path, value = parse_override(text)
    node = data
    for part in path[:-1]:
      child = node.get(part)
      if isinstance(child, str):  # a preset name, expanded so a sub-key can be overridden
        child = {"preset": child}
      if child is None:
        child = {}
      if not isinstance(child, dict):
        raise ConfigError(f"override {'.'.join(path)}: {part!r} is not a mapping")
      node[part] = child
      node = child
    node[path[-1]] = value
  return data


SECRET_PARTS = ("token", "secret", "password", "key")  # config keys whose values an error never shows


def _shown_input(loc: tuple, value: Any) -> str:
  """What an error shows of the offending value: short, never a secret, never a whole section."""
  if isinstance(value, Mapping):
    return ""  # a section-level error: its location names it, and the section may hold secrets
  if any(part in str(name).lower() for name in loc for part in SECRET_PARTS):
    return " (value not shown)"
  return f" (got {echo(value)})"


def _config_class(ann: Any) -> type[pydantic.BaseModel] | None:
  """The config class inside `ann`, also through Annotated and `X | None`."""
  if typing.get_origin(ann) is typing.Annotated:
    ann = typing.get_args(ann)[0]
  if typing.get_origin(ann) in (typing.Union, types.UnionType):
    found = [c for c in map(_config_class, typing.get_args(ann)) if c is not None]
    return found[0] if len(found) == 1 else None
  return ann if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel) else None


def close_keys(cls: type[pydantic.BaseModel] | None, loc: Sequence[Any]) -> list[str]:
  """Known keys near the unknown key at `loc` (difflib), as full dotted paths."""
  *parents, leaf = [str(p) for p in loc]
  section = cls
  for part in parents:
    field = section.model_fields.get(part) if section is not None else None
    section = _config_class(field.annotation) if field is not None else None
  if section is None:
    return []
  prefix = "".join(f"{p}." for p in parents)
  return [prefix + k for k in difflib.get_close_matches(leaf, list(section.model_fields), n=3, cutoff=0.6)]


def _override_of(loc: Sequence[Any], overrides: Sequence[str]) -> str | None:
  """The key of the last override that set `loc` or a section above it (the one to blame), if any.
  Only the key: a value may be long or secret."""
  loc = [str(p) for p in loc]
  blamed = None
  for text in overrides:
    path, _ = parse_override(text)
    if loc[:len(path)] == path:
      blamed = ".".join(path)
  return blamed


def format_validation_error(err: pydantic.ValidationError, source: str, *, cls=None,
                            overrides: Sequence[str] = (), file: str | None = None) -> str:
  """One line per problem, each saying where the bad value came from (an override or `source`) and, for an
  unknown key, the known keys that are close to it."""
  lines = [f"invalid configuration ({source}):"]
  for e in err.errors():
    loc = ".".join(str(p) for p in e["loc"]) or "<root>"
    override = _override_of(e["loc"], overrides)
    origin = f"the override {override}=..." if override else (file or source)
    if e["type"] == "extra_forbidden":
      near = close_keys(cls, e["loc"])
      hint = f"; did you mean {' or '.join(near)}?" if near else ""
      lines.append(f"  {loc}: unknown key (from {origin}){hint}")
    else:
      lines.append(f"  {loc}: {e['msg']}{_shown_input(e['loc'], e.get('input'))}"
                   + (f" (from {origin})" if override else ""))
  if len(lines) == 2:  # one problem: one line
    return f"{lines[0]} {lines[1].strip()}"
  return "\n".join(lines)


def build(cls: type[T], data: Mapping[str, Any], source: str = "config", overrides: Sequence[str] = (),
          file: str | None = None) -> T:
  try:
    return cls.model_validate(data)
  except pydantic.ValidationError as e:
    raise ConfigError(format_validation_error(e, source, cls=cls, overrides=overrides, file=file)) from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
  """Loads ``cls`` from an optional YAML file plus ``key=value`` overrides."""
  data = load_yaml(path) if path is not None else {}
  data = apply_overrides(data, overrides)
  source = (str(path) if path else "defaults") + (" + overrides" if overrides else "")
  return build(cls, data, source=source, overrides=overrides, file=str(path) if path else "the defaults")


def resolve_preset(value: Any, preset_dir: Path = MODEL_PRESET_DIR) -> Any:
  """``"tiny"`` or ``{"preset": "tiny", ...}`` -> the preset's mapping with the extra keys on top."""
  if isinstance(value, str):
    value = {"preset": value}
  if isinstance(value, Mapping) and "preset" in value:
    value = dict(value)
    name = value.pop("preset")
    candidate = Path(name)
    if candidate.suffix not in (".yaml", ".yml"):
      candidate = preset_dir / f"{name}.yaml"
    if not candidate.is_file():
      known = sorted(p.stem for p in preset_dir.glob("*.yaml"))
      raise ConfigError(f"unknown preset {name!r} (known: {', '.join(known)})")
    return deep_merge(load_yaml(candidate), value)
  return value


def _type_name(ann: Any) -> str:
  """`int`, `float | None`, `one of tail|renormalize|topk`, `list[int]`... for --help."""
  origin, args = typing.get_origin(ann), typing.get_args(ann)
  if origin is typing.Literal:
    return "one of " + "|".join(str(a) for a in args)
  if origin is typing.Annotated:
    return _type_name(args[0])
  if origin in (typing.Union, types.UnionType):
    return " | ".join(_type_name(a) for a in args)
  if ann is type(None):
    return "None"
  if origin is not None:
    return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
  return getattr(ann, "__name__", str(ann))


def _model_class(ann: Any) -> type[pydantic.BaseModel] | None:
  """The config class inside `ann` (also through Annotated), if it is one."""
  if typing.get_origin(ann) is typing.Annotated:
    ann = typing.get_args(ann)[0]
  return ann if isinstance(ann, type) and issubclass(ann, pydantic.BaseModel) else None


def describe(cls: type[pydantic.BaseModel], prefix: str = "",
             current: pydantic.BaseModel | None = None) -> list[str]:
  """One line per option, `key (type, default): description`, recursing into sub-configs.

  `current` (an instance of `cls`) supplies the defaults a parent config gives its sub-config.
  """
  lines = []
  for name, field in cls.model_fields.items():
    key = f"{prefix}{name}"
    if current is not None:
      has_default, value = True, getattr(current, name)
    elif field.is_required():
      has_default, value = False, None
    else:
      has_default, value = True, field.get_default(call_default_factory=True)
    sub = _model_class(field.annotation)
    if sub is not None and has_default and not isinstance(value, sub):  # e.g. a preset name
      try:
        value = pydantic.TypeAdapter(typing.Annotated[(field.annotation, *field.metadata)]).validate_python(value)
      except (pydantic.ValidationError, ConfigError):
        value = None
    if sub is not None:
      lines.append(f"{key}: {field.description or ''}")
      lines.extend(describe(sub, prefix=f"{key}.", current=value if isinstance(value, sub) else None))
      continue
    default = f"default {value!r}" if has_default else "required"
    lines.append(f"{key} ({_type_name(field.annotation)}, {default}): {field.description or ''}")
  return lines
