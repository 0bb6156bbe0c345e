"""The progress display of prepare, dump and train: a bar on a terminal, timestamped log lines elsewhere."""

import io
import logging

from rich.console import Console

from distill_core.progress import ProgressBar


def test_off_a_terminal_tasks_are_log_lines(caplog, monkeypatch):
  clock = [100.0]
  monkeypatch.setattr("distill_core.progress.time.monotonic", lambda: clock[0])
  console = Console(file=io.StringIO(), force_terminal=False)
  with caplog.at_level(logging.INFO, logger="distill_core.progress"):
    with ProgressBar(console=console, log_every_s=10) as bar:
      assert not bar.live
      task = bar.add_task("dump w0", total=100, completed=20)
      clock[0] += 4
      bar.update(task, advance=20, info="examples")  # 4 s after the start: not yet
      clock[0] += 6
      bar.update(task, advance=20, info="examples, 9 tokens/s")  # 10 s: a line; 40 done in 10 s, 40 to go
      bar.advance(task, 5)
      bar.update(task, advance=1, log=True)
      bar.update(task, completed=100)  # complete: a line
      other = bar.add_task("listing files")
      bar.update(other, total=3, completed=3)
  assert [r.getMessage() for r in caplog.records] == [
      "dump w0 60/100 examples, 9 tokens/s, ETA 10 s", "dump w0 66/100 examples, 9 tokens/s, ETA 7 s",
      "dump w0 100/100 examples, 9 tokens/s", "listing files 3/3"]
  assert console.file.getvalue() == ""


def test_disabled_shows_nothing_and_a_terminal_gets_a_bar(caplog):
  with caplog.at_level(logging.INFO):
    with ProgressBar(enabled=False, console=Console(file=io.StringIO(), force_terminal=False)) as bar:
      bar.update(bar.add_task("train", total=3), completed=3, log=True)
  assert not caplog.records
  out = io.StringIO()
  with ProgressBar(console=Console(file=out, force_terminal=True, width=100)) as bar:
    assert bar.live
    bar.update(bar.add_task("step", total=4, completed=1), completed=2, info="kd_loss=1.5")
  assert "step" in out.getvalue() and "2/4" in out.getvalue() and "kd_loss=1.5" in out.getvalue()
  assert not caplog.records
  with caplog.at_level(logging.INFO), ProgressBar(bar=False, console=Console(file=out, force_terminal=True)) as bar:
    assert not bar.live  # no bar asked for: log lines, on a terminal too
    bar.update(bar.add_task("step", total=4), completed=2, info="kd_loss=1.5", log=True)
  assert [r.getMessage().split(", ETA")[0] for r in caplog.records] == ["step 2/4 kd_loss=1.5"]


def test_the_trainer_logs_every_logged_step_without_a_bar(caplog):
  from student_trainer.metrics import ProgressDisplay
  with caplog.at_level(logging.INFO, logger="student_trainer.metrics"):
    display = ProgressDisplay(6, 0, enabled=False)
    display.update(1)
    display.update(3, {"train/total_loss": 1.25, "perf/tokens_per_s": 1000.4})
    display.close()
  assert [(r.name, r.getMessage().split(", ETA")[0]) for r in caplog.records] == [
      ("student_trainer.metrics", "step 3/6 total_loss=1.25 tokens_per_s=1000")]
