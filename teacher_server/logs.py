"""Log helpers of the server process (the log setup itself, text or JSON lines, is `distill_core.logs`)."""

from __future__ import annotations

import logging
import time

from distill_core.logs import JsonFormatter, setup_logging  # noqa: F401  (the setup lives there)



class RateLimitedLog:
  """At most one line per ``interval_s`` on ``logger``; the next line says how many were left out."""

  def __init__(self, logger: logging.Logger, interval_s: float):
    self._logger = logger
    self._interval = interval_s
    self._next = 0.0
    self._skipped = 0

  def warning(self, fmt: str, *args) -> None:
    now = time.monotonic()
    if now < self._next:
      self._skipped += 1
      return
    self._next = now + self._interval
    if self._skipped:
      fmt += f" ({self._skipped} more since the last such line)"
      self._skipped = 0
    self._logger.warning(fmt, *args)
