"""The teacher-target contract: what every teacher source hands the student's losses.

A teacher's answer for a batch of B sequences of length T (position t describes token t+1,
like the student's logits at t) is a `TeacherTargets`: a composition of *parts*, one per
kind of answer, registered in `distill_core.parts`:

`topk` (every answer has it), `states`, `samples` and `dense` (in-process only), each in
`distill_core/parts/<name>.py`, whose module documents its fields' shapes and meaning.
`TeacherTargets` exposes every field by its flat name (`targets.topk_ids`,
`targets.layer_states`; None, `{}`, `()` or 0 where the part is absent) and
`targets.has_<part>`, is built from flat fields (`TeacherTargets(topk_ids=..., ...)`,
`targets.replace(...)`) and is a JAX pytree whose leaves are the present parts' arrays
(static metadata such as `state_layers` is not a leaf). `compute_targets` builds it on the
device inside the teacher's jitted forward; `to_numpy` / `from_numpy` give flat host
arrays; `slice_batch` / `concat` work on rows. Everything here iterates over the parts.
docs/targets.md says what a part provides.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distill_core.parts import BY_NAME, COMPUTE_ARG_OWNER, FIELD_OWNER, HOOKS, PARTS, Block, Part, Rows
from distill_core.parts.base import VALUE_DTYPES, value_dtype_of  # noqa: F401  (part of this module's API)
from distill_core.parts.dense import DenseHead  # noqa: F401  (part of this module's API)

from distill_core.parts.states import STATE_NAMES  # noqa: F401  (part of this module's API)

Array = Any  # jax.Array or np.ndarray (host side)


@jax.tree_util.register_pytree_node_class
class TeacherTargets:
  """A teacher's answer for one batch: the values of the parts present, by part name (a JAX pytree).

  Built from flat fields, each routed to the part that declares it; the top-k part is always
  present, any other only when one of its fields is given.
  """

  __slots__ = ("parts",)

  def __init__(self, **fields):
    parts = {}
    for part in PARTS:
      own = {name: fields.pop(name) for name in part.fields if name in fields}
      value = part.build(own)
      if value is not None:
        parts[part.name] = value
    if fields:
      raise TypeError(f"TeacherTargets: unknown fields {', '.join(sorted(fields))}")
    object.__setattr__(self, "parts", parts)

  @classmethod
  def of(cls, parts: Mapping[str, Any]) -> "TeacherTargets":
    """From part values by name (None values are left out)."""
    out = object.__new__(cls)
    object.__setattr__(out, "parts", {part.name: parts[part.name] for part in PARTS
                                      if parts.get(part.name) is not None})
    return out

  def tree_flatten(self):
    names = tuple(self.parts)
    return tuple(self.parts[name] for name in names), names

  @classmethod
  def tree_unflatten(cls, names, children):
    out = object.__new__(cls)
    object.__setattr__(out, "parts", dict(zip(names, children)))
    return out

  def field(self, name: str):
    """The flat field `name` of whatever part declares it (what `targets.<name>` reads)."""
    owner = FIELD_OWNER.get(name)
    if owner is None:
      raise AttributeError(f"TeacherTargets has no field {name!r}")
    value = self.parts.get(owner.name)
    return owner.absent.get(name) if value is None else getattr(value, name)

  def __setattr__(self, name, value):
    raise AttributeError("TeacherTargets is immutable; use replace()")

  def __repr__(self) -> str:
    return f"TeacherTargets({', '.join(f'{k}={v!r}' for k, v in self.parts.items())})"

  def part(self, name: str):
    """The value of part `name` (None when absent)."""
    if name not in BY_NAME:
      raise KeyError(f"no teacher-target part {name!r} (registered: {', '.join(BY_NAME)})")
    return self.parts.get(name)

  def fields(self) -> dict[str, Any]:
    """Every present part's flat fields."""
    return {key: value for name, part in self.parts.items() for key, value in BY_NAME[name].to_fields(part).items()}

  def replace(self, **changes) -> "TeacherTargets":
    """A copy with flat fields changed; a part whose fields become empty is dropped."""
    by_part = _group_by_owner(changes, FIELD_OWNER, lambda key: f"TeacherTargets: unknown field {key!r}")
    parts = dict(self.parts)
    for name, own in by_part.items():
      part = BY_NAME[name]
      current = parts.get(name)
      fields = {**(part.to_fields(current) if current is not None else {}), **own}
      parts[name] = part.build(fields)
    return TeacherTargets.of(parts)

  def with_parts(self, **values) -> "TeacherTargets":
    """A copy with whole part values replaced by name (None drops the part)."""
    for name in values:
      self.part(name)
    return TeacherTargets.of({**self.parts, **values})

  @property
  def batch_size(self) -> int:
    return self.topk_ids.shape[0]

  @property
  def seq_len(self) -> int:
    return self.topk_ids.shape[1]

  @property
  def k(self) -> int:
    return self.topk_ids.shape[2]

  @property
  def n_temps(self) -> int:
    return self.logsumexp.shape[2]

  @property
  def rows(self) -> Rows:
    return Rows(batch_size=self.batch_size, seq_len=self.seq_len, k=self.k)

  @property
  def has_dense(self) -> bool:
    """Dense teacher logits are available: whole, or as hidden states and the lm_head."""
    return self.dense_logits is not None or self.dense_hidden is not None

  def dense(self) -> Array:
    """(B, T, V) dense teacher logits f32 (formed from dense_hidden when that is what they carry)."""
    return self.parts["dense"].logits()

  def map_rows(self, fn: Callable[[Array, int], Array]) -> "TeacherTargets":
    """Applies `fn(array, axis)` to every array indexed by the batch row (B is axis 1 of the states)."""
    return TeacherTargets.of({name: BY_NAME[name].map_rows(value, fn) for name, value in self.parts.items()})

  def map_shared(self, fn: Callable[[Array], Array]) -> "TeacherTargets":
    """Applies `fn(array)` to every batch-wide array (the temperatures, the proposal's tau)."""
    return TeacherTargets.of({name: BY_NAME[name].map_shared(value, fn) for name, value in self.parts.items()})

  def positional(self) -> dict[str, Array]:
    """The present (B, T, ...) arrays by field name (what a block of positions holds)."""
    return {key: value for name, part in self.parts.items() for key, value in BY_NAME[name].to_fields(part).items()
            if key in BY_NAME[name].positional and value is not None}

  def validate(self, *, batch_size: int | None = None, seq_len: int | None = None,
               k: int | None = None, n_temps: int | None = None, hidden_size: int | None = None,
               state_names: Sequence[str] | None = None,
               state_layers: Sequence[int] | None = None) -> "TeacherTargets":
    """Checks ranks, dtypes and shapes (and the expected sizes given) of every part; returns self.

    Raises:
      ValueError: naming the first offending field.
    """
    expect = dict(batch_size=batch_size, seq_len=seq_len, k=k, n_temps=n_temps, hidden_size=hidden_size,
                  state_names=state_names, state_layers=state_layers)
    topk = self.parts["topk"]
    BY_NAME["topk"].validate(topk, None, expect)
    rows = self.rows
    for part in PARTS[1:]:
      value = self.parts.get(part.name)
      if value is None:
        part.validate_absent(expect)
      else:
        part.validate(value, rows, expect)
    return self

  def temperature_index(self, temperature: float, *, rtol: float = 1e-5) -> int:
    """The column of `logsumexp` computed at `temperature` (host-side lookup).

    Raises:
      ValueError: if no column matches.
    """
    temps = np.asarray(self.temperatures, np.float64)
    hits = np.flatnonzero(np.abs(temps - temperature) <= rtol * abs(temperature))
    if hits.size == 0:
      raise ValueError(f"temperatures: no logsumexp column for temperature {temperature} "
                       f"(have {temps.tolist()})")
    return int(hits[0])


