"""Log setup shared by every entry point: timestamped text lines or one JSON object per line.

Importing some libraries (orbax, through absl) already calls
`logging.basicConfig()`, which makes a later plain `basicConfig` a no-op: no
level, no format, no INFO lines in a redirected run. `setup_logging` replaces
the root logger's handlers instead, so each command's `--log-level` and
timestamps hold wherever output goes (terminal, file, CI log).
"""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
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


def setup_logging(fmt: str = "text", level: str | int = "INFO") -> None:
  """Replaces the root logger's handlers with one stderr handler in ``fmt`` ("text" or "json").

  Text lines start with a timestamp (``2026-01-01 12:00:00,123 INFO name: message``).
  """
  if fmt not in ("text", "json"):
    raise ValueError(f"log format {fmt!r} is not 'text' or 'json'")
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
  root = logging.getLogger()
  for old in root.handlers[:]:
    root.removeHandler(old)
  root.addHandler(handler)
  root.setLevel(level.upper() if isinstance(level, str) else level)
