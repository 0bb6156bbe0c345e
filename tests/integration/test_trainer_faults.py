"""Faults of real clusters, seen from the student: hung replicas, preemption while waiting, bad answers.

Each fault is produced for real: a teacher process whose engine hangs or corrupts its answers
(tests/fake_teacher.py), a trainer process that gets SIGTERM while it waits for a teacher.
"""

from __future__ import annotations

import threading
import time

import jax
import pytest
from remote_utils import TeacherProcess, fake_batch, fake_requirements, wait_serving
from server_utils import free_port

from distill_core.config import build
from distill_core.sharding import MeshConfig, make_mesh
from student_trainer.config import RemoteTeacherConfig
from student_trainer.policy import CEOnlyPolicy
from student_trainer.sources.remote import RemoteTeacher


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(MeshConfig(data=jax.device_count()))


def drive(source, batches, results: list) -> None:
  """Submits every batch, then collects the answers in order (like the trainer's feeder)."""
  for batch in batches:
    source.submit(batch, 1.0)
  for _ in batches:
    results.append(source.next())


def test_hung_replica_process_with_default_backoff_falls_back(mesh, tmp_path):
  """A teacher process whose engine takes 8 s per batch while health and GetInfo still answer.

  `request_timeout_s` drops its stream after 0.5 s and the client reconnects; reconnecting is
  not progress, so the policy's `timeout_s` (1.5 s) expires and `ce_only` takes the batches,
  with the default reconnect backoff (which a test must not stretch to hide the problem).
  """
  hung = TeacherProcess(free_port(), [], tmp_path / "hung.log", fake=["--delay-s", "8", "--buckets", "8x16"])
  try:
    wait_serving(hung)
    cfg = build(RemoteTeacherConfig, dict(address=hung.address, window=2, timeout_s=1.5, request_timeout_s=0.5,
                                          on_timeout="ce_only"))
    defaults = RemoteTeacherConfig()
    assert (cfg.backoff_initial_s, cfg.backoff_max_s) == (defaults.backoff_initial_s, defaults.backoff_max_s)
    with RemoteTeacher(cfg, fake_requirements(), mesh=mesh, policy=CEOnlyPolicy()) as source:
      results: list = []
      worker = threading.Thread(target=drive, args=(source, [fake_batch(i) for i in range(2)], results),
                                daemon=True)
      worker.start()
      worker.join(60)  # the hung engine answers after 8 s at the earliest; before the fix: never
      assert not worker.is_alive(), f"next() still blocked after 60 s: {source.metrics()}"
      metrics = source.metrics()
  finally:
    hung.kill()
  assert results == [None, None]
  assert metrics["fallbacks_total"] == 2 and metrics["requests_total"] == 0
  assert metrics["failovers_total"] >= 1  # the hung stream was dropped


# -- answers are checked, non-finite steps never reach the parameters ------------------------------


def fake_teacher(tmp_path, *fake: str) -> TeacherProcess:
  """A fake-engine teacher process matching the tiny student (vocabulary 384, 8x32 batches)."""
  server = TeacherProcess(free_port(), [], tmp_path / "teacher.log",
                          fake=["--vocab-size", "384", "--buckets", "8x32", *fake])
  wait_serving(server)
  return server


def faults_overrides(dataset, run_dir, address, *overrides) -> list[str]:
  """A 3-step tiny run against the remote teacher at `address` (as command-line overrides)."""
  return [f"run_dir={run_dir}", f"data.path={dataset}", "data.batch_size=8", "steps=3", "logging.every_steps=1",
          "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0", "eval.batches=1",
          "checkpoint.async_save=false", "export_hf=false", "mesh.data=1", "loss.top_k=8", "loss.alpha=1.0",
          "teacher.source=remote", f"teacher.remote.address={address}", "teacher.remote.window=2",
          "teacher.remote.timeout_s=60", "teacher.remote.backoff_max_s=0.5", "logging.example_ids=true",
          *overrides]


def faults_cfg(dataset, run_dir, address, *overrides):
  from distill_core.config import load_config
  from student_trainer.config import TrainConfig
  return load_config(TrainConfig, None, faults_overrides(dataset, run_dir, address, *overrides))


