"""Memory of compiled programs, the fit check, and bench_scale's path (the start-up check that stops a server
or trainer that would not fit runs them as processes in tests/integration/test_scale.py)."""

from __future__ import annotations

import importlib.util
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_core import memory
from distill_core.sharding import MeshConfig

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def test_program_memory_reads_the_compilers_bytes():
  a, b = np.zeros((64, 32), np.float32), np.zeros((32, 16), np.float32)
  compiled = jax.jit(lambda x, y: jnp.tanh(x @ y)).lower(a, b).compile()
  program = memory.ProgramMemory.of("matmul", compiled)
  assert program.argument_bytes == a.nbytes + b.nbytes  # CPU buffers are unpadded
  assert program.output_bytes == 64 * 16 * 4
  assert program.total_bytes == program.argument_bytes + program.output_bytes + program.temp_bytes


def test_argument_bytes_from_shardings_match_the_compiler():
  """The per-device argument bytes counted from shardings (used when the TPU compiler refuses a program)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.array(jax.devices()[:4]), ("x",))
  split = jax.ShapeDtypeStruct((8, 4), np.float32, sharding=NamedSharding(mesh, PartitionSpec("x")))
  whole = jax.ShapeDtypeStruct((3,), np.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  lowered = jax.jit(lambda a, unused, c: a.sum() + c.sum()).lower(split, whole, whole)
  assert memory.argument_bytes(lowered) == 2 * 4 * 4 + 3 * 4  # a's shard and c; the unused argument is pruned
  assert memory.argument_bytes(lowered) == lowered.compile().memory_analysis().argument_size_in_bytes


def test_check_fits_is_one_line_naming_the_program_the_bytes_and_the_knobs():
  gib = memory.GIB
  small = memory.ProgramMemory("8x1024", 2 * gib, 0, 0, 3 * gib)
  big = memory.ProgramMemory("8x4096", 2 * gib, gib // 2, 0, 16 * gib)
  memory.check_fits([small], 16 * gib, where="bucket", knobs="k")  # fits: nothing raised
  memory.check_fits([big], None, where="bucket", knobs="k")  # no budget known: unchecked
  with pytest.raises(memory.MemoryBudgetError) as e:
    memory.check_fits([small, big], 15.75 * gib, where="teacher engine bucket", knobs=memory.ENGINE_KNOBS,
                      source="v5e HBM")
  text = str(e.value)
  assert "\n" not in text
  assert text.startswith("teacher engine bucket 8x4096 needs 18.50 GiB per device (arguments 2.00 GiB, "
                         "temporaries 16.00 GiB")
  assert "but 15.75 GiB is available (v5e HBM)" in text and "a smaller bucket" in text and "attention" in text


def test_device_budget_prefers_configured_then_runtime_then_nominal_hbm():
  runtime = types.SimpleNamespace(device_kind="NVIDIA H100", platform="gpu",
                                  memory_stats=lambda: {"bytes_limit": 80 * 10**9})
  assert memory.device_budget(runtime, 123) == (123, "mesh.device_memory_bytes")
  assert memory.device_budget(runtime) == (80 * 10**9, "NVIDIA H100 bytes_limit")

  def refuse():
    raise RuntimeError("MemoryStats is only supported for addressable PjRt devices.")

  compile_only = types.SimpleNamespace(device_kind="TPU v5 lite", platform="tpu", memory_stats=refuse)
  assert memory.device_budget(compile_only) == (16 * memory.GIB, "v5e HBM")
  assert memory.device_budget(jax.devices("cpu")[0])[0] is None
  assert memory.peak_flops(compile_only) == 197e12 and memory.peak_flops(runtime) == 989e12


def test_analytic_flops_by_hand():
  from benchmarks.bench_scale import analytic_flops_per_token, model_config
  cfg = model_config("tiny", {})  # E 32, H 4, KV 2, D 8, I 64, L 2, V 384
  per_layer = 32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32 + 3 * 32 * 64  # 9216 matmul weights
  forward = 2 * (2 * per_layer + 4 * 64 * 4 * 8) + 2 * 32 * 384  # layers + attention at T=64 + head
  assert analytic_flops_per_token(cfg, 64, train=False, remat=False) == forward == 77824
  assert analytic_flops_per_token(cfg, 64, train=True, remat=False) == 3 * forward
  assert analytic_flops_per_token(cfg, 64, train=True, remat=True) == 3 * forward + forward - 2 * 32 * 384


def test_flops_from_two_depths_equal_the_full_depths_count():
  """XLA counts a loop body once; the count extrapolated from 1 and 2 unrolled layers equals a direct
  compile of 3 unrolled layers (CPU compiler, so no libtpu needed)."""
  from benchmarks.bench_scale import _depth_flops, _flops, model_config, teacher_programs
  cfg = model_config("tiny", {"num_hidden_layers": 3})
  devices = jax.devices()[:1]

  def lowered(c, devs):
    [(_, low)] = teacher_programs(c, devs, [(2, 32)], {"data": 1, "fsdp": 1, "tensor": 1}, 8)
    return low, 2 * 32, len(devs)

  extrapolated, _, exact = _depth_flops(lowered, cfg, 1.0, devices)
  direct = _flops(lowered(cfg.model_copy(update={"scan_layers": False}), devices)[0].compile()) / (2 * 32)
  assert exact and extrapolated == pytest.approx(direct, rel=1e-6)


def test_engine_programs_compile_from_abstract_weights_and_stop_over_budget():
  from distill_core import checkpoints
  from distill_core.config import build, resolve_preset
  from distill_core.model.config import ModelConfig
  from teacher_server.engine import JaxEngine
  cfg = build(ModelConfig, resolve_preset("tiny"))
  engine = JaxEngine(checkpoints.abstract_model(cfg), buckets=[(4, 32), (4, 64)], max_k=8, max_temperatures=1,
                     selectable_layers=[1], state_names=["attn_out"], devices=jax.devices()[:4],
                     mesh=MeshConfig(data=1, fsdp=2, tensor=2, device_memory_bytes=4096))
  names = [name for name, _ in engine.programs()]
  assert sorted(names) == ["4x32", "4x32+bfloat16", "4x32+float32", "4x64", "4x64+bfloat16", "4x64+float32"]
  with pytest.raises(memory.MemoryBudgetError, match=r"^teacher engine bucket 4x64\S* needs .* but 0.00 GiB is "
                                                      r"available \(mesh.device_memory_bytes\) \(5 more"):
    engine.check_memory()


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler")
def test_bench_scale_compiles_a_tiny_model_for_a_tpu_topology(tmp_path, monkeypatch, capsys, root_logging):
  """The benchmark's own path, end to end at tiny size on a v5e 2x2 topology (compile only)."""
  from benchmarks import bench_scale
  monkeypatch.setenv("DISTILL_BENCH_RESULTS", str(tmp_path / "results.json"))
  assert bench_scale.main(["--teacher", "tiny@v5e:2x2@4x64", "--student", "tiny@v5e:2x2@2x64",
                           "--details", str(tmp_path / "scale.json"), "--model", "no_such_field=1"]) == 0
  # Its log lines are a command's (setup_logging): timestamped, its own INFO lines shown.
  err = capsys.readouterr().err
  assert re.search(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO benchmarks.bench_scale: compiling teacher", err, re.M), err
  assert "WARNING benchmarks.bench_scale: model.no_such_field: not a field" in err, err
  results = json.loads((tmp_path / "results.json").read_text())
  details = json.loads((tmp_path / "scale.json").read_text())
  assert details["skipped_fields"] == ["model.no_such_field"]
  teacher, student = details["rows"]
  assert teacher["topology"] == student["topology"] == "v5e:2x2" and teacher["chips"] == 4
  assert teacher["fits"] and student["fits"] and teacher["hbm_gib"] == 16
  # Arguments hold at least this chip's shard of the weights (tiny: 58k f32 parameters over 4 chips).
  from benchmarks.bench_scale import model_config, param_count
  assert teacher["argument_gib"] * memory.GIB >= param_count(model_config("tiny", {})) * 4 / 4
  # Tiny width: norms, softmax and top-k add to the matmuls, but not by a factor of two.
  assert 0.9 < results["scale_engine_flops_ratio"]["value"] < 2
  assert 0.9 < results["scale_student_flops_ratio"]["value"] < 2
  assert results["scale_teacher_tiny_v5e4_gib"]["value"] == pytest.approx(teacher["total_gib"])
  assert results["scale_student_tiny_v5e4_hbm_fraction"]["value"] == pytest.approx(student["total_gib"] / 16)


def test_accelerator_measurements_run_on_the_local_devices():
  """The tokens/s and MFU path bench_scale takes on a GPU or TPU, here on the CPU devices (no peak: no MFU)."""
  from benchmarks.scale_device import measure_engine, measure_student
  assert measure_engine("tiny", {}, (8, 32), max_k=8, repeats=1) > 0
  tokens_per_s, mfu = measure_student("tiny", {}, 1, 32, {"top_k": 8}, repeats=1)
  assert tokens_per_s > 0 and mfu is None  # CPU: no peak FLOP/s known
