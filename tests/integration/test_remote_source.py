"""The `remote` teacher source: order, failover, fallback policies, resume, and real training (the checks
made without a server are in tests/unit/test_remote_source.py).

The first tests drive `RemoteTeacher` directly against fake-engine servers running
on their own event-loop threads; answers are checked against the fake engine's
closed form (`server_utils.fake_expected`). The end-to-end tests train real
students against `python -m teacher_server` processes and compare with the
in-process `local` teacher and with uninterrupted runs.
"""

from __future__ import annotations

import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from remote_utils import ThreadedServer, fake_batch, fake_requirements, wait_serving
from server_utils import fake_expected, free_port
from unit.test_remote_source import K, remote_cfg

from distill_core.config import load_config
from distill_core.sharding import MeshConfig, make_mesh
from student_trainer.config import TrainConfig
from student_trainer.policy import CEOnlyPolicy, WaitPolicy
from student_trainer.sources.remote import RemoteTeacher
from distill_core.stream.pool import RemoteTeacherError
from support.fake_engine import FakeEngine, fake_info


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(MeshConfig(data=jax.device_count()))


def check_answer(targets, batch, k=K, temperature=1.0):
  """The fake engine's closed-form answer for every row of `batch` (an independent recomputation)."""
  ids, logits, lse = fake_expected(batch.tokens, batch.positions, k, (temperature,))
  np.testing.assert_array_equal(np.asarray(targets.topk_ids), ids)
  np.testing.assert_array_equal(np.asarray(targets.topk_logits, np.float32), logits)
  np.testing.assert_allclose(np.asarray(targets.logsumexp), lse, rtol=1e-6)


def stream(source, batches, temperature=1.0, on_step=None):
  """Drives `source` like the trainer's feeder: keep `lookahead` batches submitted ahead."""
  out, sent = [], 0
  for step in range(len(batches)):
    while sent < min(step + source.lookahead + 1, len(batches)):
      source.submit(batches[sent], temperature)
      sent += 1
    if on_step:
      on_step(step)
    out.append(source.next())
  return out


# -- streaming against fake replicas ---------------------------------------------------------------

