"""What the command lines print: the project's own lines at the default level, third-party chatter only
when asked for, and one-line start-up errors instead of tracebacks (real subprocesses); what a student
waiting for a teacher says. The filter on third-party loggers itself is tested in tests/unit/test_cli_output.py."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

from server_utils import REPO, one_device_env

TRAIN_ARGS = ["data.batch_size=8", "steps=2", "logging.every_steps=1", "logging.progress=false",
              "logging.tensorboard=false", "eval.every_steps=0", "eval.batches=1", "checkpoint.every_steps=2",
              "checkpoint.async_save=false", "export_hf=false", "mesh.data=1", "optim.warmup_steps=1"]


def cli_env(**changes: str | None) -> dict[str, str]:
  env = one_device_env()
  for key, value in changes.items():
    if value is None:
      env.pop(key, None)
    else:
      env[key] = value
  return env


def run_cli(module: str, *args: str, timeout: float = 600, **env: str | None) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=cli_env(**env), capture_output=True,
                        text=True, timeout=timeout)


THIRD_PARTY_INFO = re.compile(r"INFO (absl|orbax|jax)[.:]|Unable to initialize backend|NonBlockingMetadataStore")


def test_trainer_prints_its_own_lines_and_no_library_info(tiny_dataset, tmp_path):
  """A real run that checkpoints through orbax and lets jax probe every backend (JAX_PLATFORMS unset, as
  on a user's machine): no absl/orbax INFO line, no `Unable to initialize backend 'tpu'` line, and
  none of the warnings libtpu (installed by the `tpu` extra) prints when it is started with no TPU chip
  (ALLOW_MULTIPLE_LIBTPU_LOAD: it would otherwise stop at another test process's lock, silently)."""
  out = run_cli("student_trainer", f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'run'}", *TRAIN_ARGS,
                JAX_PLATFORMS=None, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / "run" / "checkpoints").exists() or any((tmp_path / "run").rglob("_CHECKPOINT_METADATA"))
  text = out.stdout + out.stderr
  assert not THIRD_PARTY_INFO.search(text), [line for line in text.splitlines() if THIRD_PARTY_INFO.search(line)]
  for libtpu_noise in ("TPU_ACCELERATOR_TYPE", "InitGoogle", "libtpu"):
    assert libtpu_noise not in text, text[-3000:]
  assert re.search(r"INFO student_trainer\.\S+: ", out.stderr), out.stderr[-2000:]  # the project's lines stay
  assert "finished at step 2" in out.stdout


def test_logging_set_up_before_jax_imports_keeps_every_platform_and_libtpu_quiet():
  """The demo sets up logging before it imports flax: JAX's TPU backend is declined without starting
  libtpu, yet `tpu` stays a platform lowering rules can register for (Pallas does so on import), and
  the program runs on what the machine has. (Compiling for a TPU topology, which does start libtpu,
  is tested in test_scale.py.)"""
  code = ("from distill_core.logs import setup_logging; setup_logging()\n"
          "import jax; from flax import nnx; from jax.experimental import pallas\n"
          "print(jax.default_backend())\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=cli_env(JAX_PLATFORMS=None, ALLOW_MULTIPLE_LIBTPU_LOAD="1"))
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["cpu"], out.stdout
  for libtpu_noise in ("TPU_ACCELERATOR_TYPE", "InitGoogle", "libtpu", "Unable to initialize backend"):
    assert libtpu_noise not in out.stderr, out.stderr[-3000:]


# -- offline answers that are not this run's: refused in one line --------------------------------------

def write_answers(dataset, root, *, fingerprint: str, ids=None, writer: str = "w0", name: str = "a"):
  """A small answers directory for `dataset`'s train split (random top-8 answers at T=1, 64 records per
  shard) stamped by the teacher `fingerprint`, written with the project's own writer; returns the manifest.
  `ids`: the example ids to answer (default: the whole split; `first_ids` gives a few shards' worth)."""
  import numpy as np

  from distill_core import shards, wire
  from distill_core.data import load_manifest
  from distill_core.shards_io import ShardWriter
  from distill_core.targets import TeacherTargets
  data = load_manifest(dataset)
  split = data.splits["train"]
  ids = list(range(split.first_example_id, split.first_example_id + split.examples)) if ids is None else ids
  spec = shards.StoredSpec.build(wire.OutputSpec(k=8, temperatures=(1.0,), pack_ids=True),
                                 id_bits=wire.bits_for(384), value_coding="sorted_delta", zstd_level=0)
  teacher = shards.TeacherInfo(model_type="llama", weights_fingerprint=fingerprint, tokenizer_fingerprint="",
                               vocab_size=384, num_layers=2, hidden_size=64)
  dataset_info = shards.DatasetInfo(path=str(dataset), dataset_fingerprint=data.dataset_fingerprint,
                                    tokenizer_fingerprint=data.tokenizer_fingerprint, seq_len=data.seq_len,
                                    splits={"train": split.examples})
  header = shards.Progress(teacher=teacher, dataset=dataset_info, spec=spec, writer=writer)
  out = ShardWriter(root, header, name_of=lambda i: f"{name}-{i:05d}.array_record", records_per_shard=64)
  rng = np.random.default_rng(0)
  t = data.seq_len
  for example_id in ids:
    gaps = rng.exponential(1.0, (1, t, 8)).astype(np.float32)
    gaps[..., 0] = 0
    values = -np.cumsum(gaps, axis=-1).astype(np.float16)  # shifted: first 0, the rest <= 0, descending
    top = np.stack([rng.permutation(384)[:8] for _ in range(t)])[None].astype(np.int32)
    one = TeacherTargets(topk_ids=top, topk_logits=values, logsumexp=np.full((1, t, 1), 0.5, np.float32),
                         temperatures=(1.0,))
    out.add(example_id, shards.encode_record(example_id, one, spec, weights_fingerprint=fingerprint),
            positions=t, tokens=t, temperatures=(1.0,))
  out.close()
  return shards.read_manifest(root)


def first_ids(dataset, count: int = 128) -> list[int]:
  """The first `count` example ids of `dataset`'s train split: two shards, more than an unshuffled
  two-step run reads, and a second of writing instead of the whole split's half minute."""
  from distill_core.data import load_manifest
  split = load_manifest(dataset).splits["train"]
  return list(range(split.first_example_id, split.first_example_id + count))


OFFLINE_ARGS = ["teacher.source=offline", "loss.top_k=8", "loss.alpha=0.5", "teacher.value_dtype=float16",
                "data.shuffle=false"]


def assert_one_line_error(out: subprocess.CompletedProcess, *needles: str) -> str:
  assert out.returncode != 0, out.stdout[-2000:]
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith(("error:", "dump:", "teacher-server:"))]
  assert "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-4000:]
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


def test_manifest_listing_a_shard_twice_is_refused_in_one_line(tiny_dataset, tmp_path):
  import json
  answers = tmp_path / "answers"
  write_answers(tiny_dataset, answers, fingerprint="a" * 64, ids=first_ids(tiny_dataset))
  manifest = json.loads((answers / "manifest.json").read_text())
  first = manifest["shards"][0]
  manifest["shards"].append(first)  # the same file twice, the count adjusted to match
  manifest["records"] += first["records"]
  (answers / "manifest.json").write_text(json.dumps(manifest))
  out = run_cli("student_trainer", f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'run'}", *TRAIN_ARGS,
                *OFFLINE_ARGS, f"teacher.offline.path={answers}", JAX_PLATFORMS="cpu")
  assert_one_line_error(out, str(answers / "manifest.json"), "shards:", f"{first['file']} is listed twice")


