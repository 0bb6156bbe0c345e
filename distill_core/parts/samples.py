"""The samples part: N draws per position from the teacher's softmax(z / tau), for the sampled KD loss.

| field                | shape     | dtype            | meaning                                          |
|----------------------|-----------|------------------|--------------------------------------------------|
| `sample_ids`         | (B, T, S) | int32            | distinct ids drawn from softmax(z / tau)         |
| `sample_counts`      | (B, T, S) | int32            | draws of each; 0 marks a padding slot            |
| `sample_logits`      | (B, T, S) | like topk_logits | the shifted logits z at those ids                |
| `sample_logsumexp`   | (B, T)    | f32              | log sum over the proposal's support of exp(z/tau)|
| `sample_temperature` | ()        | f32              | tau of the proposal                              |
| `sample_skip`        | static int|                  | leading top-k ids the proposal left out          |

The draws themselves are `distill_core.sampling` (a pure function of seed, example id,
position and draw index). A request asks with `SampleRequest` (`OutputSpec.num_samples`,
`sample_temperature`, `sample_seed`, `sample_tail` on the wire; `Limits.max_samples` offers it, the server
config's `limits.max_samples`); a server's engine takes each row's draw parameters as a `SampleBatch`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np
import pydantic

from distill_core import sampling
from distill_core.bitpack import WireError, bits_for
from distill_core.parts import base
from distill_core.parts.base import Array, Block, Rows, SpecError
from distill_core.parts.topk import check_ids
from distill_core.proto import teacher_pb2 as pb
from distill_core.tensor_codec import decode_tensor, encode_tensor


@dataclasses.dataclass(frozen=True)
class SampleRequest:
  """Which samples to draw: N per position from softmax(z / temperature), keyed by `seed`.

  `exclude` leading top-k ids are left out of the proposal (0: the whole real vocabulary).
  """

  num_samples: int
  temperature: float = 1.0
  seed: int = 0
  exclude: int = 0

  def __post_init__(self):
    if self.num_samples < 1:
      raise ValueError(f"num_samples: {self.num_samples} must be >= 1")
    if not (math.isfinite(self.temperature) and self.temperature > 0):
      raise ValueError(f"sample_temperature: {self.temperature} must be finite and > 0")
    if not 0 <= self.seed < 2**64:
      raise ValueError(f"sample_seed: {self.seed} not in [0, 2**64)")
    if self.exclude < 0:
      raise ValueError(f"sample_exclude: {self.exclude} must be >= 0")

  def to_proto(self, spec: pb.OutputSpec) -> None:
    """Writes the request into an OutputSpec whose `k` is set (`exclude` must be 0 or k there)."""
    if self.exclude not in (0, spec.k):
      raise ValueError(f"samples.exclude: {self.exclude} must be 0 or k={spec.k} on the wire")
    spec.num_samples = self.num_samples
    spec.sample_temperature = self.temperature
    spec.sample_seed = self.seed
    spec.sample_tail = self.exclude > 0

  @classmethod
  def from_proto(cls, spec: pb.OutputSpec) -> "SampleRequest | None":
    """The request an OutputSpec makes (None: none); its fields are not range-checked against a server."""
    if not spec.HasField("num_samples"):
      return None
    return cls(num_samples=spec.num_samples,
               temperature=spec.sample_temperature if spec.HasField("sample_temperature") else 1.0,
               seed=spec.sample_seed, exclude=spec.k if spec.sample_tail else 0)

  def answer_bytes(self, value_dtype: str) -> int:
    """Approximate bytes per position of the answer (ids, counts, values; and the logsumexp)."""
    return self.num_samples * (8 + np.dtype(value_dtype).itemsize) + 4


@flax.struct.dataclass
class Samples:
  sample_ids: Array = None  # (B, T, S) int32, distinct sampled ids (padding: id 0, count 0)
  sample_counts: Array = None  # (B, T, S) int32, draws per id; sum = N at every position
  sample_logits: Array = None  # (B, T, S) f16/bf16/f32, shifted logits z at sample_ids
  sample_logsumexp: Array = None  # (B, T) f32, log sum_{v in support} exp(z_v / tau)
  sample_temperature: Array = None  # () f32, the proposal's tau
  sample_skip: int = flax.struct.field(pytree_node=False, default=0)  # top-k ids left out of the proposal

  def __post_init__(self):
    tau = self.sample_temperature
    if isinstance(tau, (float, int)) or (isinstance(tau, np.ndarray) and tau.dtype != np.float32):
      object.__setattr__(self, "sample_temperature", np.asarray(tau, np.float32).reshape(()))
    object.__setattr__(self, "sample_skip", int(self.sample_skip))


@flax.struct.dataclass
class SampleBatch:
  """Per-row sampling parameters of an engine batch (rows that do not sample have num_samples 0)."""

  num_samples: Array  # (Bb,) int32, <= limits max_samples
  temperatures: Array  # (Bb,) float32 tau, 1.0 where unused
  seeds: Array  # (Bb, 2) uint32 words of each row's request seed
  example_ids: Array  # (Bb, 2) uint32 words of each row's example id
  exclude: Array  # (Bb,) int32 leading top-k ids left out of the proposal

  @classmethod
  def empty(cls, rows: int) -> "SampleBatch":
    return cls(np.zeros(rows, np.int32), np.ones(rows, np.float32), np.zeros((rows, 2), np.uint32),
               np.zeros((rows, 2), np.uint32), np.zeros(rows, np.int32))


_RANKS = {"sample_ids": 3, "sample_counts": 3, "sample_logits": 3, "sample_logsumexp": 2, "sample_temperature": 0}


class SamplesPart(base.Part):
  name = "samples"
  value_type = Samples
  row_axes = {"sample_ids": 0, "sample_counts": 0, "sample_logits": 0, "sample_logsumexp": 0}
  positional = ("sample_ids", "sample_counts", "sample_logits", "sample_logsumexp")
  shared = ("sample_temperature",)
  absent = {name: None for name in _RANKS} | {"sample_skip": 0}
  compute_args = ("num_samples", "sample_temperature", "sample_seed", "example_ids", "sample_exclude",
                  "sample_counts")
  limits = {"max_samples": (0, "Most sampled-target draws per position (OutputSpec.num_samples; e.g. 64); a "
                              "batch with a sampling request makes this many draw slots per position. > 0 "
                              "compiles a sampling program per bucket and state dtype at warm-up (twice the "
                              "programs); 0 (default) offers no sampling.")}
  config_fields = {
      "num_samples": (int, pydantic.Field(0, ge=0, description="Sampled targets stored per position: N draws from "
                                          "softmax(z / sample_temperature) (0 = none; for loss.kd_mode sampled, "
                                          "docs/losses.md).")),
      "sample_temperature": (float, pydantic.Field(1.0, gt=0, allow_inf_nan=False,
                                                   description="tau of the sampling proposal.")),
      "sample_seed": (int, pydantic.Field(0, ge=0, lt=2**64, description="Seed of the draws (with the example id "
                                          "and position).")),
      "sample_tail": (bool, pydantic.Field(False, description="Draw only outside the stored top-k (students must "
                                           "then use exactly loss.top_k = k); false: from the whole vocabulary.")),
  }
  engine_slots = ("sample_ids", "sample_counts", "sample_logits")
  engine_values = ("sample_logits",)

  def compute(self, block: Block, num_samples: int = 0, sample_temperature=1.0, sample_seed=0,
              example_ids=None, sample_exclude=0, sample_counts=None):
    """Draws on one block (see `compute_targets`: num_samples static, the rest may be traced per row)."""
    if not num_samples:
      return None
    k = block.topk.topk_ids.shape[-1]
    if example_ids is None:
      raise ValueError("example_ids: required with num_samples > 0 (the draws are keyed by example id)")
    static_skip = isinstance(sample_exclude, (int, np.integer))
    if static_skip and not 0 <= sample_exclude <= min(k, block.true_vocab_size - 1):
      raise ValueError(f"sample_exclude: {sample_exclude} not in [0, min(k={k}, true_vocab_size - 1)]")
    if isinstance(sample_seed, (int, np.integer)):
      sample_seed = sampling.split_u64(np.asarray(sample_seed))
    b = block.z.shape[0]
    sids, counts, slogits, slse = sampling.draw_samples(
        block.z, block.topk.topk_ids, num_draws=num_samples,
        num_samples=num_samples if sample_counts is None else sample_counts, temperature=sample_temperature,
        exclude=sample_exclude, seeds=jnp.reshape(jnp.asarray(sample_seed, jnp.uint32), (-1, 2)),
        example_ids=jnp.reshape(jnp.asarray(example_ids, jnp.uint32), (b, 2)), start=block.start)
    tau = jnp.reshape(jnp.asarray(sample_temperature, jnp.float32), (-1,))[0]
    return Samples(sample_ids=sids, sample_counts=counts, sample_logits=slogits.astype(block.value_dtype),
                   sample_logsumexp=slse, sample_temperature=tau,
                   sample_skip=int(sample_exclude) if static_skip else 0)

  # -- requests, inputs and limits --------------------------------------------------------------

  def read_request(self, spec: pb.OutputSpec) -> SampleRequest | None:
    return SampleRequest.from_proto(spec)

  def write_request(self, request: SampleRequest, spec: pb.OutputSpec) -> None:
    request.to_proto(spec)

  def check_request(self, request: SampleRequest, *, example_ids, part_inputs) -> None:
    if example_ids is None:
      raise ValueError("example_ids: required with sampled targets (they key the draws)")

  def answer_bytes(self, request: SampleRequest, value_dtype: str) -> int:
    return request.answer_bytes(value_dtype)

  def parse_request(self, spec: pb.OutputSpec, *, vocab_size: int, limits, part_inputs=None) -> SampleRequest | None:
    """The samples a request's OutputSpec asks a server for (None: none); raises SpecError naming the field."""
    max_samples = int(limits.get("max_samples", 0))
    if not spec.HasField("num_samples"):
      if spec.HasField("sample_temperature") or spec.sample_tail or spec.sample_seed:
        raise SpecError("spec.num_samples", "sample_temperature, sample_seed or sample_tail given without "
                                            "num_samples")
      return None
    n = int(spec.num_samples)
    if not max_samples:
      raise SpecError("spec.num_samples", "this server does not offer sampled targets (limits.max_samples is 0)")
    if not 1 <= n <= max_samples:
      raise SpecError("spec.num_samples", f"num_samples = {n} must be in [1, {max_samples}]")
    tau = float(spec.sample_temperature) if spec.HasField("sample_temperature") else 1.0
    if not (math.isfinite(tau) and tau > 0):
      raise SpecError("spec.sample_temperature", f"sample_temperature {tau} must be finite and > 0")
    if spec.sample_tail and spec.k >= vocab_size:
      raise SpecError("spec.sample_tail", f"k = {spec.k} leaves no tail of the {vocab_size}-id vocabulary to "
                                          "sample from")
    return SampleRequest(num_samples=n, temperature=tau, seed=int(spec.sample_seed),
                         exclude=int(spec.k) if spec.sample_tail else 0)

  def prepare_inputs(self, req: pb.ForwardRequest, request: SampleRequest, *, rows: int, length: int,
                     vocab_size: int, limits) -> dict[str, np.ndarray]:
    """The request's example ids (B,) int64: they key the draws."""
    if not req.HasField("example_ids"):
      raise SpecError("example_ids", "required with spec.num_samples (they key the draws)")
    try:
      ids = decode_tensor(req.example_ids, "example_ids", dtypes=(pb.DTYPE_INT64,), ndim=1, max_elements=rows)
    except WireError as e:
      raise SpecError(e.field, e.detail) from None
    if ids.shape != (rows,):
      raise SpecError("example_ids", f"{ids.shape[0]} ids for {rows} rows")
    bad = (ids < 0) | (ids >= 2**63 - 1)
    if bad.any():
      where = int(np.argwhere(bad)[0][0])
      raise SpecError("example_ids", f"example id {int(ids[where])} at [{where}] is outside [0, {2**63 - 1})")
    return {"example_ids": ids}

  def request_from_config(self, cfg, *, k: int) -> SampleRequest | None:
    if not cfg.num_samples:
      return None
    return SampleRequest(num_samples=cfg.num_samples, temperature=cfg.sample_temperature, seed=cfg.sample_seed,
                         exclude=k if cfg.sample_tail else 0)

  def compute_kwargs(self, request: SampleRequest, *, example_ids) -> dict[str, Any]:
    return dict(num_samples=request.num_samples, sample_temperature=request.temperature, sample_seed=request.seed,
                example_ids=example_ids, sample_exclude=request.exclude)

  def limits_for(self, request: SampleRequest) -> dict[str, int]:
    return {"max_samples": request.num_samples}

  def max_slots(self, limits) -> int:
    return int(limits.get("max_samples", 0))

  def fetch_slots(self, request: SampleRequest) -> int:
    return request.num_samples

  def engine_inputs(self, rows: int, length: int, limits) -> SampleBatch:
    return SampleBatch.empty(rows)

  def fill_inputs(self, inputs: SampleBatch, at: slice, request: SampleRequest, prepared, start: int,
                  stop: int) -> None:
    inputs.num_samples[at] = request.num_samples
    inputs.temperatures[at] = request.temperature
    inputs.seeds[at] = sampling.split_u64(np.asarray(request.seed))
    inputs.example_ids[at] = sampling.split_u64(prepared["example_ids"][start:stop])
    inputs.exclude[at] = request.exclude

  def check_engine_inputs(self, inputs: SampleBatch, rows: int, length: int, slots: int, limits) -> None:
    max_samples = self.max_slots(limits)
    if not 1 <= slots <= max_samples:
      raise ValueError(f"fetch.samples {slots} not in [1, max_samples {max_samples}]")
    if inputs.num_samples.shape != (rows,) or inputs.example_ids.shape != (rows, 2):
      raise ValueError(f"samples: per-row arrays do not match {rows} rows")
    if int(inputs.num_samples.max(initial=0)) > slots:
      raise ValueError(f"samples: a row asks for more than fetch.samples {slots} draws")

  def engine_args(self, row: SampleBatch, limits) -> dict[str, Any]:
    return dict(num_samples=self.max_slots(limits), sample_counts=row.num_samples,
                sample_temperature=row.temperatures, sample_seed=row.seeds, example_ids=row.example_ids[None],
                sample_exclude=row.exclude)

  def write_limits(self, values, msg: pb.Limits) -> None:
    msg.max_samples = int(values.get("max_samples", 0))

  def read_limits(self, msg: pb.Limits) -> dict[str, int]:
    return {"max_samples": int(msg.max_samples)}

  # -- checks ----------------------------------------------------------------------------------

  def validate(self, value: Samples, rows: Rows, expect) -> None:
    present = [name for name in _RANKS if getattr(value, name) is not None]
    if not present:
      raise ValueError(f"sample_skip: {value.sample_skip} without sampled targets")
    if len(present) != len(_RANKS):
      missing = [name for name in _RANKS if name not in present]
      raise ValueError(f"{missing[0]}: missing although {present[0]} is present")
    for name, ndim in _RANKS.items():
      dtypes = {"sample_ids": base.INT32, "sample_counts": base.INT32,
                "sample_logits": base.FLOAT_DTYPES}.get(name, base.FLOAT32)
      base.check_array(getattr(value, name), name, ndim, dtypes)
    b, t = rows.batch_size, rows.seq_len
    slots = value.sample_ids.shape[2]
    for name in ("sample_ids", "sample_counts", "sample_logits"):
      if tuple(getattr(value, name).shape) != (b, t, slots):
        raise ValueError(f"{name}: shape {tuple(getattr(value, name).shape)} != {(b, t, slots)} ([B, T, slots])")
    if tuple(value.sample_logsumexp.shape) != (b, t):
      raise ValueError(f"sample_logsumexp: shape {tuple(value.sample_logsumexp.shape)} != {(b, t)}")
    if not 0 <= value.sample_skip <= rows.k:
      raise ValueError(f"sample_skip: {value.sample_skip} not in [0, k={rows.k}]")

  def check_values(self, value: Samples, *, vocab_size, temperatures) -> None:
    check_ids(value.sample_ids, "sample_ids", vocab_size)

  def concat_mismatch(self, first, other) -> str | None:
    if (first is None) != (other is None) or (first is not None and (
        other.sample_skip != first.sample_skip or not np.array_equal(np.asarray(other.sample_temperature),
                                                                      np.asarray(first.sample_temperature)))):
      return "disagrees with part 0 on the sampled targets"
    return None

  def to_numpy(self, value: Samples) -> dict[str, np.ndarray]:
    out = {name: np.asarray(getattr(value, name)) for name in _RANKS}
    out["sample_skip"] = np.asarray(value.sample_skip, np.int32)
    return out

  def from_numpy(self, arrays) -> dict[str, Any]:
    out = {name: arrays.get(name) for name in _RANKS}
    out["sample_skip"] = int(arrays.get("sample_skip", 0))
    return out

  def encode(self, value: Samples, resp, *, packed_id_bits, sorted_delta_values) -> None:
    """Counts as [B, T, S]; ids and logits of the non-empty slots only, flat (see teacher.proto)."""
    counts = np.asarray(value.sample_counts, np.int32)
    used = counts > 0
    count_bits = bits_for(int(counts.max()) + 1) if packed_id_bits and counts.size else 0
    resp.sample_counts.CopyFrom(encode_tensor(counts, packed_bits=count_bits))
    resp.sample_ids.CopyFrom(encode_tensor(np.asarray(value.sample_ids, np.int32)[used],
                                           packed_bits=packed_id_bits))
    resp.sample_logits.CopyFrom(encode_tensor(np.asarray(value.sample_logits)[used]))
    resp.sample_logsumexp.CopyFrom(encode_tensor(np.asarray(value.sample_logsumexp, np.float32)))
    resp.sample_temperature = float(np.asarray(value.sample_temperature))
    resp.sample_skip = int(value.sample_skip)

  def decode(self, resp, rows: Rows) -> dict[str, Any]:
    if not resp.HasField("sample_counts"):
      return {}
    bt = (rows.batch_size, rows.seq_len)
    counts = decode_tensor(resp.sample_counts, "sample_counts", dtypes=(pb.DTYPE_INT32,), ndim=3)
    if counts.shape[:2] != bt:
      raise WireError("sample_counts", f"shape {list(counts.shape)} does not match [B, T, slots] with "
                                       f"[B, T] = {list(bt)}")
    if counts.size and int(counts.min()) < 0:
      raise WireError("sample_counts", "negative count")
    used = counts > 0
    n = int(used.sum())
    flat_ids = decode_tensor(resp.sample_ids, "sample_ids", dtypes=(pb.DTYPE_INT32,), ndim=1)
    flat_logits = decode_tensor(resp.sample_logits, "sample_logits", dtypes=base.WIRE_FLOATS, ndim=1)
    for field, flat in (("sample_ids", flat_ids), ("sample_logits", flat_logits)):
      if flat.shape[0] != n:
        raise WireError(field, f"{flat.shape[0]} entries for {n} non-empty sample slots")
    ids = np.zeros(counts.shape, np.int32)
    ids[used] = flat_ids
    logits = np.zeros(counts.shape, flat_logits.dtype)
    logits[used] = flat_logits
    lse = decode_tensor(resp.sample_logsumexp, "sample_logsumexp", dtypes=(pb.DTYPE_FLOAT32,), ndim=2)
    if lse.shape != bt:
      raise WireError("sample_logsumexp", f"shape {list(lse.shape)} != [B, T] = {list(bt)}")
    if not (math.isfinite(resp.sample_temperature) and resp.sample_temperature > 0):
      raise WireError("sample_temperature", f"{resp.sample_temperature} must be finite and > 0")
    if not 0 <= resp.sample_skip <= rows.k:
      raise WireError("sample_skip", f"{resp.sample_skip} not in [0, k={rows.k}]")
    return dict(sample_ids=ids, sample_counts=np.asarray(counts, np.int32), sample_logits=logits,
                sample_logsumexp=lse, sample_temperature=resp.sample_temperature, sample_skip=resp.sample_skip)

  def select(self, value: Samples, need, where: str):
    if value.sample_skip and need.k != value.sample_skip:
      raise ValueError(f"{where}: k: the samples were drawn outside the stored top-{value.sample_skip}, "
                       f"so exactly k = {value.sample_skip} must be used (asked {need.k})")
    return value

  def from_engine(self, out, rows, length, req) -> dict[str, Any]:
    request = dict(req.parts).get(self.name)
    if request is None:
      return {}
    got = out.parts[self.name]
    n = request.num_samples  # the distinct ids of N draws fit in the first N slots
    return dict(sample_ids=np.ascontiguousarray(got["sample_ids"][rows, :length, :n]),
                sample_counts=np.ascontiguousarray(got["sample_counts"][rows, :length, :n]),
                sample_logits=np.ascontiguousarray(got["sample_logits"][rows, :length, :n], dtype=req.value_dtype),
                sample_logsumexp=np.ascontiguousarray(got["sample_logsumexp"][rows, :length]),
                sample_temperature=request.temperature, sample_skip=request.exclude)

  def check(self, needs, offer) -> list[str]:
    want = dict(needs.parts).get(self.name)
    if want is None:
      return []
    problems = []
    if offer.stored:  # stored answers: exactly the samples the run would request
      have = dict(offer.parts).get(self.name)
      if have is None:
        return [f"spec.num_samples: stored no sampled targets, loss.kd_mode sampled needs {want.num_samples} per "
                f"position (dump with num_samples={want.num_samples})"]
      fields = (("num_samples", have.num_samples, "loss.num_samples", want.num_samples),
                ("sample_temperature", float(np.float32(have.temperature)), "loss.sample_temperature",
                 float(np.float32(want.temperature))),
                ("sample_seed", have.seed, "loss.sample_seed", want.seed),
                ("sample_tail", have.exclude > 0, "loss.sample_tail", want.exclude > 0))
      for field, stored, name, need in fields:
        if stored != need:
          problems.append(f"spec.{field}: stored {stored!r}, {name} is {need!r}")
      if have.exclude and want.exclude and have.exclude != want.exclude:
        problems.append(f"spec.k: the samples were drawn outside the stored top-{have.exclude}, loss.top_k is "
                        f"{want.exclude} (with sample_tail they must be equal)")
      return problems
    offered = int(offer.part_limits.get("max_samples", 0))
    if want.num_samples > offered:
      what = f"at most {offered}" if offered else "no sampled targets"
      problems.append(f"num_samples: the loss needs {want.num_samples} draws per position, the teacher serves "
                      f"{what} (start it with limits.max_samples >= {want.num_samples})")
    if want.exclude and needs.k >= offer.vocab_size:
      problems.append(f"sample_tail: top_k={needs.k} leaves no tail of the teacher's {offer.vocab_size} ids")
    return problems

PART = SamplesPart()