_INSTALLED: dict[str, set[str]] = {}  # part name -> the properties it added to TeacherTargets


def _install(part: Part, added: bool) -> None:
  """Every field of a registered part becomes a property of TeacherTargets (`targets.layer_states`), and
  `has_<part>` says whether the part is present; removed again with the part."""
  if not added:
    for name in _INSTALLED.pop(part.name, set()):
      delattr(TeacherTargets, name)
    return
  names = set()
  for name in part.fields:
    if not hasattr(TeacherTargets, name):
      setattr(TeacherTargets, name, property(lambda self, name=name: self.field(name)))
      names.add(name)
  flag = f"has_{part.name}"
  if not hasattr(TeacherTargets, flag):
    setattr(TeacherTargets, flag, property(lambda self, key=part.name: key in self.parts))
    names.add(flag)
  _INSTALLED[part.name] = names


HOOKS.append(_install)
for _part in PARTS:
  _install(_part, True)


def check_values(targets: TeacherTargets, *, vocab_size: int | None = None,
                 temperatures: Sequence[float] | None = None) -> TeacherTargets:
  """Checks the values of a teacher's answer (host arrays), beyond `validate`'s shapes; returns it.

  Each part checks its own: every top-k (and sampled) id is in [0, vocab_size) (an id outside
  makes the loss read past the logits); the temperatures are the ones asked for; the first
  top-k value of every position is exactly 0 (values are shifted by the row max).

  Raises:
    ValueError: naming the field and the first offending position.
  """
  for name, value in targets.parts.items():
    BY_NAME[name].check_values(value, vocab_size=vocab_size, temperatures=temperatures)
  return targets


