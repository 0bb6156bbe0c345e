"""Per-chip memory and FLOPs of the real programs, compiled ahead for TPU slices this machine does not have.

    python -m benchmarks.bench_scale                         # the default cases below
    python -m benchmarks.bench_scale --teacher llama3_8b@v5e:2x4@8x4096+8x2048 --student none
    python -m benchmarks.bench_scale --model attention=splash --model remat=full   # once those knobs exist

With `libtpu` installed (`pip install -e '.[tpu]'`), `jax.experimental.topologies`
gives compile-only TPU devices of any topology, and the real TPU compiler
builds, on this CPU machine, the very programs the slice would run:

* teacher: every bucket of the engine, through `JaxEngine.programs()` (the same
  jitted forward + top-k + logsumexp the server runs), over abstract weights;
* student: `make_train_step` with the project's sharding rules, a per-chip batch,
  `grad_accum` and a loss config, over the abstract (model, optimizer) state.

For each it records per-chip bytes (`distill_core.memory`) against the chip's
HBM, whether it fits, and compiled FLOPs per token against the analytic count.
XLA's cost analysis counts a loop body once, so the FLOPs come from two extra
compiles of the same program with 1 and 2 unrolled layers (the count is linear
in depth) and grad_accum 1, built loop-free: dense (`xla`) attention, the
engine's logits and the student's fused loss unchunked (a chunked kernel's loop
would be counted once, a Pallas kernel not at all; the arithmetic is the same,
and dense attention computes the full T x T scores the analytic count assumes).
A loop still left inside a layer makes `flops_exact` false.

On a real accelerator (`jax.devices()[0].platform` gpu or tpu) the same cases
are also run on the local devices: engine tokens/s and the train step's model
FLOPs utilisation, recorded with the accelerator's name.

Model fields are read generically: `--model KEY=VALUE` (and `--attention`,
`--remat`) apply only where `ModelConfig` has that field, and `--loss KEY=VALUE`
where `LossConfig` has it; a field this code does not have yet is reported as
skipped, so the benchmark runs before and after such knobs exist.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import yaml
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks.results import git_commit, invocation, machine, record
from benchmarks.scale_device import measure_engine, measure_student
from benchmarks.scale_model import analytic_flops_per_token, is_remat, model_config, param_count, remat_override
from distill_core import checkpoints, memory
from distill_core.data import Batch
from distill_core.logs import add_log_level_argument, setup_logging
from distill_core.model.config import ModelConfig
from distill_core.sharding import MeshConfig, batch_parallelism, batch_sharding, make_mesh, rules_table
from distill_core.targets import TeacherTargets
from student_trainer.config import TrainConfig
from student_trainer.losses import LossConfig
from student_trainer.state import abstract_train_state
from student_trainer.step import make_train_step
from teacher_server.engine import DEFAULT_CHUNK_SIZE, JaxEngine

log = logging.getLogger(__name__)

DEFAULT_TEACHERS = ("llama3_8b@v5e:2x4@8x4096", "llama3_1_70b@search@16x4096@tensor=4,fsdp=-1")
DEFAULT_STUDENTS = ("llama3_2_1b@v5e:2x4@4x4096", "qwen2_5_0_5b@v5e:2x4@8x4096")
# Where `search` looks for the smallest slice that holds a program: fewest chips first, then least HBM.
SEARCH_TOPOLOGIES = ("v5e:2x2", "v6e:2x2", "v5p:2x2x1", "v5e:2x4", "v6e:2x4", "v5p:2x2x2", "v5e:4x4", "v6e:4x4",
                     "v5p:2x2x4", "v5e:4x8", "v6e:4x8", "v5p:2x4x4", "v5e:8x8", "v6e:8x8", "v5p:4x4x4")
DETAILS = Path(__file__).resolve().parent / "results" / "scale.json"


@dataclasses.dataclass
class Case:
  """One program family to compile: a teacher's buckets or a student's train step."""

  side: str  # "teacher" | "student"
  preset: str
  topology: str  # "v5e:2x4", or "search"
  shapes: list[tuple[int, int]]  # teacher: global buckets (B, T); student: [(per-chip sequences, T)]
  mesh: dict[str, int]

  @classmethod
  def parse(cls, side: str, spec: str) -> "Case":
    parts = spec.split("@")
    if len(parts) not in (3, 4) or not all(parts[:3]):
      raise ValueError(f"--{side} {spec!r}: expected PRESET@TOPOLOGY@BxT[+BxT...][@AXIS=N,...]")
    shapes = []
    for item in parts[2].split("+"):
      m = re.fullmatch(r"(\d+)x(\d+)", item)
      if not m:
        raise ValueError(f"--{side} {spec!r}: shape {item!r} is not BxT")
      shapes.append((int(m[1]), int(m[2])))
    mesh = {"data": 1, "fsdp": -1, "tensor": 1}
    for item in (parts[3].split(",") if len(parts) == 4 and parts[3] else []):
      axis, _, value = item.partition("=")
      if axis not in mesh or not re.fullmatch(r"-?\d+", value):
        raise ValueError(f"--{side} {spec!r}: mesh item {item!r} is not data|fsdp|tensor=N")
      mesh[axis] = int(value)
    if side == "student" and len(shapes) != 1:
      raise ValueError(f"--student {spec!r}: one per-chip shape (sequences x length)")
    return cls(side, parts[0], parts[1], shapes, mesh)

  @property
  def label(self) -> str:
    return f"{self.side} {self.preset}"


# ---------------------------------------------------------------- config overrides


def generic_overrides(cls, pairs: list[str], what: str) -> tuple[dict[str, Any], list[str]]:
  """{field: value} of `KEY=VALUE` pairs that `cls` has (values parsed as YAML), and the skipped keys."""
  kept, skipped = {}, []
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep:
      raise ValueError(f"--{what} {pair!r}: expected KEY=VALUE")
    if key in cls.model_fields:
      kept[key] = yaml.safe_load(value)
    else:
      skipped.append(f"{what}.{key}")
  return kept, skipped


# ---------------------------------------------------------------- compile


def topology_devices(name: str):
  """Compile-only devices of a TPU topology (`v5e:2x4`), through libtpu."""
  # Other processes on this machine may have loaded libtpu too (a JAX without JAX_PLATFORMS=cpu
  # probes for TPUs): compile-only use needs no exclusive lock on the chips.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(name, "tpu").devices)
  except Exception as e:  # noqa: BLE001 - libtpu missing or the name unknown: say which
    raise RuntimeError(f"topology {name}: {str(e).splitlines()[0][:200]} (is libtpu installed? "
                       "pip install -e '.[tpu]')") from None


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def _has_loop(compiled) -> bool:
  return " while(" in compiled.as_text()


def teacher_programs(cfg, devices, buckets, mesh: dict, max_k: int, chunk_size: int | None = None):
  """(name, lowered) of every bucket of a `JaxEngine` over abstract weights on `devices` (`chunk_size`:
  the engine's logits chunk; None: its default)."""
  engine = JaxEngine(checkpoints.abstract_model(cfg), buckets=buckets, max_k=max_k, max_temperatures=1,
                     selectable_layers=[], state_names=[], mesh=MeshConfig(**mesh), devices=devices,
                     chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size)
  return engine.programs()


def student_program(cfg, devices, per_chip: int, seq_len: int, mesh: dict, loss: dict, grad_accum: int,
                    value_dtype: str):
  """(name, lowered) of the student's `kd` train step for `per_chip` sequences per chip per micro-batch."""
  train_cfg = TrainConfig.model_validate({"model": cfg.model_dump(), "loss": loss, "mesh": mesh,
                                          "optim": {"grad_accum": grad_accum}})
  mesh_obj = make_mesh(train_cfg.mesh, devices)
  rows = per_chip * batch_parallelism(mesh_obj) * grad_accum
  state = abstract_train_state(train_cfg, mesh_obj, rules_table(train_cfg.mesh))

  def spec(shape, dtype, sharded=True):
    sharding = batch_sharding(mesh_obj, len(shape)) if sharded else NamedSharding(mesh_obj, PartitionSpec())
    return jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=sharding)

  bt = (rows, seq_len)
  batch = Batch(example_ids=spec((rows,), "int32"), tokens=spec(bt, "int32"), segment_ids=spec(bt, "int32"),
                positions=spec(bt, "int32"), targets=spec(bt, "int32"), loss_mask=spec(bt, "float32"))
  k = train_cfg.loss.top_k
  targets = TeacherTargets(topk_ids=spec((*bt, k), "int32"), topk_logits=spec((*bt, k), value_dtype),
                           logsumexp=spec((*bt, 1), "float32"), temperatures=spec((1,), "float32", sharded=False))
  hyper = {name: spec((), "float32", sharded=False) for name in ("alpha", "beta", "temperature")}
  step = make_train_step(state.graphdef, train_cfg, "kd", state.shardings, mesh_obj)
  name = f"{per_chip}x{seq_len} per chip x {mesh_obj.devices.size} chips, grad_accum {grad_accum}"
  return name, step.lower(state.params, batch, targets, hyper), rows * seq_len