def test_shard_of_another_teacher_is_refused_in_one_line(tiny_dataset, tmp_path):
  """A shard written by teacher B, copied in with its manifest entry, into teacher A's answers; the student
  pins teacher A: refused when the shard is opened, naming the file and the field."""
  import json
  mine, theirs = tmp_path / "mine", tmp_path / "theirs"
  write_answers(tiny_dataset, mine, fingerprint="a" * 64, ids=first_ids(tiny_dataset))
  write_answers(tiny_dataset, theirs, fingerprint="b" * 64, ids=first_ids(tiny_dataset))
  manifest, other = (json.loads((d / "manifest.json").read_text()) for d in (mine, theirs))
  swapped = other["shards"][1]
  assert manifest["shards"][1]["ids"] == swapped["ids"]  # the very same examples
  (mine / swapped["file"]).write_bytes((theirs / swapped["file"]).read_bytes())
  manifest["shards"][1] = swapped
  (mine / "manifest.json").write_text(json.dumps(manifest))
  out = run_cli("student_trainer", f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'run'}", *TRAIN_ARGS,
                *OFFLINE_ARGS, f"teacher.offline.path={mine}", f"teacher.offline.weights_fingerprint={'a' * 64}",
                JAX_PLATFORMS="cpu")
  assert_one_line_error(out, str(mine / swapped["file"]), "teacher.weights_fingerprint", "bbbbbbbbbbbbbbbb",
                        "aaaaaaaaaaaaaaaa")


