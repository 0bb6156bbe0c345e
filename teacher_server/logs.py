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