def test_answers_in_order_split_over_two_replicas(mesh):
  slow = ThreadedServer(engine=FakeEngine(delay_s=0.03))
  fast = ThreadedServer()
  batches = [fake_batch(i) for i in range(8)]
  need = fake_requirements(feature_layers=lambda depth: (1,))
  try:
    with RemoteTeacher(remote_cfg([slow.address, fast.address], rows_per_request=2), need, mesh=mesh,
                       policy=WaitPolicy()) as source:
      results = stream(source, batches, temperature=2.0)
      metrics = source.metrics()
      state = source.state()
  finally:
    slow.kill()
    fast.kill()
  for targets, batch in zip(results, batches, strict=True):
    check_answer(targets, batch, temperature=2.0)
    states = np.asarray(targets.layer_states["attn_out"])  # (1, B, T, E) = token + 1000 * layer + 0.5
    assert states.dtype == jnp.bfloat16  # the default state dtype
    want = np.broadcast_to((batch.tokens + 1000.5)[None, :, :, None], (1, 8, 16, 8)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(states, want)
    assert targets.state_layers == (1,)
    assert targets.topk_ids.sharding.spec[0] == ("data", "fsdp")
    assert targets.layer_states["attn_out"].sharding.spec[1] == ("data", "fsdp")
    assert len(targets.topk_ids.sharding.device_set) == jax.device_count()
  assert len(slow.engine.batches) > 0 and len(fast.engine.batches) > 0  # both replicas served
  assert metrics["requests_total"] == 8 * 4 and metrics["retries_total"] == 0
  assert 0 < metrics["latency_ms_p50"] <= metrics["latency_ms_p95"]
  assert 0 <= metrics["window_occupancy"] <= 1 and metrics["replicas_ready"] == 2
  assert state["batches"] == 8 and state["last_example_ids"] == list(range(700, 708))
  assert state["weights_fingerprint"] == "fake-weights"


def test_killed_replica_requests_are_resent(mesh):
  doomed = ThreadedServer(engine=FakeEngine(delay_s=0.05))
  survivor = ThreadedServer(engine=FakeEngine(delay_s=0.05))
  batches = [fake_batch(i) for i in range(12)]

  def kill_at_step_4(step):
    if step == 4:
      doomed.kill()

  try:
    with RemoteTeacher(remote_cfg([doomed.address, survivor.address], rows_per_request=4), fake_requirements(),
                       mesh=mesh, policy=WaitPolicy()) as source:
      results = stream(source, batches, on_step=kill_at_step_4)
      metrics = source.metrics()
  finally:
    survivor.kill()
  for targets, batch in zip(results, batches, strict=True):  # every batch, once, in order
    check_answer(targets, batch)
  assert metrics["failovers_total"] == 1 and metrics["retries_total"] >= 1
  assert metrics["fallbacks_total"] == 0 and metrics["replicas_ready"] == 1


def test_hung_replica_is_dropped_after_request_timeout(mesh):
  hung = ThreadedServer(engine=FakeEngine(fake_info(buckets=((8, 16),)), delay_s=2.0))  # 2 s per request
  healthy = ThreadedServer()
  batches = [fake_batch(i) for i in range(4)]
  try:  # after the drop, the hung replica stays away for 2.5-5 s (the reconnect backoff)
    with RemoteTeacher(remote_cfg([hung.address, healthy.address], window=1, request_timeout_s=0.3,
                                  backoff_initial_s=5.0, backoff_max_s=5.0),
                       fake_requirements(), mesh=mesh, policy=WaitPolicy()) as source:
      results = stream(source, batches)
      metrics = source.metrics()
      healthy_forwards = len(healthy.engine.batches)
  finally:
    hung.kill()
    healthy.kill()
  for targets, batch in zip(results, batches, strict=True):
    check_answer(targets, batch)
  assert metrics["retries_total"] >= 1 and metrics["failovers_total"] >= 1
  # Every batch was answered by the healthy replica (8 rows = two 4-row forwards each), whatever the wall
  # time: the hung one takes 2 s per answer, far past request_timeout_s, so its request went elsewhere.
  assert healthy_forwards >= 2 * len(batches), healthy_forwards


def test_ce_only_without_teacher_then_recovers(mesh, caplog):
  port = free_port()
  batches = [fake_batch(i) for i in range(6)]
  caplog.set_level(logging.WARNING)
  server = None

  def start_server_at_step_3(step):
    nonlocal server
    if step == 3:
      server = ThreadedServer(port=port)
      deadline = time.monotonic() + 30
      while source.metrics()["replicas_ready"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the reconnect backoff is at most 0.2 s

  try:
    with RemoteTeacher(remote_cfg(f"127.0.0.1:{port}", window=2, timeout_s=0.3), fake_requirements(), mesh=mesh,
                       policy=CEOnlyPolicy()) as source:
      results = stream(source, batches, on_step=start_server_at_step_3)
      metrics = source.metrics()
      state = source.state()
  finally:
    if server:
      server.kill()
  assert results[:3] == [None, None, None]
  for targets, batch in zip(results[3:], batches[3:], strict=True):
    check_answer(targets, batch)
  assert metrics["fallbacks_total"] == 3 and state["fallbacks"] == 3
  warnings = [r.getMessage() for r in caplog.records if "fallback #" in r.getMessage()]
  assert len(warnings) == 3 and all(r.levelno == logging.WARNING for r in caplog.records
                                    if "fallback #" in r.getMessage())


def test_wait_policy_waits_until_a_server_appears(mesh, caplog):
  port = free_port()
  batches = [fake_batch(i) for i in range(3)]
  caplog.set_level(logging.WARNING)
  servers = []
  timer = threading.Timer(1.2, lambda: servers.append(ThreadedServer(port=port)))
  try:
    with RemoteTeacher(remote_cfg(f"127.0.0.1:{port}", timeout_s=0.3), fake_requirements(), mesh=mesh,
                       policy=WaitPolicy()) as source:
      timer.start()
      start = time.monotonic()
      results = stream(source, batches)
      waited = time.monotonic() - start
      metrics = source.metrics()
  finally:
    timer.join()
    for server in servers:
      server.kill()
  for targets, batch in zip(results, batches, strict=True):
    check_answer(targets, batch)
  assert waited > 0.8 and metrics["fallbacks_total"] == 0 and metrics["stall_warnings_total"] >= 1
  assert any("training waits for batch 0 (policy wait)" in r.getMessage() for r in caplog.records)


# -- refusals, errors, resume, shutdown -------------------------------------------------------------

def test_incompatible_teacher_and_bad_token_are_refused(mesh):
  server = ThreadedServer("security.auth_token=sekrit")
  try:
    with pytest.raises(RemoteTeacherError, match="vocabulary: the teacher has 256 real ids, the student 300"):
      RemoteTeacher(remote_cfg(server.address, token="sekrit"), fake_requirements(vocab_size=300), mesh=mesh,
                    policy=WaitPolicy())
    with pytest.raises(RemoteTeacherError, match="UNAUTHENTICATED"):
      RemoteTeacher(remote_cfg(server.address, token="wrong"), fake_requirements(), mesh=mesh, policy=WaitPolicy())
  finally:
    server.kill()


def test_rejected_and_failing_requests_raise(mesh):
  server = ThreadedServer(engine=FakeEngine(fail_token=7))
  good, bad_ids, failing = fake_batch(1), fake_batch(2), fake_batch(3)
  bad_ids.tokens[0, 0] = 300  # outside the teacher's vocabulary: INVALID_ARGUMENT naming tokens
  good.tokens[good.tokens == 7] = 8
  failing.tokens[0, 0] = 7  # the engine raises on every attempt
  try:
    with RemoteTeacher(remote_cfg(server.address, max_request_errors=2), fake_requirements(), mesh=mesh,
                       policy=WaitPolicy()) as source:
      for batch in (good, bad_ids, failing):
        source.submit(batch, 1.0)
      check_answer(source.next(), good)
      with pytest.raises(RemoteTeacherError, match="rejected the batch: INVALID_ARGUMENT.*tokens"):
        source.next()
      with pytest.raises(RemoteTeacherError, match="failed 2 times.*engine failure"):
        source.next()
  finally:
    server.kill()


def test_restore_refuses_another_teacher_unless_allowed(mesh):
  server = ThreadedServer()
  cursor = {"source": "remote", "batches": 5, "last_example_ids": [1, 2], "weights_fingerprint": "other",
            "fallbacks": 1}
  try:
    with RemoteTeacher(remote_cfg(server.address), fake_requirements(), mesh=mesh, policy=WaitPolicy()) as source:
      with pytest.raises(RemoteTeacherError, match="teacher weights other.*allow_teacher_change"):
        source.restore(cursor)
    with RemoteTeacher(remote_cfg(server.address, allow_teacher_change=True), fake_requirements(), mesh=mesh,
                       policy=WaitPolicy()) as source:
      source.restore(cursor)
      source.submit(fake_batch(9), 1.0)
      check_answer(source.next(), fake_batch(9))
      state = source.state()
  finally:
    server.kill()
  assert state["batches"] == 6 and state["last_example_ids"] == list(range(900, 908))
  assert state["weights_fingerprint"] == "fake-weights" and state["fallbacks"] == 1


def test_compute_is_out_of_band_and_close_stops_the_thread(mesh):
  server = ThreadedServer()
  queued = [fake_batch(i) for i in range(3)]
  try:
    source = RemoteTeacher(remote_cfg(server.address), fake_requirements(), mesh=mesh, policy=WaitPolicy())
    for batch in queued:
      source.submit(batch, 1.0)
    check_answer(source.compute(fake_batch(50), 0.5), fake_batch(50), temperature=0.5)
    check_answer(source.next(), queued[0])
    source.close()
    source.close()  # idempotent
  finally:
    server.kill()
  assert not any(t.name.startswith("remote-teacher") for t in threading.enumerate())
  with pytest.raises(RuntimeError, match="closed"):
    source.submit(queued[0], 1.0)


# -- real training against teacher-server processes ------------------------------------------------

TEACHER_SEED = 3
STEPS = 8


def server_overrides(dataset) -> list[str]:
  return ["model.source=preset", "model.preset=tiny", f"model.seed={TEACHER_SEED}", "batcher.buckets=[[8,32]]",
          "limits.max_k=16", "batcher.max_wait_ms=2", f"tokenizer_path={dataset}/tokenizer.json"]


def train_cfg(dataset, run_dir, *overrides) -> TrainConfig:
  base = [f"run_dir={run_dir}", f"data.path={dataset}", "data.batch_size=8", f"steps={STEPS}",
          "logging.every_steps=1", "logging.progress=false", "logging.tensorboard=false", "eval.every_steps=0",
          "eval.batches=1", f"checkpoint.every_steps={STEPS}", "checkpoint.async_save=false", "export_hf=false",
          "mesh.data=1", "optim.warmup_steps=2", "loss.top_k=8", "loss.alpha=0.7", "loss.beta=0.5",
          "logging.example_ids=true"]
  return load_config(TrainConfig, None, base + list(overrides))


def remote_train_cfg(dataset, run_dir, addresses, *overrides) -> TrainConfig:
  return train_cfg(dataset, run_dir, "teacher.source=remote", f"teacher.remote.address=[{', '.join(addresses)}]",
                   "teacher.remote.window=3", "teacher.remote.timeout_s=60", "teacher.remote.backoff_max_s=0.5",
                   "teacher.remote.state_dtype=float32",  # the local teacher's states are not rounded
                   *overrides)


def params_of(result) -> list[np.ndarray]:
  from flax import nnx
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(result.state.model(), nnx.Param))]