@dataclasses.dataclass
class Row:
  """One compiled program's figures."""

  side: str
  preset: str
  topology: str
  chips: int
  mesh: str
  program: str
  tokens: int
  argument_gib: float
  temp_gib: float
  total_gib: float
  hbm_gib: float
  fits: bool
  refused: bool  # the TPU compiler refused it (temporaries over HBM): temporaries from its message
  compiled_flops_per_token: float
  analytic_flops_per_token: float
  flops_exact: bool
  compile_s: float
  skipped: list[str]

  @property
  def flops_ratio(self) -> float:
    return self.compiled_flops_per_token / self.analytic_flops_per_token


def _memory_row(case: Case, cfg, topology: str, devices, name: str, lowered, tokens: int, flops: tuple,
                skipped: list[str], seconds_before: float) -> Row:
  start = time.perf_counter()
  compiled, program = memory.compile_or_estimate(name, lowered)
  seconds = time.perf_counter() - start + seconds_before
  chip = memory.chip_of(devices[0])
  compiled_ft, analytic_ft, exact = flops
  mesh_text = ",".join(f"{a}={v}" for a, v in case.mesh.items())
  return Row(case.side, case.preset, topology, len(devices), mesh_text, name, tokens,
             program.argument_bytes / memory.GIB, program.temp_bytes / memory.GIB,
             program.total_bytes / memory.GIB, chip.hbm_bytes / memory.GIB,
             compiled is not None and program.total_bytes <= chip.hbm_bytes, compiled is None,
             compiled_ft, analytic_ft, exact, round(seconds, 1), skipped)


