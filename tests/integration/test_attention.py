"""The splash attention kernel compiled ahead of time for a TPU topology, in a child process (libtpu's compiler
on this CPU host); the kernels' numerics are in tests/unit/test_attention.py."""

import importlib.util
import os
import subprocess
import sys

import pytest

# --- ahead-of-time compilation for a TPU topology (libtpu's compiler on this CPU host) ---------------------

TPU_COMPILE = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from distill_core.model.attention import attend
mesh = Mesh(np.asarray(topologies.get_topology_desc("v5e:2x2", "tpu").devices).reshape(4, 1), ("data", "fsdp"))
batch = lambda nd: NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *[None] * (nd - 1)))
b, t, h, kv, d = 4, 1024, 4, 2, 128
args = [jax.ShapeDtypeStruct(s, dt, sharding=batch(len(s))) for s, dt in
        [((b, t, h, d), jnp.bfloat16), ((b, t, kv, d), jnp.bfloat16), ((b, t, kv, d), jnp.bfloat16),
         ((b, t), jnp.int32)]]
loss = lambda q, k, v, s: jnp.sum(attend(q, k, v, s, impl="auto").astype(jnp.float32))
with jax.set_mesh(mesh):  # `auto` reads the platform from the mesh: splash, though this host is a CPU
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
print("MOSAIC", hlo.count("tpu_custom_call"), "ALLGATHER", hlo.count("all-gather"))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_splash_compiles_for_a_tpu_topology_as_mosaic_kernels_sharded_over_the_batch(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
         "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", TPU_COMPILE], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Forward, dq and dkv kernels, all per device: the batch-sharded shard_map needs no gathers.
  assert "MOSAIC 3 ALLGATHER 0" in proc.stdout, proc.stdout
