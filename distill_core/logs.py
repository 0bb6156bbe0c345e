"""Log setup shared by every entry point: timestamped text lines or one JSON object per line.

Importing some libraries (orbax, through absl) already calls
`logging.basicConfig()`, which makes a later plain `basicConfig` a no-op: no
level, no format, no INFO lines in a redirected run. `setup_logging` replaces
the root logger's handlers instead, so each command's `--log-level` and
timestamps hold wherever output goes (terminal, file, CI log).

The user reads the project's own progress and summary lines. Libraries log
much more at INFO (orbax/absl: a line per metadata store opened and closed;
jax: `Unable to initialize backend 'tpu'` on every machine without libtpu,
which jax itself treats as an expected, quiet probe). So the handler holds
third-party lines one step below the project's: at `--log-level INFO` they
need WARNING to show; at `--log-level DEBUG` everything shows. Nothing about
which accelerator jax uses changes (JAX_PLATFORMS is left alone).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from jax._src import hardware_utils, xla_bridge

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


PROJECT_LOGGERS = ("distill_core", "student_trainer", "teacher_server", "benchmarks", "__main__")


def is_project_logger(name: str) -> bool:
  return name.split(".", 1)[0] in PROJECT_LOGGERS


class ProjectFirst(logging.Filter):
  """Passes the project's records at the configured level and third-party records from WARNING up
  (or at that level when it is higher); at DEBUG, everything."""

  def __init__(self, level: int):
    super().__init__()
    self.level = level
    self.third_party = max(level, logging.WARNING) if level > logging.DEBUG else level

  def filter(self, record: logging.LogRecord) -> bool:
    return is_project_logger(record.name) or record.levelno >= self.third_party


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def add_log_level_argument(parser, help_prefix: str = "Logging level") -> None:
  """`--log-level` with the same choices and meaning in every command."""
  parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LEVELS, metavar="LEVEL",
                      help=f"{help_prefix}: {', '.join(LEVELS)} (default INFO). Other libraries' lines "
                           "(jax, orbax, absl, grpc) show from WARNING, or all of them at DEBUG.")


def setup_logging(fmt: str = "text", level: str | int = "INFO") -> None:
  """Replaces the root logger's handlers with one stderr handler in ``fmt`` ("text" or "json").

  Text lines start with a timestamp (``2026-01-01 12:00:00,123 INFO name: message``). Third-party
  loggers (absl, orbax, jax, grpc, ...) show from WARNING unless ``level`` is DEBUG (ProjectFirst).
  """
  if fmt not in ("text", "json"):
    raise ValueError(f"log format {fmt!r} is not 'text' or 'json'")
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
  number = logging.getLevelName(level.upper()) if isinstance(level, str) else level
  if not isinstance(number, int):
    raise ValueError(f"--log-level {level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
  handler.addFilter(ProjectFirst(number))
  root = logging.getLogger()
  for old in root.handlers[:]:
    root.removeHandler(old)
  root.addHandler(handler)
  root.setLevel(number)
  skip_absent_tpu()


def skip_absent_tpu() -> None:
  """Keeps JAX from starting its TPU backend on a machine with no TPU chip.

  The `tpu` extra installs libtpu everywhere so that programs can be compiled ahead for TPU
  topologies (`benchmarks.bench_scale`); JAX would then try to open a TPU in every process, and
  libtpu prints a page of warnings to stderr before JAX falls back. With no chip attached (JAX's
  own hardware check), no `JAX_PLATFORMS` chosen and no `JAX_FORCE_TPU_INIT`, the backend is left
  out (it declines at once); compiling for a topology (`jax.experimental.topologies`) does not use it
  and still works.
  """
  if "JAX_PLATFORMS" in os.environ or "JAX_FORCE_TPU_INIT" in os.environ:
    return
  if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
    # The same registration JAX makes (so `tpu` stays a known platform for lowering rules), with a
    # factory that declines at once instead of starting libtpu; JAX then moves on to the next backend.
    xla_bridge.register_backend_factory("tpu", _no_tpu_chip, priority=300, fail_quietly=True)


def _no_tpu_chip():
  raise RuntimeError("no TPU chip on this machine (distill_core.logs.skip_absent_tpu)")
