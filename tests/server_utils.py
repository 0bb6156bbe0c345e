"""Helpers for the teacher-server tests: in-process fake servers, a real server process, certificates."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

from distill_core import harness
from distill_core.config import load_config
from distill_core.netutil import free_port  # noqa: F401  (re-exported for the tests)
from teacher_server.config import ServerConfig
from teacher_server.engine_api import Engine
from support.fake_engine import FakeEngine
from teacher_server.server import TeacherServer

REPO = Path(__file__).resolve().parent.parent


def one_device_env() -> dict[str, str]:
  """The environment of a command a test starts: one virtual CPU device, this checkout importable."""
  return harness.child_env({**harness.cpu_env(1), "PYTHONPATH": str(REPO)})


def fake_config(*overrides: str) -> ServerConfig:
  """A config matching the default :func:`fake_info` (buckets 4x16 and 4x32, max_k 8)."""
  base = ["address=127.0.0.1:0", "batcher.buckets=[[4,16],[4,32]]", "limits.max_k=8",
          "batcher.max_wait_ms=2", "limits.max_batch=16", "limits.max_tokens_per_request=256"]
  return load_config(ServerConfig, None, base + list(overrides))


@contextlib.asynccontextmanager
async def fake_server(*overrides: str, engine: Engine | None = None):
  """A started in-process server around a fake engine; yields (server, "127.0.0.1:port")."""
  server = TeacherServer(fake_config(*overrides), engine or FakeEngine())
  port = await server.start()
  try:
    yield server, f"127.0.0.1:{port}"
  finally:
    await server.drain()


async def until(condition, what: str, timeout: float = 60.0) -> None:
  """Waits (polling) until `condition()` holds: an order of events, not a guess at how long they take."""
  import asyncio
  deadline = time.monotonic() + timeout
  while not condition():
    assert time.monotonic() < deadline, f"not reached within {timeout:g} s: {what}"
    await asyncio.sleep(0.01)


class GatedEngine(FakeEngine):
  """The fake engine, each forward held until the test opens `gate` (a deterministic "still running")."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.gate = threading.Event()

  def forward(self, batch):
    with self._lock:
      self.batches.append(None)  # counted at once: "a forward has started"
    assert self.gate.wait(120), "the test never opened the gate"
    with self._lock:
      self.batches.pop()
    return super().forward(batch)


def fake_expected(tokens: np.ndarray, positions: np.ndarray, k: int, temps: tuple[float, ...],
                  vocab: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The fake engine's answer, recomputed with loops (ids, logits, lse)."""
  b, t = tokens.shape
  ids = np.zeros((b, t, k), np.int32)
  lse = np.zeros((b, t, len(temps)), np.float32)
  for i in range(b):
    for j in range(t):
      ids[i, j] = [(tokens[i, j] + n) % vocab for n in range(k)]
      lse[i, j] = [temp + positions[i, j] / 1000 for temp in temps]
  logits = np.tile(np.array([-0.5 * n for n in range(k)], np.float32), (b, t, 1))
  return ids, logits, lse


def _openssl(*args: str, cwd: Path) -> None:
  subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(root: Path) -> dict[str, Path]:
  """A CA, a server certificate for localhost/127.0.0.1, a client certificate, and a rogue CA + client."""
  key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
  for ca in ("ca", "rogue_ca"):
    _openssl("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2",
             "-subj", f"/CN={ca}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=root)
  (root / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                   "extendedKeyUsage=serverAuth\n")
  (root / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
  for name, ca, ext in (("server", "ca", "server.ext"), ("client", "ca", "client.ext"),
                        ("rogue_client", "rogue_ca", "client.ext")):
    _openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=root)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", ext, cwd=root)
  return {p.stem: p for p in root.glob("*.pem")} | {f"{p.stem}_key": p for p in root.glob("*.key")}


class ServerProcess(harness.TeacherServerProcess):
  """``python -m teacher_server`` in a child process (one CPU device, JSON logs, its Prometheus page at
  ``.metrics_url`` when `metrics`), its output appended to `log_path`; not yet serving (``.wait_serving()``).

  With `fake` (arguments of tests/fake_teacher.py, e.g. ``["--delay-s", "8"]``) the process serves the fake
  engine instead, hung or corrupting as those arguments say.
  """

  def __init__(self, overrides: list[str], log_path: Path, *, port: int | None = None,
               fake: list[str] | None = None, metrics: bool = True):
    program = harness.TEACHER_SERVER if fake is None else (str(REPO / "tests" / "fake_teacher.py"), *fake)
    super().__init__(["log_format=json", *overrides], log_path, port=port, program=program,
                     metrics_port=free_port() if metrics else None, env=harness.cpu_env(1), append=True)


def wait_for(predicate, timeout: float, what: str) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return
    time.sleep(0.1)
  raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class CuttingProxy:
  """A loopback TCP proxy to `target` that drops its first connection once `cut_after` bytes of
  server-to-client traffic passed through it (a connection lost mid-download); later connections pass."""

  def __init__(self, target: str, cut_after: int):
    host, _, port = target.rpartition(":")
    self._target = (host, int(port))
    self.cut_after = cut_after
    self.cuts = 0
    self._listener = socket.socket()
    self._listener.bind(("127.0.0.1", 0))
    self._listener.listen()
    self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
    self._closed = False
    self._thread = threading.Thread(target=self._accept, daemon=True)
    self._thread.start()

  def _accept(self) -> None:
    while not self._closed:
      try:
        client, _ = self._listener.accept()
      except OSError:
        return
      server = socket.create_connection(self._target)
      cut = self.cuts == 0
      threading.Thread(target=self._pump, args=(client, server, None), daemon=True).start()
      threading.Thread(target=self._pump, args=(server, client, self.cut_after if cut else None),
                       daemon=True).start()

  def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
    sent = 0
    try:
      while data := src.recv(16384):
        if limit is not None and sent + len(data) > limit and self.cuts == 0:
          self.cuts += 1
          break
        dst.sendall(data)
        sent += len(data)
    except OSError:
      pass
    for s in (src, dst):
      try:
        s.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass
      s.close()

  def close(self) -> None:
    self._closed = True
    self._listener.close()
