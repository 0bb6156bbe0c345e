"""Device mesh and logical-axis sharding rules.

The mesh has three axes, ``(data, fsdp, tensor)``:

* ``data``: replicas of the parameters, each taking other rows of the batch;
* ``fsdp``: parameters split along their ``embed`` dimension (gathered per layer
  when used) while every device still takes other rows of the batch;
* ``tensor``: attention heads, the MLP width and the vocabulary split across
  devices (Megatron-style), so one layer's weights span several chips; the
  devices of one tensor group see the same rows.

Parameters carry logical axis names (``embed``, ``mlp``, ``q_heads``...); one
rules table maps each logical name onto mesh axes. A dimension is only sharded
when its size divides the product of the mesh axes it maps to; otherwise it is
replicated (so tiny test models run on any mesh, and 8 kv heads stay whole on a
16-way tensor axis).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax._src import distributed as jax_distributed  # where JAX keeps its client
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from pydantic import Field

from distill_core.config import ConfigBase

log = logging.getLogger(__name__)

MeshAxes = str | tuple[str, ...] | None

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over these; `tensor` groups share rows

# `embed` over `fsdp`; heads, MLP width and vocabulary over `tensor`; `data` replicates.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "layers": None,
}


class MeshConfig(ConfigBase):
  """How the devices are arranged: data x fsdp x tensor (see the module docstring)."""

  data: int = Field(-1, ge=-1, description="Size of the data-parallel axis; -1 = all devices not used by the "
                    "other axes.")
  fsdp: int = Field(1, ge=-1, description="Size of the fully-sharded (parameter) axis; -1 = all devices not "
                    "used by the other axes (FSDP over every chip: set data: 1).")
  tensor: int = Field(1, ge=1, description="Size of the tensor-parallel axis (heads, MLP width and vocabulary "
                      "split across its devices); use it when one copy of a layer's weights must span chips.")
  rules: dict[str, str | list[str] | None] = Field(
      default_factory=dict, description="Overrides of the logical-axis -> mesh-axis rules table.")
  device_memory_bytes: int | None = Field(
      None, gt=0, description="Memory per device that every compiled program must fit in, checked before the "
      "first batch (distill_core.memory); None = the device's own limit where it reports one "
      "(memory_stats bytes_limit), else unchecked.")

  def sizes(self, n: int) -> dict[str, int]:
    """{axis: size} on `n` devices, the one -1 axis filled in; raises ValueError when they do not fit."""
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    free = [a for a, v in sizes.items() if v == -1]
    if len(free) > 1:
      raise ValueError(f"mesh: only one of data, fsdp may be -1 (got data={self.data}, fsdp={self.fsdp})")
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
      sizes[free[0]] = n // fixed
    if min(sizes.values()) < 1 or int(np.prod(list(sizes.values()))) > n:
      raise ValueError(f"mesh.data={self.data} x mesh.fsdp={self.fsdp} x mesh.tensor={self.tensor} does not fit "
                       f"the {n} available devices")
    return sizes


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
  """The (data, fsdp, tensor) mesh over `devices` (default: all; or a TPU topology's compile-only devices).

  On TPU the devices are laid out by `mesh_utils.create_device_mesh`, so the
  innermost axis (`tensor`) lies along physically neighbouring chips.
  """
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  sizes = cfg.sizes(n)
  shape = tuple(sizes[a] for a in MESH_AXES)
  used = int(np.prod(shape))
  if used < n:
    if jax.process_count() > 1:
      raise ValueError(f"mesh.data x mesh.fsdp x mesh.tensor = {used} must use all {n} devices of a "
                       "multi-process run")
    log.warning("mesh uses %d of %d devices", used, n)
  devices = devices[:used]
  if devices[0].platform == "tpu" and used == n:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def traced_on(mesh: Mesh | None, fn: Callable) -> Callable:
  """`fn`, traced with `mesh` as the abstract mesh: kernels that read it (`model.attention: auto`
  choosing by the mesh's platform, splash attention's shard_map over the batch axes) build for
  the mesh, also when the program is compiled ahead for a TPU topology on another host. Only the
  tracing sees it: model construction keeps its own sharding rules."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return wrapped


def batch_parallelism(mesh: Mesh) -> int:
  """Devices taking distinct rows of a batch (data x fsdp): a batch's B must divide by it."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


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
  """Batches are split along B over data and fsdp (fsdp devices also take distinct examples)."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Places a host pytree of [B, ...] arrays onto the mesh, split along B."""

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

  return jax.tree.map(put, tree)