# A slice with as many chips and the most HBM per chip, to count the FLOPs of a program the chip at
# hand refuses (the same program; only the memory differs).
V5P_BY_CHIPS = {4: "v5p:2x2x1", 8: "v5p:2x2x2", 16: "v5p:2x2x4", 32: "v5p:2x4x4", 64: "v5p:4x4x4"}


def _depth_flops(make_lowered, cfg, analytic, devices) -> tuple[float, float, bool]:
  """(compiled, analytic FLOPs per token at cfg's depth, exact): from unrolled 1- and 2-layer compiles
  (`make_lowered(cfg, devices)`, one row per chip: a token's work does not depend on the rows beside it),
  on the v5p slice of as many chips where this chip refuses them; NaN where that refuses them too."""
  per_depth, exact = [], True
  for depth in (1, 2):
    # Loop-free: XLA's cost analysis counts a loop body once (and a Pallas kernel not at all), so the
    # count runs dense attention; the memory rows keep the configured kernel.
    update = {"num_hidden_layers": depth, "scan_layers": False}
    if "attention" in type(cfg).model_fields:
      update["attention"] = "xla"
    small = cfg.model_copy(update=update)
    lowered, tokens, chips = make_lowered(small, devices)
    compiled, _ = memory.compile_or_estimate("flops", lowered)
    if compiled is None and len(devices) in V5P_BY_CHIPS:
      lowered, tokens, chips = make_lowered(small, topology_devices(V5P_BY_CHIPS[len(devices)]))
      compiled, _ = memory.compile_or_estimate("flops", lowered)
    if compiled is None:
      log.warning("%s: even one row per chip exceeds the chip's HBM; its FLOPs are not counted", cfg.model_type)
      return float("nan"), analytic, False
    exact = exact and not _has_loop(compiled)
    per_depth.append(_flops(compiled) * chips / tokens)
  depth = cfg.num_hidden_layers
  compiled_ft = per_depth[0] + (per_depth[1] - per_depth[0]) * (depth - 1)
  return compiled_ft, analytic, exact


