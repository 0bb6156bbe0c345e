"""Runs of the project's own commands as processes, shared by the demo, the quality report, the benchmarks and
the tests (none of the three packages imports it).

- :func:`run`: one command to completion, printed first, its output to a log file if given;
- :func:`ensure_corpus`: a prepared dataset, prepared when the directory holds none;
- :func:`train_or_reuse`: a trainer run, reused when the settings it was trained with and the code that trains
  it (:func:`code_digest`) are unchanged; :func:`ensure_demo_teacher`: the demo teacher through it;
- :class:`TeacherServerProcess`: a teacher-server process whose output goes to a file, waited
  for through gRPC health checking, stopped with SIGTERM (a drain), then SIGKILL if it outlives the grace;
- :class:`ChildProcess` (:func:`start_trainer`): the trainer as a process; :func:`read_metrics`: the JSONL rows
  it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Mapping, Sequence

from distill_core.netutil import free_port, wait_serving

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
TEACHER_SERVER = ("-m", "teacher_server")
TRAINER = ("-m", "student_trainer")
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"  # XLA's virtual CPU devices
# What a run's result depends on besides its settings: the code that trains and serves, and the YAML files
# the demo's and the reports' settings read. Finished runs are reused only when this digest is unchanged.
CODE = ("distill_core", "student_trainer", "teacher_server")
CONFIGS = ("configs/demo/*.yaml", "configs/models/demo_*.yaml", "configs/student_remote.yaml")
STAMP = "run_settings.json"  # in a finished run's directory: the settings and code digest it was trained with
DEMO_TEACHER_CONFIG = "configs/demo/teacher.yaml"
DEMO_TEACHER_STEPS = 200


class CommandFailed(subprocess.CalledProcessError):
  """A command exited with an error; its message ends with the last lines of its log, when it had one."""

  def __init__(self, returncode: int, cmd: Sequence[str], log_path: Path | None = None, lines: int = 30):
    super().__init__(returncode, list(cmd))
    self.log_path = log_path
    self.tail = ""
    if log_path is not None and log_path.is_file():
      self.tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])

  def __str__(self) -> str:
    name = " ".join(str(a) for a in self.cmd[1:3])
    where = f" (full log: {self.log_path})" if self.log_path is not None else ""
    return f"`{name}` exited with code {self.returncode}{where}" + (f":\n{self.tail}" if self.tail else "")


def cpu_env(devices: int = 1) -> dict[str, str]:
  """Environment of a child that runs JAX on `devices` virtual CPU devices.

  This process's other XLA flags carry over (a dump directory, the test suite's compiler settings), so a
  child compiles as its parent does; only the device count is replaced."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG + "=")]
  return {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"])}


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
  """This process's environment with `env` on top, output unbuffered (log files follow the child as it runs)."""
  return {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}


def echo(args: Sequence[str], log_path: Path | None = None) -> None:
  """Prints a command as a user would type it (and where its output goes)."""
  print("$ " + shlex.join(str(a) for a in args) + (f"   (log: {log_path})" if log_path else ""), flush=True)


def pinned(cores: set[int] | None):
  """A `preexec_fn` that runs a child on `cores` (None: wherever the OS puts it)."""
  return (lambda: os.sched_setaffinity(0, cores)) if cores else None


def run(args: Sequence[str], *, log_path: Path | None = None, env: Mapping[str, str] | None = None,
        cwd: Path = REPO, cores: set[int] | None = None, show: bool = True) -> None:
  """Runs a command to completion (printed first when `show`); its output goes to `log_path` if given.

  Raises :class:`CommandFailed` (a `subprocess.CalledProcessError`) when it exits with an error.
  """
  args = [str(a) for a in args]
  if show:
    echo(args, log_path)
  if log_path is None:
    code = subprocess.run(args, cwd=cwd, env=child_env(env), preexec_fn=pinned(cores)).returncode
  else:
    with open(log_path, "w") as log:
      code = subprocess.run(args, cwd=cwd, env=child_env(env), stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=pinned(cores)).returncode
  if code:
    raise CommandFailed(code, args, log_path)


def ensure_corpus(path: str | Path, *options: str, env: Mapping[str, str] | None = None) -> bool:
  """Prepares a dataset into `path` (``python -m distill_core.prepare output_dir=<path> <options>``) when it
  holds none yet; returns whether it did."""
  if (Path(path) / "manifest.json").is_file():
    print(f"{path}: prepared dataset present, reusing it", flush=True)
    return False
  run([PY, "-m", "distill_core.prepare", f"output_dir={path}", *options], env=env)
  return True


def code_digest(root: Path = REPO) -> str:
  """sha256 over the path and bytes of every .py file under CODE and every YAML file in CONFIGS."""
  files = sorted({p for d in CODE for p in (root / d).rglob("*.py") if "__pycache__" not in p.parts}
                 | {p for pattern in CONFIGS for p in root.glob(pattern)})
  h = hashlib.sha256()
  for p in files:
    h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
  return h.hexdigest()[:16]


def dir_digest(path: Path) -> str:
  """sha256 over the files of a checkpoint directory (a teacher's or a first phase's HF export)."""
  h = hashlib.sha256()
  for p in sorted(path.iterdir()):
    if p.is_file():
      h.update(p.name.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
  return h.hexdigest()[:16]


def run_settings(overrides: Sequence[str], key: Mapping | None = None) -> dict:
  """What a finished run is keyed by: its options (the teacher server's address left out: it changes from run to
  run and is not part of what the student learns) and `key` (default: the code digest)."""
  return {"overrides": [str(o) for o in overrides if not str(o).startswith("teacher.remote.address=")],
          **({"code": code_digest()} if key is None else key)}


def finished(run_dir: Path, settings: Mapping) -> bool:
  """Whether `run_dir` holds a finished run (its HF export) trained with exactly `settings`."""
  stamp = Path(run_dir) / STAMP
  return (Path(run_dir) / "hf").is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == settings


def train_or_reuse(run_dir: str | Path, overrides: Sequence[str], *, key: Mapping | None = None, label: str = "",
                   fresh: bool = True, log_path: Path | None = None, env: Mapping[str, str] | None = None) -> bool:
  """Trains ``python -m student_trainer <overrides>`` into `run_dir` unless a finished run with the same
  settings (:func:`run_settings` of `overrides` and `key`) is there; returns whether it trained.

  `fresh`: a run whose settings differ, or that died, starts again from nothing (its directory is removed);
  otherwise the trainer resumes from the checkpoints it finds there. The settings are written to
  ``<run_dir>/run_settings.json`` once the run finished.
  """
  run_dir = Path(run_dir)
  settings = run_settings(overrides, key)
  if finished(run_dir, settings):
    print(f"{label or run_dir}: reusing {run_dir} (same settings and code)", flush=True)
    return False
  if fresh and run_dir.exists():
    shutil.rmtree(run_dir)
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / STAMP).unlink(missing_ok=True)
  run([PY, *TRAINER, *overrides], log_path=log_path, env=env)
  (run_dir / STAMP).write_text(json.dumps(settings))
  return True


def demo_teacher_overrides(run_dir: str | Path, data: str | Path, steps: int = DEMO_TEACHER_STEPS) -> list[str]:
  """The options of the demo teacher (configs/demo/teacher.yaml: CE pretraining) in `run_dir` on `data`."""
  return ["--config", DEMO_TEACHER_CONFIG, f"run_dir={run_dir}", f"steps={steps}", f"data.path={data}"]


def ensure_demo_teacher(run_dir: str | Path, data: str | Path, steps: int = DEMO_TEACHER_STEPS, **kwargs) -> Path:
  """The demo teacher's HF export in ``<run_dir>/hf``, trained (or resumed) unless a finished one with the same
  settings and code is there; `kwargs` go to :func:`train_or_reuse`."""
  kwargs.setdefault("fresh", False)  # a teacher trained further (more steps) resumes from its checkpoints
  train_or_reuse(run_dir, demo_teacher_overrides(run_dir, data, steps), label="demo teacher", **kwargs)
  return Path(run_dir) / "hf"


def read_metrics(run_dir: str | Path, key: str | None = None) -> list[dict]:
  """The rows the trainer appended to ``<run_dir>/metrics.jsonl``, in order ([] when there is none); with `key`,
  only the rows that hold it. A last line still being written by a running trainer is left out."""
  path = Path(run_dir) / "metrics.jsonl"
  if not path.is_file():
    return []
  rows = []
  lines = path.read_text().splitlines()
  for i, line in enumerate(lines):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # a line being written right now
        break
      raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    if key is None or key in row:
      rows.append(row)
  return rows


def last_metrics(run_dir: str | Path) -> dict[str, float]:
  """The last value of every metric of a run (its rows merged in order)."""
  merged: dict[str, float] = {}
  for row in read_metrics(run_dir):
    merged.update(row)
  return merged


class ChildProcess:
  """A child process of the harness (its own session, so a Ctrl-C reaches only this process, which stops it),
  its output appended or written to `log_path` (inherited when None)."""

  def __init__(self, args: Sequence[str], log_path: Path | None = None, *, env: Mapping[str, str] | None = None,
               cwd: Path = REPO, cores: set[int] | None = None, append: bool = False, show: bool = False):
    self.args = [str(a) for a in args]
    self.log_path = Path(log_path) if log_path is not None else None
    if show:
      echo(self.args, self.log_path)
    self._log: IO[bytes] | None = open(log_path, "ab" if append else "wb") if log_path else None  # noqa: SIM115
    try:
      self.proc = subprocess.Popen(self.args, cwd=cwd, env=child_env(env), stdout=self._log,
                                   stderr=subprocess.STDOUT if self._log else None, preexec_fn=pinned(cores),
                                   start_new_session=True)
    except BaseException:
      self._close_log()
      raise

  @property
  def pid(self) -> int:
    return self.proc.pid

  def logs(self) -> str:
    return self.log_path.read_text(errors="replace") if self.log_path is not None else ""

  def poll(self) -> int | None:
    return self.proc.poll()

  def check_alive(self) -> None:
    """Raises, with the end of its log, if the process has exited."""
    if self.proc.poll() is not None:
      raise RuntimeError(f"`{shlex.join(self.args[1:3])}` exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")

  def terminate(self) -> None:
    """SIGTERM (a graceful stop), unless it has exited."""
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGTERM)

  def wait(self, timeout: float | None = None) -> int:
    """Its exit code (raises `subprocess.TimeoutExpired` if it still runs after `timeout` seconds)."""
    code = self.proc.wait(timeout)
    self._close_log()
    return code

  def kill(self) -> int:
    """SIGKILL: no drain, its connections drop."""
    if self.proc.poll() is None:
      self.proc.kill()
    return self.wait(30)

  def stop(self, timeout: float = 60.0) -> int:
    """SIGTERM, then SIGKILL if it is still running after `timeout` seconds; its exit code."""
    self.terminate()
    try:
      return self.wait(timeout)
    except subprocess.TimeoutExpired:
      return self.kill()

  def _close_log(self) -> None:
    if self._log is not None:
      self._log.close()
      self._log = None

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.stop()