def compute_targets(logits: jax.Array, *, k: int, temperatures: Array | Sequence[float],
                    true_vocab_size: int, value_dtype: str | np.dtype = "float16", start: Array | int = 0,
                    **part_args) -> TeacherTargets:
  """Top-k, per-temperature logsumexp and every other part asked for; pure jnp, under jit.

  `compute_targets_from_hidden` gives the same answer from the final hidden states, one block of
  positions at a time, without whole (B, T, V) logits.

  Args:
    logits: (B, T, V) teacher logits (any float dtype; computed in f32).
    k: how many ids to keep (static; 1 <= k <= true_vocab_size).
    temperatures: (n_temps,) temperatures (may be traced; n_temps is static).
    true_vocab_size: ids >= this are padding; their logits are set to -inf.
    value_dtype: dtype of `topk_logits` (and other parts' values): float16 (recommended), bfloat16 or float32.
    start: the position of column 0 of `logits` in its rows (nonzero when `logits` are one block of
      positions).
    **part_args: the other parts' arguments, each routed to the part declaring it
      (`Part.compute_args`, documented in the part's `compute`): e.g. `states`, `state_layers`,
      `state_dtype` for the layer states (`distill_core.parts.states`).
  """
  if logits.ndim != 3:
    raise ValueError(f"logits: expected rank 3 (B, T, V), got shape {tuple(logits.shape)}")
  vocab = logits.shape[-1]
  if not 0 < true_vocab_size <= vocab:
    raise ValueError(f"true_vocab_size: {true_vocab_size} not in [1, {vocab}]")
  if not 0 < k <= true_vocab_size:
    raise ValueError(f"k: {k} not in [1, true_vocab_size={true_vocab_size}]")
  dtype = value_dtype_of(value_dtype)
  args = _route(part_args)
  temps = jnp.asarray(temperatures, jnp.float32).reshape(-1)  # (n_temps,)
  z = logits.astype(jnp.float32)
  if true_vocab_size < vocab:
    z = jnp.where(jnp.arange(vocab) < true_vocab_size, z, -jnp.inf)
  z = z - jnp.max(z, axis=-1, keepdims=True)  # (B, T, V), row max exactly 0
  topk = BY_NAME["topk"].compute_topk(z, k=k, temperatures=temps, value_dtype=dtype)
  block = Block(z=z, topk=topk, start=start, true_vocab_size=true_vocab_size, value_dtype=dtype)
  parts = {"topk": topk}
  for part in PARTS[1:]:
    own = args.get(part.name, {})
    parts[part.name] = part.compute(block, **own) if part.chunked else part.compute_whole(**own)
  return TeacherTargets.of(parts)