def run_teacher(case: Case, topology: str, args, overrides: dict, skipped: list[str]) -> list[Row]:
  cfg = model_config(case.preset, overrides)
  devices = topology_devices(topology)
  rows = []
  for b, t in case.shapes:
    start = time.perf_counter()
    [(name, lowered)] = teacher_programs(cfg, devices, [(b, t)], case.mesh, args.max_k)
    lowering_s = time.perf_counter() - start

    def small(c, devs, t=t):
      rows = batch_parallelism(make_mesh(MeshConfig(**case.mesh), devs))  # one row per data x fsdp chip
      [(_, low)] = teacher_programs(c, devs, [(rows, t)], case.mesh, args.max_k, chunk_size=0)  # loop-free
      return low, rows * t, len(devs)

    flops = _depth_flops(small, cfg, analytic_flops_per_token(cfg, t, train=False, remat=False), devices)
    rows.append(_memory_row(case, cfg, topology, devices, name, lowered, b * t, flops, skipped, lowering_s))
  return rows


def run_student(case: Case, topology: str, args, overrides: dict, loss: dict, skipped: list[str]) -> list[Row]:
  cfg = model_config(case.preset, overrides)
  devices = topology_devices(topology)
  per_chip, t = case.shapes[0]
  start = time.perf_counter()
  name, lowered, tokens = student_program(cfg, devices, per_chip, t, case.mesh, loss, args.grad_accum,
                                          args.value_dtype)
  lowering_s = time.perf_counter() - start

  def small(c, devs):
    _, low, n = student_program(c, devs, 1, t, case.mesh, {**loss, "chunk_size": 0}, 1,  # loop-free
                                args.value_dtype)
    return low, n, len(devs)

  flops = _depth_flops(small, cfg, analytic_flops_per_token(cfg, t, train=True, remat=is_remat(cfg)), devices)
  return [_memory_row(case, cfg, topology, devices, name, lowered, tokens, flops, skipped, lowering_s)]


def weights_fit(cfg, topology: str) -> bool:
  """Whether the parameters alone fit the slice's total HBM (a search skips slices where they cannot)."""
  devices = topology_devices(topology)
  bytes_ = param_count(cfg) * np.dtype(cfg.param_dtype).itemsize
  return bytes_ < memory.chip_of(devices[0]).hbm_bytes * len(devices)


def run_case(case: Case, args, overrides: dict, loss: dict, skipped: list[str]) -> list[Row]:
  runner = ((lambda topo: run_teacher(case, topo, args, overrides, skipped)) if case.side == "teacher" else
            (lambda topo: run_student(case, topo, args, overrides, loss, skipped)))
  if case.topology != "search":
    return runner(case.topology)
  cfg = model_config(case.preset, overrides)
  for topology in args.search:
    if not weights_fit(cfg, topology):
      log.info("%s: %s skipped, its total HBM is below the weights alone", case.label, topology)
      continue
    try:
      rows = runner(topology)
    except ValueError as e:  # a mesh this slice cannot form (bucket batch vs chips)
      log.info("%s: %s skipped: %s", case.label, topology, e)
      continue
    log.info("%s on %s: %s", case.label, topology, "fits" if all(r.fits for r in rows) else "does not fit")
    if all(r.fits for r in rows):
      return rows
  log.error("%s: no topology of --search %s fits", case.label, " ".join(args.search))
  return []