class ServerProcess(ChildProcess):
  """A child process serving gRPC health at `address` (a teacher server, or a stand-in for one)."""

  def __init__(self, args: Sequence[str], address: str, log_path: Path | None = None, **kwargs):
    self.address = address
    self.port = int(address.rpartition(":")[2])
    self.metrics_url: str | None = None
    super().__init__(args, log_path, **kwargs)

  def wait_serving(self, timeout: float = 300.0) -> "ServerProcess":
    """Blocks until its health service answers SERVING; raises (after stopping it) if it exits or `timeout`
    passes first, naming its log."""
    where = f" (log: {self.log_path})" if self.log_path is not None else ""
    try:
      wait_serving(self.proc, self.address, timeout, what=f"`{shlex.join(self.args[1:3])}` at {self.address}{where}")
    except (RuntimeError, TimeoutError) as e:
      self.stop(10)
      tail = self.logs()[-4000:]
      raise type(e)(f"{e}" + (f":\n{tail}" if tail else "")) from None
    return self

  def wait_listening(self, timeout: float = 300.0) -> "ServerProcess":
    """Blocks until its port accepts TCP connections (where a plaintext health check cannot tell, as for a TLS
    server); raises, with the end of its log, if it exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    host, _, port = self.address.rpartition(":")
    while True:
      self.check_alive()
      try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return self
      except OSError:
        if time.monotonic() > deadline:
          tail = self.logs()[-4000:]
          raise TimeoutError(f"{self.address} was not listening after {timeout:.0f} s:\n{tail}") from None
        time.sleep(0.1)


class TeacherServerProcess(ServerProcess):
  """``python -m teacher_server address=127.0.0.1:<port> <overrides>`` (a free port unless given; with
  `metrics_port`, its Prometheus page there too, at ``.metrics_url``). `program` replaces ``-m teacher_server``
  (a script taking the same options); `kwargs` go to :class:`ChildProcess`. Call ``wait_serving()`` once
  started, ``stop()`` at the end (or use it as a context manager).
  """

  def __init__(self, overrides: Sequence[str] = (), log_path: Path | None = None, *, port: int | None = None,
               metrics_port: int | None = None, program: Sequence[str] = TEACHER_SERVER, **kwargs):
    address = f"127.0.0.1:{port or free_port()}"
    metrics = [f"metrics_address=127.0.0.1:{metrics_port}"] if metrics_port is not None else []
    super().__init__([PY, *program, f"address={address}", *metrics, *overrides], address, log_path, **kwargs)
    if metrics_port is not None:
      self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"


def wait_until_serving(*servers: ServerProcess, timeout: float = 300.0) -> None:
  """Waits until every server answers health SERVING (raises if one exits first)."""
  for server in servers:
    server.wait_serving(timeout)


def start_trainer(overrides: Sequence[str], log_path: Path | None = None, **kwargs) -> ChildProcess:
  """Starts ``python -m student_trainer <overrides>``; `kwargs` go to :class:`ChildProcess`."""
  return ChildProcess([PY, *TRAINER, *overrides], log_path, **kwargs)


def run_trainer(overrides: Sequence[str], log_path: Path | None = None, **kwargs) -> None:
  """Runs ``python -m student_trainer <overrides>`` to completion (see :func:`run`); read its rows with
  :func:`read_metrics`."""
  run([PY, *TRAINER, *overrides], log_path=log_path, **kwargs)
