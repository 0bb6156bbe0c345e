"""The engine interface: what the batcher and servicer need from a teacher model.

An engine runs fixed-shape batches (one of its buckets) and returns, per
position, the top ``max_k`` shifted logits, the logsumexp at each row's
temperatures and, when asked, the attention states of its selectable layers.
The JAX engine lives in ``engine.py``; ``fake_engine.py`` has a NumPy stand-in
for fast tests. Engines are called from one worker thread, never from the event
loop.
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

  @property
  def max_seq_len(self) -> int:
    return max(t for _, t in self.buckets)


@dataclasses.dataclass
class EngineBatch:
  """One bucket-shaped batch; padding rows and columns have segment id 0."""

  tokens: np.ndarray  # (Bb, Tb) int32
  segment_ids: np.ndarray  # (Bb, Tb) int32
  positions: np.ndarray  # (Bb, Tb) int32
  temperatures: np.ndarray  # (Bb, max_temperatures) float32, padded with 1.0
  with_states: bool  # return the states of every selectable layer


@dataclasses.dataclass
class EngineOutput:
  """Host arrays for a whole bucket."""

  topk_ids: np.ndarray  # (Bb, Tb, max_k) int32, sorted by descending logit
  topk_logits: np.ndarray  # (Bb, Tb, max_k) float32, minus the row max (first entry 0)
  logsumexp: np.ndarray  # (Bb, Tb, max_temperatures) float32
  states: dict[str, np.ndarray]  # name -> (len(selectable_layers), Bb, Tb, E); {} without states


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
    """Runs one batch whose shape is one of ``info.buckets`` (blocking)."""

  @abc.abstractmethod
  def parameters(self, pattern: NamePattern) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(name, host array)`` for every parameter whose name matches ``pattern.search``."""

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
  return shape