# ---------------------------------------------------------------- results


def short_topology(topology: str, chips: int) -> str:
  """`v5e:2x4` -> `v5e8` (generation and chip count), the form the result keys use."""
  return f"{topology.split(':')[0]}{chips}"


def figures(rows: list[Row], cases: list[Case]) -> dict[str, tuple[float, str]]:
  out: dict[str, tuple[float, str]] = {}
  by_case: dict[tuple[str, str], list[Row]] = {}
  for row in rows:
    by_case.setdefault((row.side, row.preset), []).append(row)
  searched = {(c.side, c.preset) for c in cases if c.topology == "search"}
  for (side, preset), case_rows in by_case.items():
    worst = max(case_rows, key=lambda r: r.total_gib)
    stem = f"scale_{side}_{preset}"
    if (side, preset) in searched:
      out[f"{stem}_chips"] = (worst.chips, "chips")
      out[f"{stem}_chip_hbm_gib"] = (worst.hbm_gib, "GiB")
      out[f"{stem}_gib"] = (worst.total_gib, "GiB")
    else:
      stem = f"{stem}_{short_topology(worst.topology, worst.chips)}"
      out[f"{stem}_gib"] = (worst.total_gib, "GiB")
      out[f"{stem}_hbm_fraction"] = (worst.total_gib / worst.hbm_gib, "fraction")
  for side, key in (("teacher", "scale_engine_flops_ratio"), ("student", "scale_student_flops_ratio")):
    side_rows = [r for r in rows if r.side == side]
    if side_rows and math.isfinite(side_rows[0].flops_ratio):
      out[key] = (side_rows[0].flops_ratio, "ratio")
  return out