def _route(part_args: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """`compute_targets`' keyword arguments grouped by the part that takes them."""
  return _group_by_owner(part_args, COMPUTE_ARG_OWNER,
                         lambda key: f"compute_targets: unknown argument {key!r} (no teacher-target part takes it)")


def _group_by_owner(items: Mapping[str, Any], owners: Mapping[str, Any],
                    unknown: Callable[[str], str]) -> dict[str, dict[str, Any]]:
  """`items` grouped by the name of the part `owners` maps each key to; TypeError(`unknown(key)`) for a key
  no part owns."""
  out: dict[str, dict[str, Any]] = {}
  for key, value in items.items():
    owner = owners.get(key)
    if owner is None:
      raise TypeError(unknown(key))
    out.setdefault(owner.name, {})[key] = value
  return out


def compute_targets_from_hidden(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], *,
                                chunk_size: int | None, **kwargs) -> TeacherTargets:
  """`compute_targets(head(hidden), ...)` computed per block of `chunk_size` positions.

  Each block runs the lm_head, the top-k, the logsumexp per temperature and every part computed
  from the logits (the draws) on its own (B, chunk_size, V) logits, so no (B, T, V) array ever
  exists: the temporaries are O(B x chunk_size x V). T is padded up to a multiple of chunk_size
  (the padded positions are computed and dropped). Every position's answer is the one
  `compute_targets` gives it on the whole logits, samples included (they are keyed by position,
  not by block). Parts not computed from the logits (the layer states) are computed once.

  Args:
    hidden: (B, T, E) the teacher's final hidden states (after the final norm).
    head: (B, C, E) -> (B, C, V) logits (the teacher's lm_head).
    chunk_size: positions per block; 0 or None (or >= T): one block.
    **kwargs: every other argument of `compute_targets` (k, temperatures, true_vocab_size, ...).
  """
  args = _route({key: value for key, value in kwargs.items() if key in COMPUTE_ARG_OWNER})
  whole = {part.name: part.compute_whole(**args.get(part.name, {})) for part in PARTS[1:] if not part.chunked}
  per_block = {key: value for key, value in kwargs.items()
               if key not in COMPUTE_ARG_OWNER or COMPUTE_ARG_OWNER[key].chunked}
  by_position = {key: per_block.pop(key) for key in list(per_block)
                 if key in COMPUTE_ARG_OWNER and key in COMPUTE_ARG_OWNER[key].positional_args}
  b, t = hidden.shape[:2]
  if not chunk_size or chunk_size >= t:
    return compute_targets(head(hidden), **per_block, **by_position).with_parts(**whole)
  n = -(-t // chunk_size)

  def split(x):  # (B, T, ...) -> (n, B, C, ...), zero-padded along T
    x = jnp.pad(x, [(0, 0), (0, n * chunk_size - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((b, n, chunk_size) + x.shape[2:]), 1, 0)

  blocks = split(hidden)  # (n, B, C, E)
  starts = jnp.arange(n, dtype=jnp.int32) * chunk_size

  def block(args):
    h, start, inputs = args
    return compute_targets(head(h), start=start, **per_block, **inputs)

  stacked = jax.lax.map(block, (blocks, starts, {key: split(jnp.asarray(x)) for key, x in by_position.items()}))

  def merge(x):  # (n, B, C, ...) -> (B, T, ...)
    return jnp.moveaxis(x, 0, 1).reshape((b, n * chunk_size) + x.shape[3:])[:, :t]

  merged = {name: BY_NAME[name].merge_blocks(value, merge) for name, value in stacked.parts.items()}
  return TeacherTargets.of({**merged, **whole})


def to_numpy(targets: TeacherTargets) -> dict[str, np.ndarray]:
  """Flat host arrays of every part: the fields by name (states as `layer_states.<name>`, layers as int32)."""
  out = {}
  for part in PARTS:
    value = targets.parts.get(part.name)
    if value is not None:
      out.update(part.to_numpy(value))
    elif part.name == "states":  # `state_layers` is always there (empty without states)
      out["state_layers"] = np.zeros((0,), np.int32)
  return out


def from_numpy(arrays: Mapping[str, np.ndarray], *, validate: bool = True) -> TeacherTargets:
  """Inverse of `to_numpy`; raises ValueError on missing or unknown keys and bad shapes."""
  for key in arrays:
    if not any(part.owns_key(key) for part in PARTS):
      BY_NAME["topk"].from_numpy(arrays)  # a missing top-k field is named first
      raise ValueError(f"teacher targets: unknown field {key!r}")
  fields: dict[str, Any] = {}
  for part in PARTS:
    fields.update(part.from_numpy(arrays))
  targets = TeacherTargets(**fields)
  return targets.validate() if validate else targets


def slice_batch(targets: TeacherTargets, start: int, stop: int) -> TeacherTargets:
  """Rows [start, stop) of the batch (states are sliced on their B axis, axis 1)."""
  return targets.map_rows(lambda x, axis: x[(slice(None),) * axis + (slice(start, stop),)])


def concat(parts: Sequence[TeacherTargets]) -> TeacherTargets:
  """Concatenates along B; the answers must agree on every part's batch-wide metadata (k, temperatures,
  states, layers, sampling)."""
  if not parts:
    raise ValueError("concat: no targets given")
  first = parts[0]
  for i, other in enumerate(parts[1:], start=1):
    for kind in PARTS:
      problem = kind.concat_mismatch(first.parts.get(kind.name), other.parts.get(kind.name))
      if problem:
        raise ValueError(f"concat: part {i} {problem}")
  xp = np if all(isinstance(p.topk_ids, np.ndarray) for p in parts) else jnp
  per_part = []
  for part in parts:  # map_rows visits the arrays in a fixed order
    arrays: list = []
    part.map_rows(lambda x, axis, arrays=arrays: arrays.append((x, axis)) or x)
    per_part.append(arrays)
  it = iter([xp.concatenate([arrays[j][0] for arrays in per_part], axis=per_part[0][j][1])
             for j in range(len(per_part[0]))])
  return first.map_rows(lambda x, axis: next(it))
