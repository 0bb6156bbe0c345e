"""Two real teacher-server processes behind one gRPC name; one of them swaps its weights mid-run.

The student's streams check the replica each of them reached (its GetInfo
comes in the stream's initial metadata) and every answer names its replica
and weights. With `on_weights_change: drain` training moves to the new
weights at a batch boundary and every batch's rows come from one teacher
(checked row by row against the two teachers' own argmax); with `stop` it
ends with an error naming the change.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from remote_utils import TeacherProcess, wait_serving
from server_utils import free_port

from distill_core.checkpoints import load_model
from distill_core.config import build, load_config, resolve_preset
from distill_core.data import make_iterator
from distill_core.model.config import ModelConfig
from distill_core.proto import teacher_pb2 as pb
from distill_core.proto import teacher_pb2_grpc
from distill_core.sharding import MeshConfig, make_mesh
from student_trainer.config import TrainConfig
from student_trainer.sources import Student
from student_trainer.sources.remote import RemoteTeacher
from distill_core.stream.pool import RemoteTeacherError

OLD_SEED, NEW_SEED = 3, 4


def start_teacher(port: int, seed: int, name: str, log_dir) -> TeacherProcess:
  return TeacherProcess(port, ["model.source=preset", "model.preset=tiny", f"model.seed={seed}",
                               "batcher.buckets=[[2,32]]", "limits.max_k=16", "batcher.max_wait_ms=2",
                               f"replica_id={name}"], log_dir / f"{name}.log")


def info_of(address: str) -> pb.GetInfoResponse:
  with grpc.insecure_channel(address) as channel:
    return teacher_pb2_grpc.TeacherStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)


def source_cfg(dataset, target: str, policy: str) -> TrainConfig:
  return load_config(TrainConfig, None, [
      f"data.path={dataset}", "data.batch_size=8", "teacher.source=remote", "loss.top_k=8",
      f"teacher.remote.address={target}", "teacher.remote.streams_per_address=2",
      "teacher.remote.rows_per_request=2", "teacher.remote.window=2", "teacher.remote.stream_max_age_s=1",
      f"teacher.remote.on_weights_change={policy}", "teacher.remote.backoff_max_s=0.5",
      "teacher.remote.timeout_s=60"])


class Teachers:
  """argmax of each teacher model, by weights fingerprint, to tell which teacher answered a row."""

  def __init__(self, fingerprints: dict[int, str]):
    cfg = build(ModelConfig, resolve_preset("tiny"))
    self.models = {fingerprints[seed]: load_model(cfg, seed=seed) for seed in fingerprints}

  def check(self, batch, targets, weights: str) -> None:
    ids = np.asarray(targets.topk_ids)[..., 0]  # (B, T)
    mask = np.asarray(batch.segment_ids) != 0
    for fingerprint, model in self.models.items():
      argmax = np.argmax(np.asarray(model(batch.tokens, batch.positions, batch.segment_ids).logits), axis=-1)
      per_row = ((ids == argmax) | ~mask).mean(axis=1)
      if fingerprint == weights:
        assert (per_row > 0.95).all(), f"rows not from the teacher the source names: {per_row}"
      else:
        assert (per_row < 0.5).all(), f"rows of the other teacher in the batch: {per_row}"


@pytest.fixture()
def replicas(tmp_path):
  ports = [free_port(), free_port()]
  servers = {"a": start_teacher(ports[0], OLD_SEED, "replica-a", tmp_path),
             "b": start_teacher(ports[1], OLD_SEED, "replica-b", tmp_path)}
  wait_serving(*servers.values())
  yield ports, servers, tmp_path
  for server in servers.values():
    server.stop()


def swap_weights(replicas) -> str:
  """Replica b restarts on its port with other weights (a rolling update of one pod)."""
  ports, servers, tmp_path = replicas
  servers["b"].stop()
  servers["b"] = start_teacher(ports[1], NEW_SEED, "replica-b2", tmp_path)
  wait_serving(servers["b"])
  return info_of(servers["b"].address).weights_fingerprint


# `stop` is also covered without servers in test_remote_source.py; its end-to-end run is slow-only.
@pytest.mark.parametrize("policy", ["drain", pytest.param("stop", marks=pytest.mark.slow)])
def test_weights_swapped_behind_one_name(tiny_dataset, replicas, policy):
  ports, servers, _ = replicas
  old = info_of(servers["a"].address)
  assert info_of(servers["b"].address).weights_fingerprint == old.weights_fingerprint
  assert old.replica_id == "replica-a"
  target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)  # one name, two replicas
  cfg = source_cfg(tiny_dataset, target, policy)
  source = RemoteTeacher.create(cfg.teacher.remote, cfg.teacher.cached, student=Student.of(cfg),
                                mesh=make_mesh(MeshConfig(data=1)))
  data = make_iterator(cfg.data)
  try:
    def step():
      batch = next(data)
      source.submit(batch, 1.0)
      return batch, source.next()

    for _ in range(3):
      step()
    assert source.last_weights == old.weights_fingerprint
    new = swap_weights(replicas)
    teachers = Teachers({OLD_SEED: old.weights_fingerprint, NEW_SEED: new})
    deadline = time.monotonic() + 120
    if policy == "stop":
      with pytest.raises(RemoteTeacherError, match="teacher weights changed.*replica-b2.*on_weights_change=stop"):
        while time.monotonic() < deadline:
          batch, targets = step()
          teachers.check(batch, targets, source.last_weights)  # never mixed until it stops
      return
    seen = []
    while time.monotonic() < deadline and seen[-3:] != [new] * 3:
      batch, targets = step()
      teachers.check(batch, targets, source.last_weights)
      seen.append(source.last_weights)
    assert seen[-3:] == [new] * 3, "training never moved to the new weights"
    first_new = seen.index(new)
    assert set(seen[first_new:]) == {new}  # the old weights are never used again
    metrics = source.metrics()
    assert metrics["weight_changes_total"] >= 1 and metrics["rotations_total"] >= 1
    assert source.state()["weights_fingerprint"] == new
  finally:
    data.close()
    source.close()