def print_rows(rows: list[Row]) -> None:
  head = (f"{'program':<54} {'slice':<10} {'args GiB':>9} {'temp GiB':>9} {'total GiB':>10} {'HBM':>5} "
          f"{'fits':>5} {'FLOPs/tok':>10} {'ratio':>6}")
  print(head)
  for r in rows:
    print(f"{r.side + ' ' + r.preset + ' ' + r.program:<54.54} {r.topology:<10} {r.argument_gib:9.2f} "
          f"{r.temp_gib:9.2f} {r.total_gib:10.2f} {r.hbm_gib:5.0f} {'yes' if r.fits else 'NO':>5} "
          f"{r.compiled_flops_per_token:10.3g} {r.flops_ratio:6.3f}{'' if r.flops_exact else '*'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  d = "(default: %(default)s)"
  parser.add_argument("--teacher", nargs="*", default=list(DEFAULT_TEACHERS), metavar="SPEC",
                      help="teacher cases PRESET@TOPOLOGY@BxT[+BxT...][@AXIS=N,...]: a model preset, a TPU "
                           "topology (e.g. v5e:2x4) or `search` (the smallest of --search that fits), the "
                           "engine's buckets, and the mesh (data=1,fsdp=-1 unless given); none: no teacher " + d)
  parser.add_argument("--student", nargs="*", default=list(DEFAULT_STUDENTS), metavar="SPEC",
                      help="student cases PRESET@TOPOLOGY@SxT[@AXIS=N,...]: S sequences of T tokens per chip "
                           "per micro-batch " + d)
  parser.add_argument("--search", nargs="+", default=list(SEARCH_TOPOLOGIES), metavar="TOPOLOGY",
                      help="topologies a `search` case tries, in order " + d)
  parser.add_argument("--max-k", type=int, default=64, help="the engine's top-k " + d)
  parser.add_argument("--top-k", type=int, default=64, help="the student's loss.top_k " + d)
  parser.add_argument("--kd-mode", default="tail", help="the student's loss.kd_mode " + d)
  parser.add_argument("--grad-accum", type=int, default=1, help="the student's optim.grad_accum " + d)
  parser.add_argument("--value-dtype", default="float16", help="dtype of the teacher's top-k values " + d)
  parser.add_argument("--attention", default=None,
                      help="model.attention (auto|xla|chunked|splash|cudnn) where the model has that field " + d)
  parser.add_argument("--remat", default="full",
                      help="the student's remat (a policy name, or none; a bool field takes full=true) " + d)
  parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                      help="any other ModelConfig field, e.g. param_dtype=float32 or a chunk size; "
                           "fields this code lacks are skipped and reported")
  parser.add_argument("--loss", action="append", default=[], metavar="KEY=VALUE",
                      help="any other LossConfig field (e.g. a chunk size); skipped where absent")
  parser.add_argument("--no-record", action="store_true", help="print only; write no results")
  parser.add_argument("--details", default=str(DETAILS), help="per-program JSON written beside the results " + d)
  add_log_level_argument(parser)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  setup_logging(level=args.log_level)
  teachers = [Case.parse("teacher", s) for s in args.teacher if s != "none"]
  students = [Case.parse("student", s) for s in args.student if s != "none"]
  model_pairs = list(args.model) + ([f"attention={args.attention}"] if args.attention else [])
  overrides, skipped = generic_overrides(ModelConfig, model_pairs, "model")
  loss_pairs = [f"kd_mode={args.kd_mode}", f"top_k={args.top_k}", *args.loss]
  loss, loss_skipped = generic_overrides(LossConfig, loss_pairs, "loss")
  for key in skipped + loss_skipped:
    log.warning("%s: not a field of this code's config, skipped", key)
  rows: list[Row] = []
  failed = []
  start = time.perf_counter()
  for case in teachers + students:
    case_overrides = dict(overrides)
    if case.side == "student":
      case_overrides = {**remat_override(args.remat), **case_overrides}
    log.info("compiling %s on %s ...", case.label, case.topology)
    try:
      case_rows = run_case(case, args, case_overrides, loss, skipped + loss_skipped)
    except Exception as e:  # noqa: BLE001 - one case's failure must not lose the others' figures
      log.exception("%s on %s failed", case.label, case.topology)
      failed.append(f"{case.label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      continue
    rows += case_rows
    print_rows(case_rows)
  print()
  print_rows(rows)
  print(f"(* FLOPs counted with a loop inside a layer: understated) total {time.perf_counter() - start:.0f} s")
  measured = {}
  device = jax.devices()[0]
  if device.platform in ("gpu", "tpu"):
    try:
      for case in teachers[:1]:
        tps = measure_engine(case.preset, overrides, case.shapes[0], args.max_k)
        measured[f"scale_engine_tokens_per_s_{case.preset}"] = (tps, "tokens/s")
      for case in students[:1]:
        tps, mfu = measure_student(case.preset, {**remat_override(args.remat), **overrides}, *case.shapes[0],
                                   loss)
        measured[f"scale_student_tokens_per_s_{case.preset}"] = (tps, "tokens/s")
        if mfu is not None:
          measured[f"scale_student_mfu_{case.preset}"] = (mfu, "fraction")
    except Exception as e:  # noqa: BLE001 - e.g. out of memory on this device: the compiled figures still count
      log.exception("measuring on %s failed", device.device_kind)
      failed.append(f"measuring on {device.device_kind}: {type(e).__name__}")
    log.info("measured on %d x %s: %s", jax.device_count(), device.device_kind, measured)
  for line in failed:
    print(f"FAILED {line}", file=sys.stderr)
  if args.no_record:
    return 1 if failed else 0
  details = {"command": invocation(), "commit": git_commit(),
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "machine": machine(), "skipped_fields": skipped + loss_skipped,
             "rows": [dict(dataclasses.asdict(r), flops_ratio=r.flops_ratio) for r in rows]}
  Path(args.details).write_text(json.dumps(details, indent=2) + "\n")
  record({**figures(rows, teachers + students), **measured})
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