def test_out_of_range_ids_from_a_teacher_process_stop_the_run(tiny_dataset, tmp_path):
  """The teacher process answers with an id outside the vocabulary (which would make the loss NaN):
  every attempt is refused as malformed, and the run stops naming the field; nothing trained on it."""
  from distill_core.stream.pool import RemoteTeacherError
  from student_trainer.train import run
  server = fake_teacher(tmp_path, "--corrupt", "ids")
  try:
    with pytest.raises(RemoteTeacherError, match=r"malformed answer: topk_ids: id 387 at \[0, 0, 1\] is outside "
                                                 r"the vocabulary \[0, 384\)"):
      run(faults_cfg(tiny_dataset, tmp_path / "run", server.address))
  finally:
    server.stop()
  assert not (tmp_path / "run" / "metrics.jsonl").exists() or not any(
      "train/kd_loss" in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())


def test_nonfinite_loss_is_skipped_or_stops_and_never_reaches_the_parameters(tiny_dataset, tmp_path):
  """Answers that pass the checks but make the loss non-finite (logsumexp -60): with `skip` every
  step is dropped and counted and the student is exactly its initialisation; with `stop` the run
  ends naming the step, with a checkpoint of the untouched model."""
  import json

  import numpy as np
  from flax import nnx

  from distill_core.sharding import make_mesh as mesh_of
  from distill_core.sharding import rules_table
  from student_trainer.state import create_train_state
  from student_trainer.train import NonFiniteStep, run
  server = fake_teacher(tmp_path, "--corrupt", "lse")
  try:
    cfg = faults_cfg(tiny_dataset, tmp_path / "skip", server.address)
    result = run(cfg, keep_state=True)
    with pytest.raises(NonFiniteStep, match="step 1: the loss or gradient is not finite"):
      run(faults_cfg(tiny_dataset, tmp_path / "stop", server.address, "optim.on_nonfinite=stop"))
  finally:
    server.stop()
  rows = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/nonfinite_steps" in r]
  assert result.step == 3 and sum(r["train/nonfinite_steps"] for r in train_rows) == 3
  fresh = create_train_state(cfg, mesh_of(cfg.mesh), rules_table(cfg.mesh))
  for a, b in zip(jax.tree.leaves(nnx.state(result.state.model(), nnx.Param)),
                  jax.tree.leaves(nnx.state(fresh.model(), nnx.Param)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert result.state.step == 0  # the optimizer never counted a step either
  assert (tmp_path / "stop" / "checkpoints" / "0").is_dir()


# -- preemption while waiting for a teacher -------------------------------------------------------

def test_sigterm_while_waiting_for_a_hung_teacher_checkpoints_and_resumes_exactly(tiny_dataset, tmp_path):
  """A trainer process (output redirected to a file) waits for a teacher whose engine hangs after
  three batches; SIGTERM ends the wait at once: the three trained steps are checkpointed, the
  process exits cleanly, and the resumed run equals an uninterrupted one bit for bit, with each
  batch trained exactly once. The redirected log has timestamped progress lines."""
  import re

  import numpy as np
  from flax import nnx

  from distill_core import harness
  from student_trainer.train import run
  common = ("steps=6", "teacher.remote.timeout_s=1", "teacher.remote.on_timeout=wait")
  healthy = fake_teacher(tmp_path)
  trainer = None
  hung = TeacherProcess(free_port(), [], tmp_path / "hung.log",
                        fake=["--vocab-size", "384", "--buckets", "8x32", "--hang-after", "3"])
  try:
    wait_serving(hung)
    log_path = tmp_path / "trainer.log"
    trainer = harness.start_trainer(faults_overrides(tiny_dataset, tmp_path / "run", hung.address, *common),
                                    log_path)
    deadline = time.monotonic() + 240
    while "training waits for batch 3" not in log_path.read_text():
      assert trainer.poll() is None, log_path.read_text()[-3000:]
      assert time.monotonic() < deadline, log_path.read_text()[-3000:]
      time.sleep(0.2)
    trainer.terminate()
    code = trainer.wait(120)  # before the fix: never (only SIGKILL ended it, with nothing saved)
    text = log_path.read_text()
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    straight = run(faults_cfg(tiny_dataset, tmp_path / "straight", healthy.address, *common), keep_state=True)
    resumed = run(faults_cfg(tiny_dataset, tmp_path / "run", healthy.address, *common), keep_state=True)
  finally:
    if trainer is not None:
      trainer.kill()
    hung.kill()
    healthy.stop()
  assert code == 0, text[-3000:]
  assert "stopped while waiting for the teacher's answer to batch 3" in text
  assert "stopped early (preempted) at step 3" in text
  assert saved == [3]
  stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO "
  assert re.search(stamp + r"student_trainer\.metrics: step 3/6 ", text, re.M), text[-3000:]
  assert resumed.step == 6 and resumed.trained_example_ids == straight.trained_example_ids
  assert len((tmp_path / "run" / "example_ids.jsonl").read_text().splitlines()) == 6  # none trained twice
  for a, b in zip(jax.tree.leaves(nnx.state(resumed.state.model(), nnx.Param)),
                  jax.tree.leaves(nnx.state(straight.state.model(), nnx.Param)), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- bounded memory, unbiased metrics, no compile at fallback time ---------------------------------

def test_the_run_keeps_no_per_step_history(tiny_dataset, tmp_path):
  """Memory does not grow with run length: no list of every step's example ids; the optional log
  is on disk, and without it there is none (a clear error says how to get one)."""
  import dataclasses

  from student_trainer.train import TrainResult, run
  assert [f.name for f in dataclasses.fields(TrainResult)] == ["step", "preempted", "last_metrics", "run_dir",
                                                                "state", "compilations"]
  from integration.test_trainer import make_cfg
  result = run(make_cfg(tiny_dataset, tmp_path / "run", "steps=2", "logging.example_ids=false"))
  assert not (tmp_path / "run" / "example_ids.jsonl").exists()
  with pytest.raises(FileNotFoundError, match="run with logging.example_ids=true"):
    result.trained_example_ids


def test_ce_only_program_is_compiled_before_the_first_fallback(tiny_dataset, tmp_path, caplog):
  """With no teacher and ce_only, every batch falls back; the CE-only step program must already
  exist by then, so no train-step compilation is logged after the first fallback."""
  import logging

  from student_trainer.train import run
  cfg = faults_cfg(tiny_dataset, tmp_path / "run", f"127.0.0.1:{free_port()}", "teacher.remote.timeout_s=0.5",
                   "teacher.remote.on_timeout=ce_only", "steps=2")
  caplog.set_level(logging.DEBUG)
  with jax.log_compiles(True):
    result = run(cfg)
  messages = [r.getMessage() for r in caplog.records]
  first_fallback = next(i for i, m in enumerate(messages) if "fallback #1" in m)
  compiles = [i for i, m in enumerate(messages) if "Compiling" in m and "train_step" in m]
  assert result.step == 2 and compiles and max(compiles) < first_fallback, [messages[i] for i in compiles]


# -- resume compares the run config -----------------------------------------------------------------


def test_resume_refuses_a_changed_run_unless_allowed(tiny_dataset, tmp_path):
  from student_trainer.checkpoint import ConfigChanged
  from student_trainer.train import run
  from integration.test_trainer import make_cfg
  first = run(make_cfg(tiny_dataset, tmp_path / "run", "steps=4", "checkpoint.every_steps=2"), stop_after=2)
  assert first.step == 2
  changed = ("steps=4", "optim.learning_rate=1e-2", "loss.top_k=8")
  with pytest.raises(ConfigChanged) as e:
    run(make_cfg(tiny_dataset, tmp_path / "run", *changed))
  text = str(e.value)
  assert "loss.top_k: 64 -> 8" in text and "optim.learning_rate: 0.003 -> 0.01" in text
  assert "checkpoint.allow_changes=[loss.top_k, optim.learning_rate]" in text
  grown = run(make_cfg(tiny_dataset, tmp_path / "run", "steps=5", "optim.learning_rate=1e-2", "loss.top_k=8",
                       "checkpoint.allow_changes=[optim.learning_rate, loss]"))
  assert grown.step == 5  # steps may grow; the allowed changes are taken
