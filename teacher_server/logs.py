"""Log setup for the server process: plain text or one JSON object per line."""

from __future__ import annotations

import json
import logging
import sys
import time

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
  """``{"ts": ..., "level": ..., "logger": ..., "msg": ..., <extra fields>}`` per line."""

  def format(self, record: logging.LogRecord) -> str:
    out = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname,
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
      if key not in _STANDARD:
        out[key] = value if isinstance(value, (str, int, float, bool, type(None), list, dict)) else repr(value)
    if record.exc_info:
      out["exc"] = self.formatException(record.exc_info)
    return json.dumps(out)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
  """Replaces the root logger's handlers with one stderr handler in ``fmt`` ("text" or "json")."""
  handler = logging.StreamHandler(sys.stderr)
  if fmt == "json":
    handler.setFormatter(JsonFormatter())
  else:
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  root = logging.getLogger()
  root.handlers[:] = [handler]
  root.setLevel(level)


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
