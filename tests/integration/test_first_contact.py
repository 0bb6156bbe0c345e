"""A newcomer's first minutes, in real processes and against a server: the trainer runs with no arguments,
prepare's redirected log, a warning about half-empty buckets (the in-process checks are in
tests/unit/test_first_contact.py)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import pytest
from server_utils import REPO

STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO "


# -- defaults that run ------------------------------------------------------------------------------


@pytest.mark.slow
def test_trainer_runs_with_no_arguments(tmp_path):
  """`python -m student_trainer` in an empty directory: prepares the default data, trains, exports."""
  env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
  out = subprocess.run([sys.executable, "-m", "student_trainer"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=1800)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "finished at step 200" in out.stdout and (tmp_path / "runs" / "student" / "hf" / "config.json").is_file()


# -- logs in files ----------------------------------------------------------------------------------

def test_prepare_redirected_shows_timestamped_progress(tmp_path):
  log_path = tmp_path / "prepare.log"
  with open(log_path, "w") as out:
    code = subprocess.run([sys.executable, "-m", "distill_core.prepare", "max_files=40", "eval_fraction=0.25", "vocab_size=300",
                           "seq_len=32", f"output_dir={tmp_path / 'data'}"], cwd=REPO, stdout=out,
                          stderr=subprocess.STDOUT, timeout=600).returncode
  text = log_path.read_text()
  assert code == 0, text[-2000:]
  for line in ("distill_core.prepare: 40 source files under", "distill_core.prepare: training a byte-level BPE",
               "distill_core.prepare: tokenizing and packing the eval split"):
    assert re.search(STAMP + re.escape(line), text, re.M), (line, text[-2000:])


# -- silent slow paths ------------------------------------------------------------------------------


def test_remote_source_warns_once_about_a_half_empty_bucket(caplog):
  import jax
  from remote_utils import ThreadedServer, fake_batch, fake_requirements

  from distill_core.config import build
  from distill_core.sharding import MeshConfig, make_mesh
  from student_trainer.config import RemoteTeacherConfig
  from student_trainer.policy import WaitPolicy
  from student_trainer.sources.remote import RemoteTeacher
  from support.fake_engine import FakeEngine, fake_info
  caplog.set_level(logging.WARNING)
  server = ThreadedServer("batcher.buckets=[[8,32]]", engine=FakeEngine(fake_info(buckets=((8, 32),))))
  try:
    cfg = build(RemoteTeacherConfig, dict(address=server.address, window=1, timeout_s=10.0))
    with RemoteTeacher(cfg, fake_requirements(), mesh=make_mesh(MeshConfig(data=jax.device_count())),
                       policy=WaitPolicy()) as source:
      for i in range(2):
        source.submit(fake_batch(i), 1.0)
        assert source.next() is not None
  finally:
    server.kill()
  warnings = [r.getMessage() for r in caplog.records if "bucket" in r.getMessage()]
  assert len(warnings) == 1 and "8x32 bucket, 50% real tokens" in warnings[0]
  assert "'batcher.buckets=[[8,16]]'" in warnings[0]

