"""Learn-to-init kernels from the teacher server: fingerprint checks, resume after a dropped connection,
and the whole recipe against a real server process (LTI phase -> collapse -> KD)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from integration.test_lti_train import STUDENT
from integration.test_trainer import make_cfg
from remote_utils import TeacherProcess, ThreadedServer
from server_utils import CuttingProxy
from unit.test_lti import student_cfg, teacher_cfg

from distill_core.config import load_config
from distill_core.model.hf import save_hf_checkpoint
from distill_core.model.transformer import create_model
from distill_core.netutil import free_port
from student_trainer.config import RemoteTeacherConfig
from student_trainer.lti.teacher import RemoteTeacherParams
from teacher_server.engine import JaxEngine, weights_fingerprint


def remote_cfg(address: str) -> RemoteTeacherConfig:
  return load_config(RemoteTeacherConfig, None, [f"address={address}", "backoff_initial_s=0.05",
                                                 "backoff_max_s=0.2", "connect_timeout_s=10"])


@pytest.fixture(scope="module")
def served_teacher():
  # A vocabulary of 2048 makes the embedding 256 KiB: four 64 KiB chunks, so a download can break inside it.
  model = create_model(teacher_cfg(vocab_size=2048), seed=1)
  engine = JaxEngine(model, buckets=[(8, 16)], max_k=8, max_temperatures=1, selectable_layers=(), state_names=())
  server = ThreadedServer("serve_parameters=true", engine=engine)
  params = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  yield server, params, weights_fingerprint(model)
  server.drain()


def test_remote_kernels_resume_after_a_dropped_connection(served_teacher):
  server, params, fingerprint = served_teacher
  proxy = CuttingProxy(server.address, cut_after=150_000)  # inside the embedding's third chunk
  try:
    teacher = RemoteTeacherParams(remote_cfg(proxy.address), chunk_bytes=65536)
    assert teacher.shapes == {name: value.shape for name, value in params.items()}
    names = ["embed_tokens.embedding", "layers.1.self_attn.q_proj.kernel", "layers.2.self_attn.v_proj.bias"]
    got = teacher.fetch(names)
  finally:
    proxy.close()
  assert proxy.cuts == 1 and teacher.calls == 3  # list, the cut download, its resumption
  assert teacher.weights_fingerprint == fingerprint
  for name in names:
    np.testing.assert_array_equal(got[name], params[name])
  # The resumed call started where the bytes ended: nothing was received twice.
  assert teacher.last_download.received_bytes == sum(params[n].nbytes for n in names)


def test_remote_kernels_refuse_other_weights_and_a_closed_server(served_teacher):
  server, _, _ = served_teacher
  with pytest.raises(ValueError, match="serves weights .* expected 000000"):
    RemoteTeacherParams(remote_cfg(server.address), expected_fingerprint="0" * 64)
  closed = ThreadedServer()  # serve_parameters defaults to false
  try:
    with pytest.raises(ValueError, match="serve_parameters=true"):
      RemoteTeacherParams(remote_cfg(closed.address))
  finally:
    closed.drain()


def test_lti_phase_collapse_then_kd_against_a_teacher_server(tiny_dataset, tmp_path):
  """The recipe end to end: kernels fetched from a real server process, an LTI phase distilled from it,
  the automatic collapse, the collapse command, then plain KD from the collapsed student."""
  from distill_core.checkpoints import load_model
  from student_trainer.collapse import main as collapse_main
  from student_trainer.train import run
  teacher_dir = tmp_path / "teacher"
  save_hf_checkpoint(create_model(teacher_cfg(), seed=1), teacher_dir)
  server = TeacherProcess(free_port(), [f"model.source=hf", f"model.path={teacher_dir}", "serve_parameters=true",
                                        "batcher.buckets=[[8,32]]", "limits.max_k=16", "batcher.max_wait_ms=2",
                                        f"tokenizer_path={tiny_dataset}/tokenizer.json"], tmp_path / "teacher.log")
  try:
    server.wait_serving(180)
    remote = ["teacher.source=remote", f"teacher.remote.address={server.address}", "loss.top_k=8",
              "loss.alpha=1.0", "teacher.remote.backoff_max_s=0.5"]
    lti = make_cfg(tiny_dataset, tmp_path / "lti", *STUDENT, *remote, "steps=4", "export_hf=true",
                   "lti.enabled=true", "lti.kernels_from=remote", "lti.layer_map=[0,2]",
                   r"copy_from_teacher=[{student: 'embed_tokens|^norm|lm_head|layernorm'}]")
    result = run(lti, keep_state=True)
    assert result.step == 4 and np.isfinite(result.last_metrics["train/kd_loss"])
    meta = json.loads((tmp_path / "lti" / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["lti"]["teacher"]["kernels_from"] == "remote"
    # The automatic collapse and the HF export have the LTI model's logits, in our model and in HF semantics.
    tokens = np.random.default_rng(0).integers(0, 384, (2, 32))
    want = np.asarray(result.state.model()(tokens).logits)
    auto = load_model(orbax_checkpoint=str(tmp_path / "lti" / "collapsed"))
    exported = load_model(hf_checkpoint=str(tmp_path / "lti" / "hf"))
    for model in (auto, exported):
      np.testing.assert_allclose(np.asarray(model(tokens).logits), want, rtol=1e-5, atol=1e-5)
    from unit.test_hf import read_all, reference_logits
    hf_dir = tmp_path / "lti" / "hf"
    ones = np.ones((1, 16), np.int32)
    ref = reference_logits(read_all(hf_dir), json.loads((hf_dir / "config.json").read_text()), tokens[:1, :16],
                           np.arange(16)[None], ones)
    np.testing.assert_allclose(ref, want[:1, :16], rtol=1e-4, atol=1e-4)
    # The collapse command refetches C from the recorded server and checks its fingerprint.
    assert collapse_main(["--run-dir", str(tmp_path / "lti"), "--orbax-out", str(tmp_path / "cli"), "--no-hf"]) == 0
    np.testing.assert_allclose(np.asarray(load_model(orbax_checkpoint=str(tmp_path / "cli"))(tokens).logits), want,
                               rtol=1e-5, atol=1e-5)
    # Phase 3: ordinary KD from the collapsed student.
    kd = make_cfg(tiny_dataset, tmp_path / "kd", *STUDENT, *remote, "steps=2",
                  f"init_hf_checkpoint={tmp_path / 'lti' / 'hf'}")
    follow = run(kd, keep_state=True)
    assert follow.step == 2 and np.isfinite(follow.last_metrics["train/kd_loss"])
  finally:
    server.stop()


async def test_get_parameters_lists_and_resumes_at_a_name_and_offset():
  import re

  from server_utils import fake_server

  from distill_core.client import TeacherClient, TeacherError
  from distill_core.proto import teacher_pb2 as pb
  from teacher_server.config import MIN_CHUNK_BYTES
  from support.fake_engine import FakeEngine, fake_info
  engine = FakeEngine(fake_info(vocab_size=4096))  # embedding: 128 KiB = 2 chunks
  ref = dict(engine.parameters(re.compile(".")))
  async with fake_server("serve_parameters=true", engine=engine) as (_, address), TeacherClient(address) as client:
    listing = await client.list_parameters(".*")
    assert listing == {n: (v.dtype, v.shape) for n, v in ref.items()}
    chunks = [c async for c in client.stub.GetParameters(pb.GetParametersRequest(name_regex=".*", names_only=True))]
    assert all(not c.data and c.total_bytes == ref[c.name].nbytes for c in chunks)
    # Resume inside the embedding (not on a chunk boundary): the rest of it, then every later name.
    start = 1000
    request = pb.GetParametersRequest(name_regex=".*", chunk_bytes=MIN_CHUNK_BYTES,
                                      start_name="embed_tokens.embedding", start_offset=start)
    got = [c async for c in client.stub.GetParameters(request)]
    assert got[0].name == "embed_tokens.embedding" and got[0].offset == start
    data = b"".join(c.data for c in got if c.name == "embed_tokens.embedding")
    assert data == ref["embed_tokens.embedding"].tobytes()[start:]
    assert sorted({c.name for c in got}) == sorted(n for n in ref if n >= "embed_tokens.embedding")
    for bad, code in ((-1, "INVALID_ARGUMENT"), (10 ** 9, "OUT_OF_RANGE")):
      with pytest.raises(TeacherError) as e:
        request = pb.GetParametersRequest(name_regex=".*", start_name="embed_tokens.embedding", start_offset=bad)
        try:
          _ = [c async for c in client.stub.GetParameters(request)]
        except Exception as rpc_error:  # the raw stub raises AioRpcError
          raise TeacherError.from_rpc(rpc_error) from None
      assert e.value.code.name == code and "start_offset" in e.value.message


def test_remote_kernels_with_a_separate_parameters_token(tmp_path):
  token = tmp_path / "parameters_token"
  token.write_text("s3cret\n")
  server = ThreadedServer("serve_parameters=true", "security.parameters_token=s3cret")
  try:
    with pytest.raises(ValueError, match="PERMISSION_DENIED|UNAUTHENTICATED"):
      RemoteTeacherParams(remote_cfg(server.address))
    teacher = RemoteTeacherParams(remote_cfg(server.address), token_file=str(token))
    assert teacher.fetch(["embed_tokens.embedding"])["embed_tokens.embedding"].shape == \
        teacher.shapes["embed_tokens.embedding"]
  finally:
    server.drain()
