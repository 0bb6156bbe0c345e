"""The engine interface: what the batcher and servicer need from a teacher model.

An engine runs fixed-shape batches (one of its buckets) and returns, per
position, the top-k shifted logits, the logsumexp at each row's temperatures
and, when asked, attention states of some of its selectable layers. Each batch
carries a :class:`Fetch`: the union of what its requests asked for (k, value
dtype, layers, state names, state dtype, and the slots of each other
teacher-target part asked for). An engine copies to the host only that (k and
slots rounded up to :func:`k_ladder`), so nothing a request did not ask for
leaves the accelerator. The other parts (``distill_core.parts``) are handled by
name: a batch carries each asked part's per-row inputs (``Part.engine_inputs``),
an output each part's fields, and ``EngineInfo.part_limits`` the limits the
parts declare (``Part.limits``). The JAX engine lives in ``engine.py``;
``tests/support/fake_engine.py`` has a NumPy stand-in for fast tests. Engines are called from
one worker thread, never from the event loop.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Iterator, Mapping, Protocol

import numpy as np

from distill_core.parts import BY_NAME, FIELD_OWNER, by_part_name


@dataclasses.dataclass(frozen=True)
class EngineInfo:
  """Static facts about a loaded engine (served by GetInfo)."""

  model_type: str
  vocab_size: int  # real vocabulary; ids >= this are never returned
  padded_vocab_size: int
  num_layers: int
  hidden_size: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  max_position_embeddings: int
  buckets: tuple[tuple[int, int], ...]  # (batch, length), sorted by length then batch
  max_k: int
  max_temperatures: int
  selectable_layers: tuple[int, ...]
  state_names: tuple[str, ...]
  weights_fingerprint: str
  tokenizer_fingerprint: str
  # Limits of the other parts (`Part.limits`, e.g. the draw slots of sampled targets); 0 or absent: not offered
  part_limits: Mapping[str, int] = dataclasses.field(default_factory=dict)

  @property
  def max_seq_len(self) -> int:
    return max(t for _, t in self.buckets)


def k_ladder(max_k: int) -> tuple[int, ...]:
  """The k an engine copies to the host: powers of two below ``max_k``, then ``max_k``.

  A batch asking for k copies the smallest entry >= k (at most 2x, exact for
  powers of two and max_k); the device output is split at these boundaries.
  """
  ladder, k = [], 1
  while k < max_k:
    ladder.append(k)
    k *= 2
  return (*ladder, max_k)


def fetched_k(k: int, max_k: int) -> int:
  """The ladder entry a batch asking for ``k`` ids copies (ValueError over ``max_k``)."""
  for entry in k_ladder(max_k):
    if entry >= k:
      return entry
  raise ValueError(f"k = {k} exceeds max_k {max_k}")


@by_part_name
@dataclasses.dataclass(frozen=True)
class Fetch:
  """What one engine batch copies to the host: the union of its requests' output specs.

  `parts`: (part name, slots) of every other part asked for (its `Part.fetch_slots`; the engine copies
  `fetched_k(slots, Part.max_slots(limits))`), also given and read by the part's name (`Fetch(k=4, <part>=slots)`).
  """

  k: int  # ids per position (the engine copies fetched_k(k))
  value_dtype: np.dtype = np.dtype(np.float16)  # dtype of topk_logits
  layers: tuple[int, ...] = ()  # teacher layers whose states are copied
  states: tuple[str, ...] = ()  # state names copied for every layer above
  state_dtype: np.dtype | None = None  # dtype of the states; None when no states are wanted
  parts: tuple[tuple[str, int], ...] = dataclasses.field(default=(), kw_only=True)

  def __post_init__(self):
    object.__setattr__(self, "value_dtype", np.dtype(self.value_dtype))
    if bool(self.layers) != bool(self.states) or bool(self.layers) != (self.state_dtype is not None):
      raise ValueError(f"fetch: layers {list(self.layers)}, states {list(self.states)} and state_dtype "
                       f"{self.state_dtype} must be all given or all empty")
    if self.state_dtype is not None:
      object.__setattr__(self, "state_dtype", np.dtype(self.state_dtype))

  @property
  def with_states(self) -> bool:
    return bool(self.layers)

  @staticmethod
  def union(fetches: "list[Fetch]", order: tuple[int, ...]) -> "Fetch":
    """One fetch covering all of ``fetches`` (same state dtype); layers sorted as in ``order``.

    Mixed value dtypes copy float32 (cast on the host afterwards: the same rounding as on the device).
    """
    dtypes = {f.state_dtype for f in fetches}
    if len(dtypes) != 1:
      raise ValueError(f"fetch: one batch mixes state dtypes {sorted(map(str, dtypes))}")
    values = {f.value_dtype for f in fetches}
    layers = {layer for f in fetches for layer in f.layers}
    states = {name for f in fetches for name in f.states}
    slots: dict[str, int] = {}
    for f in fetches:
      for name, n in f.parts:
        slots[name] = max(slots.get(name, 0), n)
    return Fetch(k=max(f.k for f in fetches), value_dtype=values.pop() if len(values) == 1 else np.dtype(np.float32),
                 layers=tuple(layer for layer in order if layer in layers),
                 states=tuple(sorted(states)), state_dtype=dtypes.pop(), parts=slots)


@dataclasses.dataclass
class EngineBatch:
  """One bucket-shaped batch; padding rows and columns have segment id 0."""

  tokens: np.ndarray  # (Bb, Tb) int32
  segment_ids: np.ndarray  # (Bb, Tb) int32
  positions: np.ndarray  # (Bb, Tb) int32
  temperatures: np.ndarray  # (Bb, max_temperatures) float32, padded with 1.0
  fetch: Fetch  # what to copy to the host
  # part name -> its inputs (`Part.engine_inputs`: a pytree of (Bb, ...) arrays), for every part in fetch.parts
  part_inputs: dict[str, Any] | None = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.part_inputs = dict(self.part_inputs or {})

  @property
  def with_states(self) -> bool:
    return self.fetch.with_states


@dataclasses.dataclass
class EngineOutput:
  """Host arrays for a whole bucket: exactly what the batch's ``Fetch`` named.

  The other parts' fields are in `parts` (part name -> field -> (Bb, Tb, ...) array; slotted fields have
  `fetched_k(slots, max_slots)` slots), also read by field name (`out.<field>`; None when not fetched).
  """

  topk_ids: np.ndarray  # (Bb, Tb, fetched_k) int32, sorted by descending logit
  topk_logits: np.ndarray  # (Bb, Tb, fetched_k) fetch.value_dtype, minus the row max (first entry 0)
  logsumexp: np.ndarray  # (Bb, Tb, max_temperatures) float32
  states: dict[str, dict[int, np.ndarray]]  # name -> layer -> (Bb, Tb, E) in fetch.state_dtype; {} without
  parts: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

  def __getattr__(self, name: str):
    owner = FIELD_OWNER.get(name)
    if owner is None or name.startswith("__"):
      raise AttributeError(f"'EngineOutput' object has no attribute {name!r}")
    return object.__getattribute__(self, "parts").get(owner.name, {}).get(name)

  @property
  def nbytes(self) -> int:
    """Bytes of every array (what was copied from the device)."""
    arrays = [self.topk_ids, self.topk_logits, self.logsumexp]
    arrays += [value for layers in self.states.values() for value in layers.values()]
    arrays += [a for fields in self.parts.values() for a in fields.values()]
    return int(sum(a.nbytes for a in arrays))


class NamePattern(Protocol):
  """A compiled name pattern (``re2`` or ``re``); ``search(name)`` is truthy when it matches."""

  def search(self, name: str) -> object: ...


class Engine(abc.ABC):
  """A teacher model behind fixed bucket shapes."""

  @property
  @abc.abstractmethod
  def info(self) -> EngineInfo:
    """Model facts, buckets and limits."""

  @abc.abstractmethod
  def warmup(self) -> dict[str, float]:
    """Compiles every bucket variant; returns seconds per variant name. Called once at start."""

  @abc.abstractmethod
  def forward(self, batch: EngineBatch) -> EngineOutput:
    """Runs one batch whose shape is one of ``info.buckets`` (blocking); returns what ``batch.fetch`` names."""

  @abc.abstractmethod
  def parameters(self, pattern: NamePattern) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, array)`` for every parameter whose name matches ``pattern.search``, in order of
    name (resumed downloads rely on it); the array may live on a device (it has shape and dtype)."""

  def compilations(self) -> int:
    """Number of compilations so far (constant after warm-up)."""
    return 0