def jsonl(path) -> list[dict]:
  import json
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher(tiny_dataset, tmp_path_factory):
  """One teacher-server process (tiny preset, fixed seed) for the module."""
  from remote_utils import TeacherProcess
  server = TeacherProcess(free_port(), server_overrides(tiny_dataset), tmp_path_factory.mktemp("teacher") / "log")
  yield server
  server.stop()


@pytest.fixture(scope="module")
def reference(tiny_dataset, teacher, tmp_path_factory):
  """An uninterrupted remote run and the same run with the in-process teacher."""
  from student_trainer.train import run
  root = tmp_path_factory.mktemp("remote_reference")
  local = run(train_cfg(tiny_dataset, root / "local", "teacher.source=local", "teacher.local.model=tiny",
                        f"teacher.local.seed={TEACHER_SEED}"), keep_state=True)
  wait_serving(teacher)
  remote = run(remote_train_cfg(tiny_dataset, root / "remote", [teacher.address]), keep_state=True)
  return {"local": local, "remote": remote}


def test_remote_training_matches_local_teacher(reference):
  local, remote = reference["local"], reference["remote"]
  assert remote.step == STEPS and remote.trained_example_ids == local.trained_example_ids
  rows_local = [r for r in jsonl(local.run_dir / "metrics.jsonl") if "train/total_loss" in r]
  rows_remote = [r for r in jsonl(remote.run_dir / "metrics.jsonl") if "train/total_loss" in r]
  assert [r["step"] for r in rows_remote] == list(range(1, STEPS + 1))
  for key in ("train/total_loss", "train/kd_loss", "train/ce_loss", "train/feature_loss", "train/teacher_tail_mass"):
    assert rows_remote[0][key] == pytest.approx(rows_local[0][key], abs=1e-5, rel=0), key
    for a, b in zip(rows_remote, rows_local):
      assert a[key] == pytest.approx(b[key], abs=1e-4, rel=1e-4), (key, a["step"])
  last = remote.last_metrics
  assert last["teacher/requests_total"] >= STEPS and last["teacher/fallbacks_total"] == 0
  assert last["teacher/received_mb_total"] > 0 and last["teacher/replicas_ready"] == 1
  assert all(0 <= r["teacher/window_occupancy"] <= 1 for r in rows_remote)
  assert any(r.get("teacher/latency_ms_p95", 0) > 0 for r in rows_remote)  # intervals with answers
  assert 0 <= last["perf/teacher_wait_fraction"] < 1


