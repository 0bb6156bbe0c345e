"""The engine interface: what the batcher and servicer need from a teacher model.

An engine runs fixed-shape batches (one of its buckets) and returns, per
position, the top-k shifted logits, the logsumexp at each row's temperatures
and, when asked, attention states of some of its selectable layers. Each batch
carries a :class:`Fetch`: the union of what its requests asked for (k, value
dtype, layers, state names, state dtype). An engine copies to the host only
that (k rounded up to :func:`k_ladder`), so nothing a request did not ask for
leaves the accelerator. The JAX engine lives in ``engine.py``;
``tests/support/fake_engine.py`` has a NumPy stand-in for fast tests. Engines are called from
one worker thread, never from the event loop.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Iterator, Protocol

import numpy as np


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
  max_samples: int = 0  # draw slots per position of a sampling batch; 0 = sampling not offered

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


@dataclasses.dataclass(frozen=True)
class Fetch:
  """What one engine batch copies to the host: the union of its requests' output specs."""

  k: int  # ids per position (the engine copies fetched_k(k))
  value_dtype: np.dtype = np.dtype(np.float16)  # dtype of topk_logits
  layers: tuple[int, ...] = ()  # teacher layers whose states are copied
  states: tuple[str, ...] = ()  # state names copied for every layer above
  state_dtype: np.dtype | None = None  # dtype of the states; None when no states are wanted
  samples: int = 0  # sample slots per position (the engine copies fetched_k(samples, max_samples)); 0: none

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
    return Fetch(k=max(f.k for f in fetches), value_dtype=values.pop() if len(values) == 1 else np.dtype(np.float32),
                 layers=tuple(layer for layer in order if layer in layers),
                 states=tuple(sorted(states)), state_dtype=dtypes.pop(), samples=max(f.samples for f in fetches))


@dataclasses.dataclass
class EngineBatch:
  """One bucket-shaped batch; padding rows and columns have segment id 0."""

  tokens: np.ndarray  # (Bb, Tb) int32
  segment_ids: np.ndarray  # (Bb, Tb) int32
  positions: np.ndarray  # (Bb, Tb) int32
  temperatures: np.ndarray  # (Bb, max_temperatures) float32, padded with 1.0
  fetch: Fetch  # what to copy to the host
  samples: "SampleBatch | None" = None  # per-row sampling parameters (None: no row samples)

  @property
  def with_states(self) -> bool:
    return self.fetch.with_states


@dataclasses.dataclass
class SampleBatch:
  """Per-row sampling parameters of an engine batch (rows that do not sample have num_samples 0)."""

  num_samples: np.ndarray  # (Bb,) int32, <= info.max_samples
  temperatures: np.ndarray  # (Bb,) float32 tau, 1.0 where unused
  seeds: np.ndarray  # (Bb, 2) uint32 words of each row's request seed
  example_ids: np.ndarray  # (Bb, 2) uint32 words of each row's example id
  exclude: np.ndarray  # (Bb,) int32 leading top-k ids left out of the proposal

  @classmethod
  def empty(cls, rows: int) -> "SampleBatch":
    return cls(np.zeros(rows, np.int32), np.ones(rows, np.float32), np.zeros((rows, 2), np.uint32),
               np.zeros((rows, 2), np.uint32), np.zeros(rows, np.int32))


@dataclasses.dataclass
class EngineOutput:
  """Host arrays for a whole bucket: exactly what the batch's ``Fetch`` named."""

  topk_ids: np.ndarray  # (Bb, Tb, fetched_k) int32, sorted by descending logit
  topk_logits: np.ndarray  # (Bb, Tb, fetched_k) fetch.value_dtype, minus the row max (first entry 0)
  logsumexp: np.ndarray  # (Bb, Tb, max_temperatures) float32
  states: dict[str, dict[int, np.ndarray]]  # name -> layer -> (Bb, Tb, E) in fetch.state_dtype; {} without
  # With samples (see distill_core.sampling), each (Bb, Tb, fetched_k(fetch.samples, max_samples)):
  sample_ids: np.ndarray | None = None  # int32 distinct ids, ascending, then empty slots (id 0)
  sample_counts: np.ndarray | None = None  # int32, 0 = empty slot
  sample_logits: np.ndarray | None = None  # fetch.value_dtype shifted logits at sample_ids
  sample_logsumexp: np.ndarray | None = None  # (Bb, Tb) float32 proposal log-normaliser

  @property
  def nbytes(self) -> int:
    """Bytes of every array (what was copied from the device)."""
    arrays = [self.topk_ids, self.topk_logits, self.logsumexp]
    arrays += [value for layers in self.states.values() for value in layers.values()]
    arrays += [a for a in (self.sample_ids, self.sample_counts, self.sample_logits, self.sample_logsumexp)
               if a is not None]
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
  if (batch.samples is None) != (fetch.samples == 0):
    raise ValueError(f"fetch.samples {fetch.samples} disagrees with the batch's sampling parameters")
  if batch.samples is not None:
    if not 1 <= fetch.samples <= info.max_samples:
      raise ValueError(f"fetch.samples {fetch.samples} not in [1, max_samples {info.max_samples}]")
    if batch.samples.num_samples.shape != (shape[0],) or batch.samples.example_ids.shape != (shape[0], 2):
      raise ValueError(f"samples: per-row arrays do not match {shape[0]} rows")
    if int(batch.samples.num_samples.max(initial=0)) > fetch.samples:
      raise ValueError(f"samples: a row asks for more than fetch.samples {fetch.samples} draws")
  return shape