# -- start-up errors: one line naming the problem ------------------------------------------------------

def trainer(dataset, tmp_path, *args: str) -> subprocess.CompletedProcess:
  return run_cli("student_trainer", f"data.path={dataset}", f"run_dir={tmp_path / 'run'}", *TRAIN_ARGS, *args,
                 JAX_PLATFORMS="cpu")


def test_missing_offline_path_is_one_line(tiny_dataset, tmp_path):
  out = trainer(tiny_dataset, tmp_path, *OFFLINE_ARGS, f"teacher.offline.path={tmp_path / 'nowhere'}")
  assert_one_line_error(out, "teacher.offline.path", str(tmp_path / "nowhere" / "manifest.json"), "not found")


def test_offline_fingerprint_mismatch_is_one_line(tiny_dataset, tmp_path):
  write_answers(tiny_dataset, tmp_path / "answers", fingerprint="a" * 64, ids=first_ids(tiny_dataset))
  out = trainer(tiny_dataset, tmp_path, *OFFLINE_ARGS, f"teacher.offline.path={tmp_path / 'answers'}",
                f"teacher.offline.weights_fingerprint={'b' * 64}")
  assert_one_line_error(out, f"teacher.offline.path={tmp_path / 'answers'}", "teacher.weights_fingerprint: stored "
                        f"'{'a' * 64}'", "b" * 64)


def test_partial_answers_in_a_shuffled_run_are_one_line(tiny_dataset, tmp_path):
  write_answers(tiny_dataset, tmp_path / "answers", fingerprint="a" * 64, ids=first_ids(tiny_dataset, 16))
  out = trainer(tiny_dataset, tmp_path, *[a for a in OFFLINE_ARGS if a != "data.shuffle=false"],
                f"teacher.offline.path={tmp_path / 'answers'}")
  assert_one_line_error(out, f"teacher.offline.path={tmp_path / 'answers'}: no stored answer for example id(s)",
                        "teacher.offline.on_missing=ce_only")
  assert len(out.stderr.splitlines()) <= 3, out.stderr  # the unfinished-dump warning and the error


def test_local_teacher_with_a_larger_vocabulary_is_one_line(tiny_dataset, tmp_path):
  out = trainer(tiny_dataset, tmp_path, "teacher.source=local", "teacher.local.model=tiny",
                "teacher.local.model.vocab_size=512", "loss.top_k=8")
  assert_one_line_error(out, "teacher.local: the teacher's vocabulary (512) is larger than the student's (384)")