def check_batch_shape(info: EngineInfo, batch: EngineBatch) -> tuple[int, int]:
  """Returns the batch's (B, T) after checking it is a bucket and the arrays agree."""
  shape = tuple(batch.tokens.shape)
  if shape not in info.buckets:
    raise ValueError(f"batch shape {shape} is not one of the buckets {list(info.buckets)}")
  for name in ("segment_ids", "positions"):
    if getattr(batch, name).shape != shape:
      raise ValueError(f"{name} shape {getattr(batch, name).shape} != tokens shape {shape}")
  if batch.temperatures.shape != (shape[0], info.max_temperatures):
    raise ValueError(f"temperatures shape {batch.temperatures.shape} != {(shape[0], info.max_temperatures)}")
  fetch = batch.fetch
  if not 1 <= fetch.k <= info.max_k:
    raise ValueError(f"fetch.k {fetch.k} not in [1, {info.max_k}]")
  unknown = [layer for layer in fetch.layers if layer not in info.selectable_layers]
  if unknown or any(name not in info.state_names for name in fetch.states):
    raise ValueError(f"fetch: layers {list(fetch.layers)} / states {list(fetch.states)} not offered "
                     f"(layers {list(info.selectable_layers)}, states {list(info.state_names)})")
  if set(batch.part_inputs) != {name for name, _ in fetch.parts}:
    raise ValueError(f"fetch parts {[name for name, _ in fetch.parts]} disagree with the batch's part inputs "
                     f"{sorted(batch.part_inputs)}")
  for name, slots in fetch.parts:
    part = BY_NAME.get(name)
    if part is None or not part.offered(info.part_limits):
      raise ValueError(f"fetch: part {name!r} not offered by this engine")
    part.check_engine_inputs(batch.part_inputs[name], shape[0], shape[1], slots, info.part_limits)
  return shape