def _run_with_teacher_killed_at_step_3(tiny_dataset, tmp_path, monkeypatch, *overrides):
  """A remote run whose teacher process is SIGKILLed at step 3 and restarted on the same port: (result, the
  number of teacher processes started)."""
  from remote_utils import TeacherProcess
  from student_trainer import step as step_lib
  from student_trainer.train import run
  port = free_port()
  servers = [TeacherProcess(port, server_overrides(tiny_dataset), tmp_path / "teacher.log")]
  original = step_lib.hyperparameters

  def kill_and_restart_at_step_3(cfg, step):
    if step == 3 and len(servers) == 1:
      servers[0].kill()
      servers.append(TeacherProcess(port, server_overrides(tiny_dataset), tmp_path / "teacher.log"))
    return original(cfg, step)

  monkeypatch.setattr(step_lib, "hyperparameters", kill_and_restart_at_step_3)
  try:
    wait_serving(servers[0])
    result = run(remote_train_cfg(tiny_dataset, tmp_path / "run", [servers[0].address], *overrides), keep_state=True)
  finally:
    servers[-1].stop()
  return result, len(servers)


def test_teacher_killed_and_restarted_mid_training(reference, tiny_dataset, tmp_path, monkeypatch):
  """SIGKILL at step 3, restart on the same port: same batches in the same order, bitwise the same student."""
  result, started = _run_with_teacher_killed_at_step_3(tiny_dataset, tmp_path, monkeypatch)
  assert started == 2 and result.step == STEPS
  assert result.trained_example_ids == reference["remote"].trained_example_ids
  for a, b in zip(params_of(result), params_of(reference["remote"]), strict=True):
    np.testing.assert_array_equal(a, b)
  last = result.last_metrics
  assert last["teacher/failovers_total"] >= 1 and last["teacher/reconnects_total"] >= 1
  assert last["teacher/fallbacks_total"] == 0


