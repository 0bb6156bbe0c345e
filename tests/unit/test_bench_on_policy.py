"""The on-policy benchmark's accounting of loss-bearing tokens per logged interval."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_on_policy import interval_shares, loss_tokens_per_s


def test_interval_shares_average_the_steps_each_interval_trained():
  shares = np.arange(10, dtype=np.float64) / 10  # step s carries loss on s / 10 of its positions
  rows = [{"step": 4}, {"step": 6}, {"step": 10}]  # intervals after the one logged at step 2
  got = interval_shares(rows, 2, shares)
  want = [sum(shares[s] for s in steps) / len(steps) for steps in ((2, 3), (4, 5), (6, 7, 8, 9))]
  assert got == pytest.approx(want)


def test_loss_tokens_per_s_is_the_median_of_each_intervals_rate_times_its_share():
  rows = [{"perf/tokens_per_s": r} for r in (1000.0, 400.0, 900.0)]
  shares = [0.5, 1.0, 0.25]
  assert loss_tokens_per_s(rows, shares) == pytest.approx(sorted([500.0, 400.0, 225.0])[1])
  with pytest.raises(ValueError):
    loss_tokens_per_s(rows, shares[:2])  # one share per interval
