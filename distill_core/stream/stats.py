"""Metrics of the remote teacher source: counters, request latencies, prefetch-window occupancy.

Written by the event-loop thread (answers, retries, failovers) and the train
loop (occupancy, fallbacks); read by `RemoteTeacher.metrics()` at every log
point, which the trainer merges as `teacher/<name>`:

| name | meaning |
|---|---|
| `requests_total` | requests answered |
| `retries_total` | requests re-sent after a failure (stream lost, engine error, hung replica) |
| `failovers_total` | streams lost (replica died, stream broke or hung); their requests went elsewhere |
| `reconnects_total` | streams re-established after a loss |
| `fallbacks_total` | batches a fallback policy answered (e.g. CE only) |
| `peer_fallbacks_total` | batches this process had answers for but trained on CE only because another process fell back |
| `weight_changes_total` | replicas seen with other teacher weights than the run's (`on_weights_change`) |
| `discarded_answers_total` | answers from retired weights, asked again from the current ones (`drain`) |
| `rotations_total` | streams reconnected after `stream_max_age_s` to spread over the replicas |
| `malformed_total` | answers refused by the client's checks (shapes, ids outside the vocabulary, temperatures, first value 0); retried like engine failures |
| `stall_warnings_total` | warnings of the `wait` policy (teacher silent for `timeout_s`) |
| `received_mb_total`, `received_mb_per_s` | answer bytes (the rate over the log interval) |
| `window_occupancy` | mean share of the submitted batches whose answers were already in when `next()` asked |
| `latency_ms_mean/p50/p95` | request round trips over the log interval |
"""

from __future__ import annotations

import threading
import time

import numpy as np


class StreamStats:
  """Counters and latencies, written on the loop thread and read by `metrics()` (locked)."""

  _TOTALS = ("requests", "retries", "failovers", "reconnects", "fallbacks", "peer_fallbacks", "weight_changes",
             "discarded_answers", "rotations", "stall_warnings", "malformed", "bytes")

  def __init__(self):
    self._lock = threading.Lock()
    self.totals = dict.fromkeys(self._TOTALS, 0)
    self._latencies: list[float] = []
    self._occupancy: list[float] = []
    self._bytes_mark = (0, time.monotonic())

  def count(self, name: str, n: int = 1) -> None:
    with self._lock:
      self.totals[name] += n

  def answered(self, latency_s: float, nbytes: int) -> None:
    with self._lock:
      self.totals["requests"] += 1
      self.totals["bytes"] += nbytes
      self._latencies.append(latency_s)

  def occupancy(self, fraction: float) -> None:
    with self._lock:
      self._occupancy.append(fraction)

  def flush(self) -> dict[str, float]:
    """Interval means/percentiles since the last flush, plus running totals."""
    with self._lock:
      lat = np.asarray(self._latencies) * 1000.0
      occ = self._occupancy
      totals = dict(self.totals)
      self._latencies, self._occupancy = [], []
      now = time.monotonic()
      mark_bytes, mark_time = self._bytes_mark
      self._bytes_mark = (totals["bytes"], now)
    out = {f"{name}_total": float(value) for name, value in totals.items() if name != "bytes"}
    out["received_mb_total"] = totals["bytes"] / 2**20
    out["received_mb_per_s"] = (totals["bytes"] - mark_bytes) / 2**20 / max(now - mark_time, 1e-9)
    if occ:
      out["window_occupancy"] = float(np.mean(occ))
    if lat.size:
      out.update(latency_ms_mean=float(lat.mean()), latency_ms_p50=float(np.percentile(lat, 50)),
                 latency_ms_p95=float(np.percentile(lat, 95)))
    return out
