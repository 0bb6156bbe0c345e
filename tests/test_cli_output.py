"""What the command lines print: the project's own lines at the default level, third-party chatter only
when asked for, and one-line start-up errors instead of tracebacks (real subprocesses)."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

from server_utils import REPO

TRAIN_ARGS = ["data.batch_size=8", "steps=2", "logging.every_steps=1", "logging.progress=false",
              "logging.tensorboard=false", "eval.every_steps=0", "eval.batches=1", "checkpoint.every_steps=2",
              "checkpoint.async_save=false", "export_hf=false", "mesh.data=1", "optim.warmup_steps=1"]


def cli_env(**changes: str | None) -> dict[str, str]:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONUNBUFFERED="1",
             PYTHONPATH=str(REPO))
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
  on a user's machine): no absl/orbax INFO line, no `Unable to initialize backend 'tpu'` line."""
  out = run_cli("student_trainer", f"data.path={tiny_dataset}", f"run_dir={tmp_path / 'run'}", *TRAIN_ARGS,
                JAX_PLATFORMS=None)
  assert out.returncode == 0, out.stderr[-3000:]
  assert (tmp_path / "run" / "checkpoints").exists() or any((tmp_path / "run").rglob("_CHECKPOINT_METADATA"))
  text = out.stdout + out.stderr
  assert not THIRD_PARTY_INFO.search(text), [line for line in text.splitlines() if THIRD_PARTY_INFO.search(line)]
  assert re.search(r"INFO student_trainer\.\S+: ", out.stderr), out.stderr[-2000:]  # the project's lines stay
  assert "finished at step 2" in out.stdout


def test_third_party_info_is_held_one_step_below_the_project(capfd):
  """The filter setup_logging installs, on real records of the loggers that were noisy."""
  from distill_core.logs import setup_logging
  root = logging.getLogger()
  saved = root.handlers[:], root.level
  try:
    for level, shown in (("INFO", {"student_trainer.train info", "absl warning", "distill_core.x info"}),
                         ("WARNING", {"absl warning"}),
                         ("DEBUG", {"student_trainer.train info", "absl warning", "distill_core.x info",
                                    "absl info", "jax._src.xla_bridge info", "orbax.checkpoint debug"})):
      setup_logging(level=level)
      capfd.readouterr()
      logging.getLogger("absl").info("absl info")
      logging.getLogger("absl").warning("absl warning")
      logging.getLogger("jax._src.xla_bridge").info("jax._src.xla_bridge info")
      logging.getLogger("orbax.checkpoint").debug("orbax.checkpoint debug")
      logging.getLogger("student_trainer.train").info("student_trainer.train info")
      logging.getLogger("distill_core.x").info("distill_core.x info")
      err = capfd.readouterr().err
      assert {m for m in re.findall(r": (\S+ \w+)$", err, re.M)} == shown, (level, err)
  finally:
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
