"""How the processes of a multi-host student combine their metrics (the processes themselves are run in
tests/integration/test_multihost.py)."""

from __future__ import annotations


def test_metric_reduction_rules():
  from student_trainer.distributed import reduce_metrics
  out = reduce_metrics([
      {"perf/tokens_per_s": 100.0, "teacher/latency_ms_p95": 5.0, "train/ce_loss": 2.0, "teacher/retries_total": 1.0},
      {"perf/tokens_per_s": 120.0, "teacher/latency_ms_p95": 9.0, "train/ce_loss": 2.0, "teacher/retries_total": 2.0,
       "teacher/window_occupancy": 0.5}])
  assert out == {"perf/tokens_per_s": 220.0, "teacher/latency_ms_p95": 9.0, "train/ce_loss": 2.0,
                 "teacher/retries_total": 3.0, "teacher/window_occupancy": 0.5}
