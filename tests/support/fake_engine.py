"""A NumPy engine with predictable outputs, for fast servicer and batcher tests.

Its answers are simple functions of the inputs, so a test can check that every
row reached the right request and stream without running a model:

* ``topk_ids[b, t, i] = (tokens[b, t] + i) % vocab_size``
* ``topk_logits[b, t, i] = -0.5 * i``
* ``logsumexp[b, t, j] = temperatures[b, j] + positions[b, t] / 1000``
* ``states[name][layer][b, t, :] = tokens[b, t] + 1000 * layer + (0.5 if name == "attn_out" else 0)``
* samples of a row with N draws: two distinct ids ``(example_id + seed + t + exclude + j) % vocab_size``
  for j = 0, 1 (sorted), drawn N - N // 2 and N // 2 times (one id when N = 1), logits ``-1 - j``,
  ``sample_logsumexp[b, t] = tau + 0.25``

Like the JAX engine it returns only what the batch's ``Fetch`` names (k rounded
up to the ladder, the value dtype, the layers and states asked for, the sample slots).
"""

from __future__ import annotations

import threading
import time
from typing import Iterator

import numpy as np

from teacher_server.engine_api import (Engine, EngineBatch, EngineInfo, EngineOutput, NamePattern,
                                       check_batch_shape, fetched_k)


def fake_info(*, vocab_size: int = 256, num_layers: int = 2, hidden_size: int = 8,
              buckets: tuple[tuple[int, int], ...] = ((4, 16), (4, 32)), max_k: int = 8,
              max_temperatures: int = 4, selectable_layers: tuple[int, ...] | None = None,
              state_names: tuple[str, ...] = ("attn_in", "attn_out"), max_samples: int = 8) -> EngineInfo:
  """An :class:`EngineInfo` for a small fake model."""
  return EngineInfo(
      model_type="fake", vocab_size=vocab_size, padded_vocab_size=vocab_size, num_layers=num_layers,
      hidden_size=hidden_size, num_attention_heads=2, num_key_value_heads=1, head_dim=hidden_size // 2,
      max_position_embeddings=max(t for _, t in buckets),
      buckets=tuple(sorted(buckets, key=lambda bt: (bt[1], bt[0]))), max_k=max_k,
      max_temperatures=max_temperatures,
      selectable_layers=tuple(range(num_layers)) if selectable_layers is None else selectable_layers,
      state_names=state_names, weights_fingerprint="fake-weights", tokenizer_fingerprint="",
      part_limits={"max_samples": max_samples})


class FakeEngine(Engine):
  """Deterministic outputs (see module docstring); optional delay and failure injection.

  Args:
    info: shapes and limits.
    delay_s: sleep this long in every forward (to exercise backpressure and draining).
    fail_token: a forward whose batch contains this token id raises RuntimeError.
  """

  def __init__(self, info: EngineInfo | None = None, *, delay_s: float = 0.0, fail_token: int | None = None):
    self._info = info or fake_info()
    self.delay_s = delay_s
    self.fail_token = fail_token
    self.batches: list[tuple[int, int, bool]] = []  # (B, T, with_states) of every forward
    self.fetches: list = []  # the Fetch of every forward
    self._lock = threading.Lock()
    rng = np.random.default_rng(0)
    self._params = {
        "embed_tokens.embedding": rng.standard_normal((self._info.vocab_size, self._info.hidden_size),
                                                      dtype=np.float32),
        "layers.0.self_attn.q_proj.kernel": rng.standard_normal((self._info.hidden_size, 2, 4),
                                                                dtype=np.float32),
    }

  @property
  def info(self) -> EngineInfo:
    return self._info

  def warmup(self) -> dict[str, float]:
    return {f"{b}x{t}": 0.0 for b, t in self._info.buckets}

  def forward(self, batch: EngineBatch) -> EngineOutput:
    bb, tb = check_batch_shape(self._info, batch)
    with self._lock:
      self.batches.append((bb, tb, batch.with_states))
      self.fetches.append(batch.fetch)
    if self.delay_s:
      time.sleep(self.delay_s)
    if self.fail_token is not None and np.any(batch.tokens == self.fail_token):
      raise RuntimeError(f"injected failure on token {self.fail_token}")
    info, fetch = self._info, batch.fetch
    k = np.arange(fetched_k(fetch.k, info.max_k), dtype=np.int32)
    ids = (batch.tokens[:, :, None] + k) % info.vocab_size  # (B, T, k)
    logits = np.broadcast_to(-0.5 * k.astype(fetch.value_dtype), ids.shape).copy()
    lse = batch.temperatures[:, None, :] + batch.positions[:, :, None].astype(np.float32) / 1000
    states = {}
    for name in fetch.states:
      states[name] = {}
      for layer in fetch.layers:
        value = batch.tokens[:, :, None] + 1000.0 * layer + (0.5 if name == "attn_out" else 0.0)  # (B, T, 1)
        shape = value.shape[:2] + (info.hidden_size,)
        states[name][layer] = np.broadcast_to(value, shape).astype(fetch.state_dtype)
    out = EngineOutput(topk_ids=ids.astype(np.int32), topk_logits=logits,
                       logsumexp=lse.astype(np.float32), states=states)
    if "samples" in batch.part_inputs:
      self._samples(batch, out)
    return out

  def _samples(self, batch: EngineBatch, out: EngineOutput) -> None:
    info, draws = self._info, batch.part_inputs["samples"]
    bb, tb = batch.tokens.shape
    eid = draws.example_ids[:, 0].astype(np.int64) + (draws.example_ids[:, 1].astype(np.int64) << 32)
    seed = draws.seeds[:, 0].astype(np.int64) + (draws.seeds[:, 1].astype(np.int64) << 32)
    base = (eid + seed + draws.exclude)[:, None] + np.arange(tb)[None, :]  # (B, T)
    pair = np.sort(np.stack([base % info.vocab_size, (base + 1) % info.vocab_size], -1), -1)  # (B, T, 2)
    n = np.broadcast_to(draws.num_samples[:, None], (bb, tb))
    counts = np.stack([n - n // 2, n // 2], -1)  # (B, T, 2)
    shape = (bb, tb, fetched_k(batch.fetch.samples, info.part_limits["max_samples"]))
    ids = np.zeros(shape, np.int32)
    counts_out = np.zeros(shape, np.int32)
    logits = np.zeros(shape, batch.fetch.value_dtype)
    ids[..., :2] = np.where(counts > 0, pair, 0)
    counts_out[..., :2] = counts
    logits[..., :2] = np.where(counts > 0, -1.0 - np.arange(2), 0.0)
    lse = np.broadcast_to(draws.temperatures[:, None] + 0.25, (bb, tb)).astype(np.float32)
    out.parts["samples"] = dict(sample_ids=ids, sample_counts=counts_out, sample_logits=logits, sample_logsumexp=lse)

  def parameters(self, pattern: NamePattern) -> Iterator[tuple[str, np.ndarray]]:
    for name, value in sorted(self._params.items()):
      if pattern.search(name):
        yield name, value