ON_POLICY = ("loss.on_policy_fraction=0.5", "generation.staleness=2", "generation.prompts.max_len=12",
             "generation.prompts.min_len=4", "generation.max_new_tokens=16")


def test_teacher_killed_and_restarted_with_on_policy_batches(teacher, tiny_dataset, tmp_path, monkeypatch):
  """Half the steps train on the student's samples: SIGKILL the teacher at step 3 and restart it; the run
  trains every batch once, in order, to the same student bit for bit as an uninterrupted one."""
  from student_trainer.train import run
  wait_serving(teacher)
  straight = run(remote_train_cfg(tiny_dataset, tmp_path / "straight", [teacher.address], *ON_POLICY),
                 keep_state=True)
  result, started = _run_with_teacher_killed_at_step_3(tiny_dataset, tmp_path, monkeypatch, *ON_POLICY)
  assert started == 2 and result.step == STEPS
  assert result.trained_example_ids == straight.trained_example_ids
  for a, b in zip(params_of(result), params_of(straight), strict=True):
    np.testing.assert_array_equal(a, b)
  rows = [r for r in jsonl(result.run_dir / "metrics.jsonl") if "train/total_loss" in r]
  straight_rows = [r for r in jsonl(straight.run_dir / "metrics.jsonl") if "train/total_loss" in r]
  assert [r["train/total_loss"] for r in rows] == [r["train/total_loss"] for r in straight_rows]
  assert sum("onpolicy/staleness" in r for r in rows) == STEPS // 2
  last = result.last_metrics
  assert last["teacher/failovers_total"] >= 1 and last["teacher/fallbacks_total"] == 0