def test_dump_into_an_output_of_another_layout_is_refused(small_dataset, tmp_path):
  """An output holding a single-writer dump: writer 0 of 2 would cut the examples differently and the
  manifest would count some twice. Refused before the teacher is loaded, naming both layouts."""
  from offline_utils import dump_args
  out_dir = tmp_path / "answers"
  write_answers(small_dataset, out_dir, fingerprint="a" * 64, writer="p00000-of-00001", name="answers-p0")
  before = sorted(p.name for p in out_dir.iterdir())
  out = run_cli("teacher_server.dump", "--process-index", "0", "--process-count", "2",
                *dump_args(small_dataset, out_dir), JAX_PLATFORMS="cpu")
  line = assert_one_line_error(out, f"output: {out_dir}", "1 writer(s)", "one of 2 writers", "--process-count 1")
  assert line.startswith("dump: ")
  assert sorted(p.name for p in out_dir.iterdir()) == before  # nothing written


def test_ctrl_c_in_the_dump_is_one_line(tiny_dataset, tmp_path):
  import signal
  import time
  from offline_utils import dump_args
  out_dir = tmp_path / "answers"
  # As at a terminal: a child inherits an ignored SIGINT (this suite run as a background job of a script),
  # and Python then leaves it ignored; the dump would finish instead of stopping. Restored before it starts.
  at_a_terminal = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                   "runpy.run_module('teacher_server.dump', run_name='__main__', alter_sys=True)")
  proc = subprocess.Popen([sys.executable, "-c", at_a_terminal, *dump_args(tiny_dataset, out_dir)], cwd=REPO,
                          env=cli_env(JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    progress = out_dir / "progress-p00000-of-00001.json"
    deadline = time.monotonic() + 600
    while not progress.exists():  # the teacher is loaded and the writer started: mid-dump (40k examples to go)
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
      time.sleep(0.2)
    alive = proc.poll() is None
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    after = time.monotonic() - sent
  finally:
    proc.kill()
  # Which way it went wrong, if it does: a dump already finished when signalled, or one that went on after it.
  assert proc.returncode == 130, (f"exit code {proc.returncode}; running when signalled: {alive}; exited {after:.1f} s "
                                  f"after SIGINT\nstdout: {stdout[-1000:]}\nstderr: {stderr[-3000:]}")
  assert "Traceback" not in stderr and len(stderr.splitlines()) <= 4, stderr
  assert stderr.splitlines()[-1] == (f"dump: interrupted; the finished shards in {out_dir} are kept: run the same "
                                     "command again to resume")


# -- the teacher server: what it says about ports and clients --------------------------------------------

def test_busy_metrics_port_names_the_port_and_the_option():
  """A second server on the same metrics port: the message names both, not only `Address already in use`."""
  import socket
  from server_utils import free_port
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    out = subprocess.run([sys.executable, str(REPO / "tests" / "fake_teacher.py"), f"address=127.0.0.1:{free_port()}",
                          f"metrics_address=127.0.0.1:{port}"], cwd=REPO, env=cli_env(JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  line = next(line for line in out.stderr.splitlines() if "cannot start" in line)
  assert f"metrics_address: cannot listen on 127.0.0.1:{port} (port {port})" in line, line
  assert "metrics_address=null" in line


async def test_each_client_connection_is_logged_once(caplog):
  from server_utils import fake_server

  from distill_core.client import TeacherClient
  from teacher_server.servicer import PeerLog
  caplog.set_level(logging.INFO, logger="teacher_server.servicer")
  # Each client with its own subchannels: gRPC otherwise shares one connection between channels with the same
  # target and arguments while it lives, and the second client would be the first peer again.
  own = [("grpc.use_local_subchannel_pool", 1)]
  async with fake_server() as (_, address):
    async with TeacherClient(address, options=own) as client:
      await client.info()
      await client.info()
    async with TeacherClient(address, options=own) as client:  # a second connection: another peer
      await client.info()
  lines = [r.getMessage() for r in caplog.records if "connected" in r.getMessage()]
  assert len(lines) == 2 and all(re.fullmatch(r"client ipv[46]:\S+ connected: GetInfo", line) for line in lines), lines
  assert lines[0] != lines[1]

  class Context:
    def __init__(self, peer):
      self._peer = peer

    def peer(self):
      return self._peer

  caplog.clear()
  peers = PeerLog(capacity=2, max_chars=12)
  for peer in ("ipv4:1.1.1.1:1", "ipv4:1.1.1.1:1", "ipv4:2.2.2.2:2", "ipv4:3.3.3.3:3", "ipv4:1.1.1.1:1",
               "x" * 100, "x" * 99):
    peers(Context(peer), "Stream")
  logged = [r.getMessage() for r in caplog.records]
  assert logged == [f"client {p} connected: Stream" for p in ("ipv4:1.1.1.1", "ipv4:2.2.2.2", "ipv4:3.3.3.3",
                                                                 "ipv4:1.1.1.1", "x" * 12)]  # 1.1.1.1 forgotten
  assert len(peers._seen) == 2


# -- a student waiting for a teacher says for what, and why it does not come -------------------------------

def _wait_for_teacher(address: str, caplog, monkeypatch, **changes) -> list[str]:
  """A remote source against `address` that never gets a teacher: the log lines of its wait."""
  import jax

  from distill_core.config import build
  from distill_core.sharding import MeshConfig, make_mesh
  from remote_utils import fake_requirements
  from student_trainer.config import RemoteTeacherConfig
  from student_trainer.sources import remote
  from student_trainer.policy import CEOnlyPolicy
  monkeypatch.setattr(remote, "WAITING_LOG_S", 0.2)
  caplog.set_level(logging.INFO, logger="student_trainer.sources.remote")
  cfg = build(RemoteTeacherConfig, dict(address=address, window=1, timeout_s=4.0, backoff_initial_s=0.05,
                                        backoff_max_s=0.2, connect_timeout_s=1.0, **changes))
  with remote.RemoteTeacher(cfg, fake_requirements(), mesh=make_mesh(MeshConfig(data=jax.device_count())),
                            policy=CEOnlyPolicy()):
    pass
  return [r.getMessage() for r in caplog.records if r.name == "student_trainer.sources.remote"]


def test_waiting_for_a_closed_port_says_nothing_listens(caplog, monkeypatch):
  from server_utils import free_port
  address = f"127.0.0.1:{free_port()}"
  lines = _wait_for_teacher(address, caplog, monkeypatch)
  assert lines[0].startswith(f"waiting for the teacher at {address} (plaintext; each try 1 s"), lines
  assert any(re.match(rf"still waiting for the teacher at {address} after \d+ s: ", line) for line in lines), lines
  assert f"nothing listens on {address} (connection refused)" in lines[-1] and "starting anyway" in lines[-1]


def test_plaintext_client_against_a_tls_server_names_the_mismatch(caplog, monkeypatch, tmp_path):
  from remote_utils import TeacherProcess
  from server_utils import free_port, make_certs
  certs = make_certs(tmp_path)
  port = free_port()
  server = TeacherProcess(port, [f"security.tls_cert={certs['server']}", f"security.tls_key={certs['server_key']}"],
                          tmp_path / "server.log", fake=[])
  try:
    server.wait_listening(120)  # TLS: a plaintext health check cannot tell
    lines = _wait_for_teacher(server.address, caplog, monkeypatch)
  finally:
    server.kill()
  mismatch = (f"the server at {server.address} speaks TLS but this client connects in plaintext: set "
              "teacher.remote.tls=true")
  assert mismatch in lines[-1] and "starting anyway" in lines[-1], lines
  assert any(line.startswith("still waiting") and mismatch in line for line in lines), lines
