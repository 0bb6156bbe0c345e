"""Teacher parameters for learn-to-init: from a local HF or Orbax checkpoint, or the teacher server.

Every source names parameters by their unrolled paths
(`layers.3.self_attn.q_proj.kernel`, as `GetParameters` names them for an
unrolled teacher), knows their shapes before reading any bytes (so the surgery
plan can be checked and printed first), and fetches only what the plan uses.
`record()` is the JSON stored with the student's checkpoints: it says where
the kernels came from, so a restore fetches them again from there, and the
trainer checks them against the recorded kernel fingerprint.

The remote source checks the server's weights fingerprint before the download
and on every reconnect (a replica with other weights is refused), and resumes
an interrupted download where its bytes end (`ParameterDownload`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from distill_core.checkpoints import load_model_orbax
from distill_core.client import ParameterDownload, TeacherError
from distill_core.model.hf import CONFIG_FILE, config_from_hf, hf_parameter_shapes, read_hf_parameters

log = logging.getLogger(__name__)

_STACKED = re.compile(r"^layers\.(?!\d+\.)")  # a scanned teacher's names: layers.self_attn... (L, ...)


class TeacherParams:
  """Base: `shapes` {unrolled name: shape}, `num_layers`, `fetch(names)`, `record()`."""

  shapes: dict[str, tuple[int, ...]]
  num_layers: int

  def fetch(self, names: list[str]) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def record(self) -> dict[str, Any]:
    raise NotImplementedError


def _num_layers(shapes: dict[str, tuple[int, ...]]) -> int:
  ids = {int(m.group(1)) for name in shapes if (m := re.match(r"layers\.(\d+)\.", name))}
  return max(ids) + 1 if ids else 0


class HFTeacherParams(TeacherParams):
  """A Hugging Face checkpoint directory; only the requested tensors are read."""

  def __init__(self, path: str | Path):
    self.path = str(Path(path).resolve())
    config = Path(self.path) / CONFIG_FILE
    if not config.is_file():
      raise FileNotFoundError(f"lti.kernels_path {path}: no {CONFIG_FILE} (not a Hugging Face checkpoint)")
    self.cfg = config_from_hf(json.loads(config.read_text()))
    self.shapes = hf_parameter_shapes(self.cfg)
    self.num_layers = self.cfg.num_hidden_layers

  def fetch(self, names: list[str]) -> dict[str, np.ndarray]:
    return read_hf_parameters(self.path, names)

  def record(self) -> dict[str, Any]:
    return {"kernels_from": "hf", "kernels_path": self.path}


class OrbaxTeacherParams(TeacherParams):
  """An Orbax model directory (`save_model_orbax`), restored once in the unrolled layout."""

  def __init__(self, path: str | Path):
    self.path = str(Path(path).resolve())
    model = load_model_orbax(self.path, scan_layers=False)
    self._values = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    self.shapes = {name: tuple(v.shape) for name, v in self._values.items()}
    self.num_layers = model.cfg.num_hidden_layers

  def fetch(self, names: list[str]) -> dict[str, np.ndarray]:
    return {name: np.asarray(self._values[name]) for name in names}

  def record(self) -> dict[str, Any]:
    return {"kernels_from": "orbax", "kernels_path": self.path}


class RemoteTeacherParams(TeacherParams):
  """The teacher server's GetParameters, checked against its weights fingerprint, resumable.

  Args:
    cfg: the run's `teacher.remote` section (address, credentials, timeouts, backoff).
    expected_fingerprint: refuse a server whose weights fingerprint differs (a restore).
    attempts: failed calls tolerated (each resumes where the bytes end) before giving up.
  """

  def __init__(self, cfg, *, expected_fingerprint: str | None = None, attempts: int = 8,
               chunk_bytes: int = 0, token_file: str | None = None):
    self.cfg = cfg
    self.token_file = token_file or cfg.token_file
    self.last_download = None
    self.address = cfg.addresses[0]
    self.attempts = attempts
    self.chunk_bytes = chunk_bytes
    self.weights_fingerprint = expected_fingerprint
    self.calls = 0  # GetParameters calls made (tests count the resumes)
    listing = self._run(self._list())
    self._stacked = any(_STACKED.match(n) for n in listing)
    self.shapes = {}
    self.num_layers = _num_layers(listing)
    for name, (_, shape) in listing.items():
      if self._stacked and _STACKED.match(name):
        self.num_layers = shape[0]
        for i in range(shape[0]):
          self.shapes[name.replace("layers.", f"layers.{i}.", 1)] = tuple(shape[1:])
      else:
        self.shapes[name] = tuple(shape)

  def _client(self):
    cfg = self.cfg
    if self.token_file != cfg.token_file:  # a separate GetParameters token replaces teacher.remote's
      cfg = cfg.model_copy(update={"token": None, "token_file": self.token_file})
    return cfg.make_client(self.address)

  @staticmethod
  def _run(coro):
    return asyncio.run(coro)

  async def _check_fingerprint(self, client) -> None:
    info = await client.info(timeout=self.cfg.connect_timeout_s)
    if self.weights_fingerprint is None:
      self.weights_fingerprint = info.weights_fingerprint
      log.info("teacher %s: weights fingerprint %s", self.address, info.weights_fingerprint[:16])
    elif info.weights_fingerprint != self.weights_fingerprint:
      raise ValueError(f"teacher {self.address} serves weights {info.weights_fingerprint[:16]}..., expected "
                       f"{self.weights_fingerprint[:16]}... (the kernels were recorded from other weights)")

  async def _retrying(self, what: str, call):
    """Runs `call(client)` with a fresh client per attempt, exponential backoff between attempts."""
    delay = self.cfg.backoff_initial_s
    for attempt in range(1, self.attempts + 1):
      async with self._client() as client:
        try:
          await self._check_fingerprint(client)
          return await call(client)
        except TeacherError as e:
          if e.code.name in ("NOT_FOUND", "INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED",
                             "UNIMPLEMENTED", "FAILED_PRECONDITION", "OUT_OF_RANGE"):
            raise ValueError(f"teacher {self.address}: {what} failed: {e}") from None
          if attempt == self.attempts:
            raise ConnectionError(f"teacher {self.address}: {what} failed {attempt} times, last: {e}") from None
          log.warning("teacher %s: %s interrupted (%s); retrying in %.1f s", self.address, what, e, delay)
      await asyncio.sleep(delay * random.uniform(0.5, 1.0))
      delay = min(2 * delay, self.cfg.backoff_max_s)

  async def _list(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    async def call(client):
      self.calls += 1
      return await client.list_parameters(".*", timeout=self.cfg.request_timeout_s)
    return await self._retrying("listing parameters", call)

  def _server_names(self, names: list[str]) -> list[str]:
    if not self._stacked:
      return sorted(set(names))
    return sorted({re.sub(r"^layers\.\d+\.", "layers.", n) for n in names})

  def fetch(self, names: list[str]) -> dict[str, np.ndarray]:
    wanted = self._server_names(names)
    arrays: dict[str, np.ndarray] = {}
    for group in _regex_groups(wanted):
      regex = "^(" + "|".join(re.escape(n) for n in group) + ")$"
      download = self.last_download = ParameterDownload()

      async def call(client, regex=regex, download=download):
        self.calls += 1
        return await client.get_parameters(regex, self.chunk_bytes, download=download)

      arrays.update(self._run(self._retrying(f"GetParameters ({len(group)} tensors)", call)))
    out = {}
    for name in names:
      if self._stacked and (m := re.match(r"^layers\.(\d+)\.(.*)$", name)):
        out[name] = arrays[f"layers.{m.group(2)}"][int(m.group(1))]
      else:
        out[name] = arrays[name]
    return out

  def record(self) -> dict[str, Any]:
    return {"kernels_from": "remote", "address": self.address, "weights_fingerprint": self.weights_fingerprint}


def _regex_groups(names: list[str], limit: int = 1000) -> list[list[str]]:
  """Names split so each `^(a|b|...)$` stays under the server's 1024-character pattern limit."""
  groups, current, size = [], [], 4
  for name in names:
    cost = len(re.escape(name)) + 1
    if current and size + cost > limit:
      groups.append(current)
      current, size = [], 4
    current.append(name)
    size += cost
  return groups + ([current] if current else [])


def open_teacher(lti_cfg, remote_cfg, expected: dict[str, Any] | None = None) -> TeacherParams:
  """The teacher-parameter source the config names (`expected`: a recorded source to match)."""
  if lti_cfg.kernels_from == "hf":
    return HFTeacherParams(lti_cfg.kernels_path)
  if lti_cfg.kernels_from == "orbax":
    return OrbaxTeacherParams(lti_cfg.kernels_path)
  fingerprint = (expected or {}).get("weights_fingerprint")
  return RemoteTeacherParams(remote_cfg, expected_fingerprint=fingerprint, token_file=lti_cfg.parameters_token_file)
