"""Per-device memory of compiled programs, and the check that stops a start which would not fit.

XLA knows, once a program is compiled for its devices, how many bytes each
device allocates: the arguments it holds (parameters, optimizer state, the
batch), the outputs, and the temporaries of the program's peak. The teacher
server (at warm-up), the trainer (before its first step) and
`benchmarks.bench_scale` (for TPU topologies it does not have, through
`jax.experimental.topologies`) all read it here, compare it with the device's
memory and phrase the verdict the same way.

Peak bytes per device = arguments + outputs - aliased (donated buffers reused
for outputs) + temporaries. The device's own limit comes from
`device.memory_stats()["bytes_limit"]` where the runtime reports one (TPU,
GPU), from a configured `mesh.device_memory_bytes`, or, for compile-only TPU
devices, from the chip's nominal HBM in `TPU_CHIPS`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: HBM per chip and peak dense bf16 FLOP/s per chip."""

  name: str
  hbm_bytes: int
  peak_bf16_flops: float


# Per-chip HBM and bf16 peak from Google's Cloud TPU system-architecture pages
# (docs.cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e): v4 32 GiB, 275 TFLOP/s; v5e 16 GiB,
# 197 TFLOP/s; v5p 95 GiB, 459 TFLOP/s; v6e (Trillium) 32 GiB, 918 TFLOP/s. The runtime keeps a
# little of it for itself (a v5e reports a bytes_limit of 15.75 GiB), so a program within a few
# hundred MiB of the nominal figure is marginal.
TPU_CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", 32 * GIB, 275e12),
    "v5e": Chip("v5e", 16 * GIB, 197e12),
    "v5p": Chip("v5p", 95 * GIB, 459e12),
    "v6e": Chip("v6e", 32 * GIB, 918e12),
}
# `device.device_kind` of each generation as libtpu names it.
TPU_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p",
                    "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
# Dense bf16 peak of the GPUs an MFU may be reported on (NVIDIA H100/H200 SXM datasheets: 989 TFLOP/s).
GPU_PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def chip_of(device: Any) -> Chip | None:
  """The TPU generation of a device (real or compile-only), or None for another kind."""
  name = TPU_DEVICE_KINDS.get(getattr(device, "device_kind", ""))
  return TPU_CHIPS.get(name) if name else None


def peak_flops(device: Any) -> float | None:
  """Dense bf16 peak FLOP/s of one device where known (TPU generations, H100/H200), else None."""
  chip = chip_of(device)
  if chip is not None:
    return chip.peak_bf16_flops
  kind = getattr(device, "device_kind", "")
  return next((peak for name, peak in GPU_PEAK_BF16_FLOPS.items() if name in kind), None)


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """Bytes one device allocates for one compiled program (`compiled.memory_analysis()`)."""

  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int = 0

  @classmethod
  def of(cls, name: str, compiled: Any) -> "ProgramMemory":
    stats = compiled.memory_analysis()
    if stats is None:
      raise ValueError(f"{name}: this backend reports no memory analysis")
    return cls(name, int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
               int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes),
               int(stats.generated_code_size_in_bytes))

  @property
  def total_bytes(self) -> int:
    """Peak per device: arguments + outputs - aliased + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  def summary(self) -> str:
    return (f"{gib(self.total_bytes)} per device (arguments {gib(self.argument_bytes)}, temporaries "
            f"{gib(self.temp_bytes)}, outputs {gib(self.output_bytes - self.alias_bytes)} not aliased)")


_COMPILER_OOM = re.compile(r"HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)")


def compile_or_estimate(name: str, lowered: Any) -> tuple[Any | None, ProgramMemory]:
  """(compiled program or None, its memory): the TPU compiler refuses a program whose temporaries exceed
  the chip's HBM; its message's figure (GiB, two decimals) then stands for the temporaries, beside the
  arguments' per-device bytes computed from their shardings (outputs unknown, counted as 0)."""
  try:
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - jax.errors.JaxRuntimeError; anything else is re-raised below
    match = _COMPILER_OOM.search(str(e))
    if match is None:
      raise
    return None, ProgramMemory(name, argument_bytes(lowered), 0, 0, int(float(match[1]) * GIB))
  return compiled, ProgramMemory.of(name, compiled)


def argument_bytes(lowered: Any) -> int:
  """Bytes one device holds of a lowered program's arguments (largest shard of each, unpadded)."""
  args = lowered._lowering.compile_args  # noqa: SLF001 - no public accessor of the kept arguments' shardings
  avals, shardings = args["global_in_avals"], args["in_shardings"]  # unused arguments already pruned
  if len(avals) != len(shardings):
    raise ValueError(f"{len(avals)} arguments but {len(shardings)} shardings")
  total = 0
  for aval, sharding in zip(avals, shardings):
    shape = sharding.shard_shape(aval.shape) if hasattr(sharding, "shard_shape") else aval.shape
    total += math.prod(shape) * aval.dtype.itemsize
  return total


class MemoryBudgetError(ValueError):
  """A compiled program needs more memory per device than the device has."""


def gib(n: float) -> str:
  return f"{n / GIB:.2f} GiB"


def device_budget(device: Any, configured: int | None = None) -> tuple[int | None, str]:
  """(bytes one device may allocate, where that figure comes from); (None, reason) when unknown."""
  if configured is not None:
    return int(configured), "mesh.device_memory_bytes"
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001 - compile-only devices and some backends refuse
    stats = None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} bytes_limit"
  chip = chip_of(device)
  if chip is not None:
    return chip.hbm_bytes, f"{chip.name} HBM"
  return None, f"{getattr(device, 'platform', '?')} reports no memory limit"


def check_fits(programs: Iterable[ProgramMemory], budget: int | None, *, where: str, knobs: str,
               source: str = "") -> None:
  """Raises MemoryBudgetError, one line naming the largest program over `budget`, the bytes and `knobs`."""
  if budget is None:
    return
  over = [p for p in programs if p.total_bytes > budget]
  if not over:
    return
  worst = max(over, key=lambda p: p.total_bytes)
  others = f" ({len(over) - 1} more programs also do not fit)" if len(over) > 1 else ""
  raise MemoryBudgetError(
      f"{where} {worst.name} needs {worst.summary()} but {gib(budget)} is available"
      f"{f' ({source})' if source else ''}{others}; would help: {knobs}")


# What would shrink each side's programs; the knobs the configs have, named as set on the command line.
ENGINE_KNOBS = ("a smaller bucket (batcher.buckets), fewer limits.selectable_layers, 0 for the limits of target "
                "parts not needed (e.g. the draws of sampled targets: their programs are not compiled), "
                "model.overrides.attention: chunked/splash, or more chips (mesh.tensor / mesh.fsdp)")
TRAINER_KNOBS = ("a smaller per-chip batch (data.batch_size) or more optim.grad_accum, model.remat, "
                 "model.attention: chunked/splash, a smaller loss.top_k, or more chips (mesh.fsdp: -1)")


def compiled_programs_fit(compiled: Iterable[tuple[str, Any]], device: Any, configured: int | None, *, where: str,
                          knobs: str) -> list[ProgramMemory]:
  """Memory of each (name, compiled program); raises MemoryBudgetError where one exceeds the device's budget."""
  budget, source = device_budget(device, configured)
  measured = [ProgramMemory.of(name, c) for name, c in compiled]
  check_fits(measured, budget, where=where, knobs=knobs, source=source)
  return measured