def test_two_replicas_one_killed_mid_training(reference, tiny_dataset, tmp_path, monkeypatch):
  """Two teacher processes; SIGKILL one at step 3 and never bring it back: nothing lost, nothing repeated."""
  from remote_utils import TeacherProcess
  from student_trainer import step as step_lib
  from student_trainer.train import run
  servers = [TeacherProcess(free_port(), server_overrides(tiny_dataset), tmp_path / f"teacher{i}.log")
             for i in range(2)]
  original = step_lib.hyperparameters

  def kill_first_at_step_3(cfg, step):
    if step == 3:
      servers[0].kill()
    return original(cfg, step)

  monkeypatch.setattr(step_lib, "hyperparameters", kill_first_at_step_3)
  try:
    wait_serving(*servers)
    result = run(remote_train_cfg(tiny_dataset, tmp_path / "run", [s.address for s in servers],
                                  "teacher.remote.rows_per_request=4"), keep_state=True)
  finally:
    for server in servers:
      server.stop()
  assert result.step == STEPS and result.trained_example_ids == reference["remote"].trained_example_ids
  for a, b in zip(params_of(result), params_of(reference["remote"]), strict=True):
    np.testing.assert_array_equal(a, b)
  last = result.last_metrics
  assert last["teacher/failovers_total"] == 1 and last["teacher/replicas_ready"] == 1
  assert last["teacher/fallbacks_total"] == 0


def test_resume_continues_the_teacher_stream(reference, tiny_dataset, teacher, tmp_path):
  """Stop after 3 steps, resume: the cursor is in the checkpoint, the order and the student are unchanged;
  a checkpoint whose stream came from other teacher weights is refused."""
  import json
  import shutil
  from student_trainer.train import run
  cfg = remote_train_cfg(tiny_dataset, tmp_path / "run", [teacher.address])
  first = run(cfg, stop_after=3)
  meta_file = tmp_path / "run" / "checkpoints" / "3" / "meta" / "metadata"
  cursor = json.loads(meta_file.read_text())["teacher"]
  assert cursor["batches"] == 3 and cursor["last_example_ids"] == reference["remote"].trained_example_ids[2]
  assert len(cursor["weights_fingerprint"]) == 64 and cursor["fallbacks"] == 0
  shutil.copytree(tmp_path / "run", tmp_path / "other")
  meta = json.loads(meta_file.read_text())
  meta["teacher"]["weights_fingerprint"] = "0" * 64
  (tmp_path / "other" / "checkpoints" / "3" / "meta" / "metadata").write_text(json.dumps(meta))
  second = run(cfg, keep_state=True)
  assert len((second.run_dir / 'example_ids.jsonl').read_text().splitlines()) == STEPS and second.trained_example_ids == reference["remote"].trained_example_ids
  for a, b in zip(params_of(second), params_of(reference["remote"]), strict=True):
    np.testing.assert_array_equal(a, b)
  final = json.loads((tmp_path / "run" / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
  assert final["teacher"]["batches"] == STEPS
  with pytest.raises(RemoteTeacherError, match="teacher weights 0000000000000000.*allow_teacher_change"):
    run(remote_train_cfg(tiny_dataset, tmp_path / "other", [teacher.address]))


def test_training_without_teacher_falls_back_to_ce(tiny_dataset, tmp_path):
  """ce_only and no server at all: every batch trains on CE alone, counted by the loop and the source."""
  from student_trainer.train import run
  cfg = train_cfg(tiny_dataset, tmp_path / "run", "teacher.source=remote", "steps=3",
                  f"teacher.remote.address=127.0.0.1:{free_port()}", "teacher.remote.timeout_s=0.5",
                  "teacher.remote.on_timeout=ce_only")
  result = run(cfg)
  rows = [r for r in jsonl(tmp_path / "run" / "metrics.jsonl") if "train/ce_loss" in r]
  assert result.step == 3 and [r["teacher/fallback_batches"] for r in rows] == [1, 1, 1]
  assert [r["teacher/fallbacks_total"] for r in rows] == [1, 2, 3]
  assert not any("train/kd_loss" in r for r in rows) and rows[-1]["teacher/replicas_ready"] == 0
