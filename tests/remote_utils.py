"""Helpers for the remote-source tests: teacher servers in a thread or a process, fake batches."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
from server_utils import ServerProcess, fake_config

from distill_core.data import Batch
from distill_core.harness import wait_until_serving as wait_serving  # noqa: F401  (re-exported for the tests)
from distill_core.stream.checks import Requirements
from teacher_server.engine_api import Engine
from support.fake_engine import FakeEngine
from teacher_server.server import TeacherServer


class ThreadedServer:
  """A fake-engine teacher server on its own event loop thread, so blocking client code can call it."""

  def __init__(self, *overrides: str, engine: Engine | None = None, port: int = 0):
    self.engine = engine or FakeEngine()
    self.cfg = fake_config(f"address=127.0.0.1:{port}", *overrides)
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
    self._thread.start()
    self.server = TeacherServer(self.cfg, self.engine)
    self.port = self._run(self.server.start())
    self.address = f"127.0.0.1:{self.port}"

  def _run(self, coro, timeout: float = 30.0):
    return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

  def kill(self) -> None:
    """Stops abruptly: open streams fail at once (like a dead replica)."""
    async def stop():
      await self.server._server.stop(0)  # noqa: SLF001 - no grace, no drain: a crash as seen by clients
      await self.server.batcher.close()
    self._run(stop())
    self._shutdown_loop()

  def drain(self) -> None:
    """A graceful SIGTERM-like shutdown."""
    self._run(self.server.drain())
    self._shutdown_loop()

  def _shutdown_loop(self) -> None:
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(10)
    self._loop.close()


def fake_batch(seed: int, rows: int = 8, length: int = 16, vocab: int = 256) -> Batch:
  """A packed batch with two segments per row and some padding; example ids seed*100 + row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (rows, length), dtype=np.int32)
  seg = np.ones((rows, length), np.int32)
  seg[:, length // 2:] = 2
  seg[::2, -3:] = 0
  positions = np.concatenate([np.arange(length // 2), np.arange(length - length // 2)]).astype(np.int32)
  positions = np.broadcast_to(positions, (rows, length)).copy()
  return Batch.from_examples({"example_ids": seed * 100 + np.arange(rows), "tokens": tokens,
                              "segment_ids": seg, "positions": positions})


def fake_requirements(**changes) -> Requirements:
  """What a student matching the default fake engine (vocab 256, width 8, 2 layers) needs."""
  base = dict(k=4, value_dtype="float16", vocab_size=256, data_vocab_size=256, seq_len=16, batch_rows=8,
              tokenizer_fingerprint="", hidden_size=8, feature_layers=lambda depth: ())
  base.update(changes)
  return Requirements(**base)


class TeacherProcess(ServerProcess):
  """``python -m teacher_server`` on a given loopback port (see `server_utils.ServerProcess`), no metrics page."""

  def __init__(self, port: int, overrides: list[str], log_path: Path, *, fake: list[str] | None = None):
    super().__init__(overrides, log_path, port=port, fake=fake, metrics=False)
