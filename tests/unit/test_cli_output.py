"""What the command lines print, in process: third-party chatter held one level below the project's own
lines, and the diagnosis of a TLS client against a plaintext port (the subprocess checks are in
tests/integration/test_cli_output.py)."""

from __future__ import annotations

import logging
import re


def test_third_party_info_is_held_one_step_below_the_project(capfd, root_logging):
  """The filter setup_logging installs, on real records of the loggers that were noisy."""
  from distill_core.logs import setup_logging
  # The filter decides alone: a logger left at a level by code that ran earlier in this process would hide
  # records before it sees them.
  noisy = [logging.getLogger(name) for name in ("absl", "jax", "jax._src", "jax._src.xla_bridge", "orbax",
                                                "orbax.checkpoint", "student_trainer", "distill_core")]
  levels = [logger.level for logger in noisy]
  for logger in noisy:
    logger.setLevel(logging.NOTSET)
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
    for logger, level in zip(noisy, levels):
      logger.setLevel(level)


# -- a student waiting for a teacher says for what, and why it does not come -------------------------------


def test_diagnosis_of_a_tls_client_against_a_plaintext_port():
  import socket

  from distill_core.stream.checks import diagnose_connection
  with socket.socket() as plain:  # a plaintext listener that never speaks TLS
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    address = f"127.0.0.1:{plain.getsockname()[1]}"
    found = diagnose_connection(address, tls=True, timeout_s=0.5)
    assert found.startswith(f"the server at {address} does not complete a TLS handshake"), found
    assert diagnose_connection(address, tls=False, timeout_s=0.5) == ""
  assert diagnose_connection("unix:/tmp/x.sock", tls=False) == ""
