"""Device mesh and logical-axis sharding rules.

Parameters carry logical axis names (``embed``, ``mlp``, ``q_heads``...); one
rules table maps each logical name onto mesh axes. A dimension is only sharded
when its size divides the product of the mesh axes it maps to; otherwise it is
replicated (so tiny test models run on any mesh).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from pydantic import Field

from distill_core.config import ConfigBase

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None

# FSDP: shard the large weight dimension over `fsdp`; `data` replicates parameters.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "vocab": None,
    "embed": "fsdp",
    "mlp": None,
    "q_heads": None,
    "kv_heads": None,
    "head_dim": None,
    "norm": None,
    "layers": None,
}


class MeshConfig(ConfigBase):
  """How the devices are arranged."""

  data: int = Field(-1, description="Size of the data-parallel axis; -1 = all devices not used by fsdp.")
  fsdp: int = Field(1, description="Size of the fully-sharded (parameter) axis.")
  rules: dict[str, str | list[str] | None] = Field(
      default_factory=dict, description="Overrides of the logical-axis -> mesh-axis rules table.")


def environment_is_multiprocess(env: Mapping[str, str] | None = None) -> bool:
  """Whether the environment describes more than one JAX process."""
  env = os.environ if env is None else env
  return (bool(env.get("JAX_COORDINATOR_ADDRESS"))                    # explicit (GPU/CPU clusters, JobSet)
          or int(env.get("JAX_NUM_PROCESSES", "1") or 1) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", "")                # multi-host TPU slice
          or int(env.get("SLURM_NTASKS", "1") or 1) > 1)


def maybe_initialize_distributed(**kwargs) -> bool:
  """Calls `jax.distributed.initialize(**kwargs)` when a multi-process environment is present.

  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` are passed on when set (JAX only
  detects them itself on the clusters it knows); on CPU the collectives use gloo.
  """
  from jax._src import distributed as jax_distributed  # where JAX keeps its client
  if jax_distributed.global_state.client is not None:
    return True  # already initialised (a second run in the same process)
  if not environment_is_multiprocess():
    return False
  if "cpu" in os.environ.get("JAX_PLATFORMS", "").split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if os.environ.get("JAX_PROCESS_ID"):
    kwargs.setdefault("num_processes", int(os.environ["JAX_NUM_PROCESSES"]))
    kwargs.setdefault("process_id", int(os.environ["JAX_PROCESS_ID"]))
  jax.distributed.initialize(**kwargs)
  log.info("jax.distributed initialised: process %d of %d, %d local of %d devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  fsdp = cfg.fsdp
  data = cfg.data if cfg.data != -1 else n // max(fsdp, 1)
  if fsdp < 1 or data < 1 or data * fsdp > n:
    raise ValueError(f"mesh.data={cfg.data} x mesh.fsdp={cfg.fsdp} does not fit the {n} available devices")
  if data * fsdp < n:
    if jax.process_count() > 1:
      raise ValueError(f"mesh.data x mesh.fsdp = {data * fsdp} must use all {n} devices of a multi-process run")
    log.warning("mesh uses %d of %d devices", data * fsdp, n)
  return Mesh(np.asarray(devices[:data * fsdp]).reshape(data, fsdp), ("data", "fsdp"))


def rules_table(cfg: MeshConfig) -> dict[str, MeshAxes]:
  rules = dict(DEFAULT_RULES)
  for key, value in cfg.rules.items():
    rules[key] = tuple(value) if isinstance(value, list) else value
  return rules


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], rules: Mapping[str, MeshAxes],
                    mesh: Mesh) -> PartitionSpec:
  """Maps logical dimension names to a PartitionSpec, replicating non-divisible dimensions."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    if name is not None and name not in rules:
      raise KeyError(f"no sharding rule for logical axis {name!r} (known: {sorted(rules)})")
    axes = rules.get(name) if name is not None else None
    flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    if not flat or dim % _axis_size(mesh, axes) or used & set(flat):
      spec.append(None)
      continue
    used |= set(flat)
    spec.append(axes)
  return PartitionSpec(*spec)


def _names_of(var: nnx.Variable) -> tuple[str | None, ...] | None:
  meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
  for key in ("out_sharding", "sharding_names", "sharding"):  # the name differs across flax versions
    names = meta.get(key)
    if names is not None:
      return tuple(names)
  return None


def state_shardings(state: Any, mesh: Mesh, rules: Mapping[str, MeshAxes]) -> Any:
  """NamedShardings for an nnx.State (or abstract state) from the variables' logical axis names."""

  def one(x):
    value = x.get_value() if isinstance(x, nnx.Variable) else x
    shape = getattr(value, "shape", ())
    names = _names_of(x) if isinstance(x, nnx.Variable) else None
    if names is None or len(names) != len(shape):
      spec = PartitionSpec()
    else:
      spec = logical_to_spec(names, shape, rules, mesh)
    sharding = NamedSharding(mesh, spec)
    return x.replace(sharding) if isinstance(x, nnx.Variable) else sharding

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Batches are split along B over both mesh axes (fsdp devices also take distinct examples)."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree of [B, ...] arrays onto the mesh, split along B."""

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

  return jax.tree.map(put, tree)
