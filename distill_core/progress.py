"""Progress of the long commands (prepare, dump, train): a rich bar on a terminal, timestamped log lines otherwise.

On a terminal each task is a bar (description, bar, done/total, the task's `info` text, time elapsed and left).
Anywhere else (a file, a CI log, a pod's log) a bar would print nothing useful, so each task logs a line through
`logging` (whose lines carry a timestamp, see `distill_core.logs`), ``<description> <done>/<total> <info>, ETA
<s> s``: at most one every `log_every_s` seconds, one when the task completes, and one whenever an update asks for
it (``log=True``).
"""

from __future__ import annotations

import dataclasses
import logging
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)


@dataclasses.dataclass
class _Task:
  description: str
  total: int | None
  completed: int
  info: str
  started: float
  first: int  # completed when the task was added (a resumed run's earlier work: not part of its rate)
  last_log: float


class ProgressBar:
  """Tasks shown as bars on a terminal, or logged as lines (see the module docstring). Not shown at all unless
  `enabled`; with `bar=False`, log lines on a terminal too. The API follows rich's: `add_task`, `update`,
  `advance`; close it (or use it as a context manager).
  """

  def __init__(self, *, enabled: bool = True, bar: bool = True, log_every_s: float = 10.0,
               description_width: int = 0, console: Console | None = None, logger: logging.Logger = log):
    self._console = console or Console(stderr=True)
    self._log = logger
    self._enabled = enabled
    self._log_every_s = log_every_s
    self._tasks: dict[int, _Task] = {}
    self._bar: Progress | None = None
    if enabled and bar and self._console.is_terminal:
      width = f":<{description_width}" if description_width else ""
      self._bar = Progress(TextColumn(f"[bold]{{task.description{width}}}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                           TimeRemainingColumn(), console=self._console)
      self._bar.start()

  @property
  def live(self) -> bool:
    """Whether the tasks show as bars (a terminal), rather than as log lines."""
    return self._bar is not None

  def add_task(self, description: str, total: int | None = None, completed: int = 0, info: str = "") -> int:
    now = time.monotonic()
    task_id = len(self._tasks)
    self._tasks[task_id] = _Task(description, total, completed, info, now, completed, now)
    if self._bar is not None:
      bar_id = self._bar.add_task(description, total=total, completed=completed, info=info)
      assert bar_id == task_id
    return task_id

  def update(self, task_id: int, *, completed: int | None = None, advance: int = 0, total: int | None = None,
             info: str | None = None, log: bool = False) -> None:
    """Sets (`completed`, `total`, `info`) or advances a task; `log`: a log line now (off a terminal)."""
    task = self._tasks[task_id]
    task.completed = (task.completed if completed is None else completed) + advance
    task.total = task.total if total is None else total
    task.info = task.info if info is None else info
    if self._bar is not None:
      self._bar.update(task_id, completed=task.completed, total=task.total, info=task.info)
    elif self._enabled:
      now = time.monotonic()
      if log or now - task.last_log >= self._log_every_s or (task.total is not None
                                                               and task.completed >= task.total):
        task.last_log = now
        self._log_line(task, now)

  def advance(self, task_id: int, amount: int = 1) -> None:
    self.update(task_id, advance=amount)

  def _log_line(self, task: _Task, now: float) -> None:
    """``<description> <done>/<total> <info>, ETA <s> s`` (the ETA from this run's rate, once it has one)."""
    total = "" if task.total is None else f"/{task.total}"
    eta = ""
    if task.total is not None and task.completed < task.total and task.completed > task.first:
      eta = f", ETA {(task.total - task.completed) * (now - task.started) / (task.completed - task.first):.0f} s"
    self._log.info("%s %d%s%s%s", task.description, task.completed, total, f" {task.info}" if task.info else "", eta)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.stop()
      self._bar = None

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
