"""The run harness (distill_core/harness.py): child processes stopped gracefully or killed, their logs in files,
waiting for health, metrics read back, and finished runs keyed by their settings and code."""

import json
import sys

import pytest

from distill_core import harness
from distill_core.netutil import free_port

# A child that logs, then ignores SIGTERM (a hung drain) until killed.
_STUBBORN = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: print('term', flush=True))\n"
             "print('started', flush=True)\nwhile True: time.sleep(0.05)\n")
_GRACEFUL = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\n"
             "print('started', flush=True)\nwhile True: time.sleep(0.05)\n")


def _wait_for_line(proc: harness.ChildProcess, text: str) -> None:
  import time
  deadline = time.monotonic() + 60
  while text not in proc.logs():
    proc.check_alive()
    assert time.monotonic() < deadline, proc.logs()
    time.sleep(0.02)


def test_stop_is_sigterm_then_sigkill_and_the_log_is_kept(tmp_path):
  graceful = harness.ChildProcess([sys.executable, "-c", _GRACEFUL], tmp_path / "graceful.log")
  stubborn = harness.ChildProcess([sys.executable, "-c", _STUBBORN], tmp_path / "stubborn.log")
  for proc in (graceful, stubborn):
    _wait_for_line(proc, "started")
  assert graceful.stop(timeout=30) == 7  # its own SIGTERM handler ran
  assert stubborn.stop(timeout=0.5) == -9  # still running after the grace: killed
  assert "term" in stubborn.logs() and stubborn.logs().startswith("started")


def test_wait_serving_names_a_server_that_exits_and_shows_its_log(tmp_path):
  address = f"127.0.0.1:{free_port()}"
  server = harness.ServerProcess([sys.executable, "-c", "print('no model here'); raise SystemExit(3)"], address,
                                 tmp_path / "server.log")
  with pytest.raises(RuntimeError, match=r"exited with code 3 before serving(.|\n)*no model here"):
    server.wait_serving(timeout=60)


def test_run_raises_with_the_tail_of_the_log(tmp_path):
  log = tmp_path / "cmd.log"
  with pytest.raises(harness.CommandFailed) as e:
    harness.run([sys.executable, "-c", "print('line one'); print('the reason'); raise SystemExit(2)"], log_path=log,
                show=False)
  assert e.value.returncode == 2 and "the reason" in str(e.value) and str(log) in str(e.value)
  harness.run([sys.executable, "-c", "print('fine')"], log_path=log, show=False)
  assert log.read_text() == "fine\n"


def test_read_metrics_skips_a_line_being_written_and_filters_by_key(tmp_path):
  rows = [{"step": 1, "train/ce_loss": 2.0}, {"step": 1, "eval/ce_loss": 2.5}, {"step": 2, "train/ce_loss": 1.5}]
  text = "".join(json.dumps(r) + "\n" for r in rows)
  (tmp_path / "metrics.jsonl").write_text(text + '{"step": 3, "train/c')
  assert harness.read_metrics(tmp_path) == rows
  assert harness.read_metrics(tmp_path, "train/ce_loss") == [rows[0], rows[2]]
  assert harness.last_metrics(tmp_path) == {"step": 2, "train/ce_loss": 1.5, "eval/ce_loss": 2.5}
  assert harness.read_metrics(tmp_path / "none") == []
  (tmp_path / "metrics.jsonl").write_text('{"step": 1\n' + text)  # damage in the middle is an error
  with pytest.raises(ValueError, match="line 1 is not JSON"):
    harness.read_metrics(tmp_path)


def test_a_finished_run_is_reused_only_with_the_same_settings_and_code(tmp_path):
  overrides = [f"run_dir={tmp_path}", "steps=3", "teacher.remote.address=127.0.0.1:1"]
  settings = harness.run_settings(overrides)
  assert settings == {"overrides": [f"run_dir={tmp_path}", "steps=3"], "code": harness.code_digest()}
  assert harness.run_settings(overrides[:2] + ["teacher.remote.address=127.0.0.1:2"]) == settings
  assert not harness.finished(tmp_path, settings)  # no export, no stamp
  (tmp_path / "hf").mkdir()
  (tmp_path / harness.STAMP).write_text(json.dumps(settings))
  assert harness.finished(tmp_path, settings)
  assert not harness.finished(tmp_path, harness.run_settings(overrides, key={"code": "other"}))
  assert not harness.finished(tmp_path, harness.run_settings(["steps=4"]))


def test_code_digest_follows_code_and_configs(tmp_path):
  for d in ("distill_core", "student_trainer", "teacher_server", "configs/models"):
    (tmp_path / d).mkdir(parents=True)
  (tmp_path / "student_trainer" / "a.py").write_text("x = 1\n")
  (tmp_path / "configs" / "models" / "demo_student.yaml").write_text("hidden_size: 8\n")
  before = harness.code_digest(tmp_path)
  (tmp_path / "student_trainer" / "a.py").write_text("x = 2\n")
  assert harness.code_digest(tmp_path) != before
  (tmp_path / "student_trainer" / "a.py").write_text("x = 1\n")
  assert harness.code_digest(tmp_path) == before
  (tmp_path / "configs" / "models" / "other.yaml").write_text("hidden_size: 16\n")  # not a config the runs read
  assert harness.code_digest(tmp_path) == before


def test_ensure_corpus_keeps_a_prepared_dataset(tmp_path, capsys):
  (tmp_path / "manifest.json").write_text("{}")
  assert harness.ensure_corpus(tmp_path, "max_files=1") is False
  assert "reusing" in capsys.readouterr().out
