"""The teacher-target contract: what every teacher source hands the student's losses.

For a batch of B sequences of length T (position t describes token t+1, like the
student's logits at t) a teacher answers with

| field          | shape              | dtype            | meaning                                       |
|----------------|--------------------|------------------|-----------------------------------------------|
| `topk_ids`     | (B, T, k)          | int32            | the k highest logits, sorted descending       |
| `topk_logits`  | (B, T, k)          | f16 / bf16 / f32 | those logits minus the row max (top entry 0)  |
| `logsumexp`    | (B, T, n_temps)    | f32              | log sum_v exp(z_v / T_j) over the real vocab  |
| `temperatures` | (n_temps,)         | f32              | the T_j of the logsumexp columns              |
| `layer_states` | name -> (L, B, T, E) | bf16 / f32     | optional `attn_in` / `attn_out` per layer     |
| `state_layers` | static tuple       |                  | teacher layer of each row of the states       |
| `dense_logits` | (B, T, V) or None  | f32              | full logits, only from an in-process teacher  |
| `dense_hidden` | (B, T, E) or None  | teacher dtype    | or instead: final hidden states (in-process)  |
| `dense_head`   | DenseHead or None  |                  | with them: the teacher's lm_head (in-process) |
| `sample_ids`   | (B, T, S) or None  | int32            | distinct ids drawn from softmax(z / tau)      |
| `sample_counts`| (B, T, S) or None  | int32            | draws of each; 0 marks a padding slot         |
| `sample_logits`| (B, T, S) or None  | like topk_logits | the shifted logits z at those ids             |
| `sample_logsumexp` | (B, T) or None | f32              | log sum over the proposal's support of exp(z/tau) |
| `sample_temperature` | () or None   | f32              | tau of the proposal                           |
| `sample_skip`  | static int         |                  | leading top-k ids the proposal left out       |

`compute_targets` builds it on the device inside the teacher's jitted forward
(samples with `distill_core.sampling`); `to_numpy` / `from_numpy` give the flat
dict used by the wire codec and shards.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from distill_core import sampling

Array = Any  # jax.Array or np.ndarray (host side)

VALUE_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
STATE_NAMES = ("attn_in", "attn_out")
_FLOAT_DTYPES = tuple(np.dtype(d) for d in VALUE_DTYPES.values())
_STATES_PREFIX = "layer_states."
# The fields indexed by position, (B, T, ...): what a block of positions holds.
POSITIONAL_FIELDS = ("topk_ids", "topk_logits", "logsumexp", "dense_logits", "dense_hidden", "sample_ids",
                     "sample_counts", "sample_logits", "sample_logsumexp")
# The optional sampled-target fields (all present or all absent) and their ranks.
SAMPLE_FIELDS = {"sample_ids": 3, "sample_counts": 3, "sample_logits": 3, "sample_logsumexp": 2,
                 "sample_temperature": 0}


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


@flax.struct.dataclass
class DenseHead:
  """An in-process teacher's lm_head, so dense teacher logits can be formed per chunk of positions.

  logits = hidden @ weight in `dtype` with float32 accumulation: weight (E, V), or the tied
  embedding (V, E) when `tied`; the arithmetic of `Transformer.logits_from_hidden`.
  """

  weight: Array
  tied: bool = flax.struct.field(pytree_node=False, default=False)
  dtype: str = flax.struct.field(pytree_node=False, default="float32")

  def __call__(self, hidden: Array) -> jax.Array:
    """hidden (B, T, E) -> logits (B, T, V) float32."""
    spec = "bte,ve->btv" if self.tied else "bte,ev->btv"
    return jnp.einsum(spec, hidden, self.weight.astype(self.dtype), preferred_element_type=jnp.float32)


@flax.struct.dataclass
class TeacherTargets:
  """Sparse teacher answers for one batch (a JAX pytree; `state_layers` is static).

  `temperatures` is an array leaf, so a temperature schedule does not recompile
  the train step. A Python sequence given for it is converted to float32.
  """

  topk_ids: Array  # (B, T, k) int32
  topk_logits: Array  # (B, T, k) f16/bf16/f32, shifted so the row max is 0
  logsumexp: Array  # (B, T, n_temps) f32, over the full real vocabulary
  temperatures: Array  # (n_temps,) f32
  layer_states: dict[str, Array] = flax.struct.field(default_factory=dict)  # name -> (L, B, T, E)
  state_layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())
  dense_logits: Array | None = None  # (B, T, V) f32, in-process teacher only
  dense_hidden: Array | None = None  # (B, T, E) teacher final hidden states, in-process teacher only
  dense_head: DenseHead | None = None  # the teacher's lm_head: dense logits = dense_head(dense_hidden)
  sample_ids: Array | None = None  # (B, T, S) int32, distinct sampled ids (padding: id 0, count 0)
  sample_counts: Array | None = None  # (B, T, S) int32, draws per id; sum = N at every position
  sample_logits: Array | None = None  # (B, T, S) f16/bf16/f32, shifted logits z at sample_ids
  sample_logsumexp: Array | None = None  # (B, T) f32, log sum_{v in support} exp(z_v / tau)
  sample_temperature: Array | None = None  # () f32, the proposal's tau
  sample_skip: int = flax.struct.field(pytree_node=False, default=0)  # top-k ids left out of the proposal

  def __post_init__(self):
    temps = self.temperatures
    host = isinstance(temps, (list, tuple, float, int))
    if host or (isinstance(temps, np.ndarray) and temps.dtype != np.float32):
      object.__setattr__(self, "temperatures", np.asarray(temps, np.float32).reshape(-1))
    if not isinstance(self.state_layers, tuple):
      object.__setattr__(self, "state_layers", tuple(int(x) for x in self.state_layers))
    tau = self.sample_temperature
    if isinstance(tau, (float, int)) or (isinstance(tau, np.ndarray) and tau.dtype != np.float32):
      object.__setattr__(self, "sample_temperature", np.asarray(tau, np.float32).reshape(()))
    object.__setattr__(self, "sample_skip", int(self.sample_skip))

  @property
  def batch_size(self) -> int:
    return self.topk_ids.shape[0]

  @property
  def seq_len(self) -> int:
    return self.topk_ids.shape[1]

  @property
  def k(self) -> int:
    return self.topk_ids.shape[2]

  @property
  def n_temps(self) -> int:
    return self.logsumexp.shape[2]

  @property
  def has_samples(self) -> bool:
    return self.sample_ids is not None

  @property
  def has_dense(self) -> bool:
    """Dense teacher logits are available: whole, or as hidden states and the lm_head."""
    return self.dense_logits is not None or self.dense_hidden is not None

  def dense(self) -> Array:
    """(B, T, V) dense teacher logits f32 (formed from dense_hidden when that is what they carry)."""
    return self.dense_logits if self.dense_logits is not None else self.dense_head(self.dense_hidden)

  def map_rows(self, fn) -> "TeacherTargets":
    """Applies `fn(array, axis)` to every array indexed by the batch row (B is axis 1 of the states)."""
    opt = lambda x: None if x is None else fn(x, 0)  # noqa: E731
    return self.replace(
        topk_ids=fn(self.topk_ids, 0), topk_logits=fn(self.topk_logits, 0), logsumexp=fn(self.logsumexp, 0),
        layer_states={name: fn(value, 1) for name, value in self.layer_states.items()},
        dense_logits=opt(self.dense_logits), dense_hidden=opt(self.dense_hidden), sample_ids=opt(self.sample_ids),
        sample_counts=opt(self.sample_counts), sample_logits=opt(self.sample_logits),
        sample_logsumexp=opt(self.sample_logsumexp))

  def validate(self, *, batch_size: int | None = None, seq_len: int | None = None,
               k: int | None = None, n_temps: int | None = None, hidden_size: int | None = None,
               state_names: Sequence[str] | None = None,
               state_layers: Sequence[int] | None = None) -> "TeacherTargets":
    """Checks ranks, dtypes and shapes (and the expected sizes given); returns self.

    Raises:
      ValueError: naming the first offending field.
    """
    _check(self.topk_ids, "topk_ids", 3, (np.dtype(np.int32),))
    _check(self.topk_logits, "topk_logits", 3, _FLOAT_DTYPES)
    _check(self.logsumexp, "logsumexp", 3, (np.dtype(np.float32),))
    _check(self.temperatures, "temperatures", 1, (np.dtype(np.float32),))
    b, t, kk = self.topk_ids.shape
    expect = {"batch_size": (batch_size, b), "seq_len": (seq_len, t), "k": (k, kk),
              "n_temps": (n_temps, self.logsumexp.shape[2])}
    for name, (want, got) in expect.items():
      if want is not None and want != got:
        raise ValueError(f"teacher targets: {name} is {got}, expected {want}")
    if tuple(self.topk_logits.shape) != (b, t, kk):
      raise ValueError(f"topk_logits: shape {tuple(self.topk_logits.shape)} != topk_ids shape {(b, t, kk)}")
    if tuple(self.logsumexp.shape[:2]) != (b, t):
      raise ValueError(f"logsumexp: shape {tuple(self.logsumexp.shape)} does not start with {(b, t)}")
    if self.temperatures.shape[0] != self.logsumexp.shape[2]:
      raise ValueError(f"temperatures: {self.temperatures.shape[0]} values for "
                       f"{self.logsumexp.shape[2]} logsumexp columns")
    self._validate_states(hidden_size, state_names, state_layers)
    self._validate_samples()
    if self.dense_logits is not None:
      _check(self.dense_logits, "dense_logits", 3, (np.dtype(np.float32),))
      if tuple(self.dense_logits.shape[:2]) != (b, t):
        raise ValueError(f"dense_logits: shape {tuple(self.dense_logits.shape)} does not start with {(b, t)}")
    if (self.dense_hidden is None) != (self.dense_head is None):
      raise ValueError("dense_hidden: given without dense_head (or the reverse); they come together")
    if self.dense_hidden is not None:
      _check(self.dense_hidden, "dense_hidden", 3, _FLOAT_DTYPES)
      if tuple(self.dense_hidden.shape[:2]) != (b, t):
        raise ValueError(f"dense_hidden: shape {tuple(self.dense_hidden.shape)} does not start with {(b, t)}")
    return self

  def _validate_states(self, hidden_size, state_names, state_layers) -> None:
    if state_names is not None and set(state_names) != set(self.layer_states):
      raise ValueError(f"layer_states: has {sorted(self.layer_states)}, expected {sorted(state_names)}")
    if state_layers is not None and tuple(state_layers) != self.state_layers:
      raise ValueError(f"state_layers: {self.state_layers} != expected {tuple(state_layers)}")
    if self.layer_states and not self.state_layers:
      raise ValueError("state_layers: empty although layer_states are present")
    if len(set(self.state_layers)) != len(self.state_layers):
      raise ValueError(f"state_layers: duplicate layers in {self.state_layers}")
    want = (len(self.state_layers), self.batch_size, self.seq_len)
    for name, value in self.layer_states.items():
      field = f"layer_states[{name}]"
      if name not in STATE_NAMES:
        raise ValueError(f"{field}: unknown state (known: {', '.join(STATE_NAMES)})")
      _check(value, field, 4, _FLOAT_DTYPES)
      if tuple(value.shape[:3]) != want:
        raise ValueError(f"{field}: shape {tuple(value.shape)} does not match [{want[0]} layers, B, T, E]")
      if hidden_size is not None and value.shape[3] != hidden_size:
        raise ValueError(f"{field}: width {value.shape[3]} != hidden_size {hidden_size}")

  def _validate_samples(self) -> None:
    present = [name for name in SAMPLE_FIELDS if getattr(self, name) is not None]
    if not present:
      if self.sample_skip:
        raise ValueError(f"sample_skip: {self.sample_skip} without sampled targets")
      return
    if len(present) != len(SAMPLE_FIELDS):
      missing = [name for name in SAMPLE_FIELDS if name not in present]
      raise ValueError(f"{missing[0]}: missing although {present[0]} is present")
    int32, f32 = (np.dtype(np.int32),), (np.dtype(np.float32),)
    for name, ndim in SAMPLE_FIELDS.items():
      dtypes = {"sample_ids": int32, "sample_counts": int32, "sample_logits": _FLOAT_DTYPES}.get(name, f32)
      _check(getattr(self, name), name, ndim, dtypes)
    b, t = self.batch_size, self.seq_len
    slots = self.sample_ids.shape[2]
    for name in ("sample_ids", "sample_counts", "sample_logits"):
      if tuple(getattr(self, name).shape) != (b, t, slots):
        raise ValueError(f"{name}: shape {tuple(getattr(self, name).shape)} != {(b, t, slots)} ([B, T, slots])")
    if tuple(self.sample_logsumexp.shape) != (b, t):
      raise ValueError(f"sample_logsumexp: shape {tuple(self.sample_logsumexp.shape)} != {(b, t)}")
    if not 0 <= self.sample_skip <= self.k:
      raise ValueError(f"sample_skip: {self.sample_skip} not in [0, k={self.k}]")

  def temperature_index(self, temperature: float, *, rtol: float = 1e-5) -> int:
    """The column of `logsumexp` computed at `temperature` (host-side lookup).

    Raises:
      ValueError: if no column matches.
    """
    temps = np.asarray(self.temperatures, np.float64)
    hits = np.flatnonzero(np.abs(temps - temperature) <= rtol * abs(temperature))
    if hits.size == 0:
      raise ValueError(f"temperatures: no logsumexp column for temperature {temperature} "
                       f"(have {temps.tolist()})")
    return int(hits[0])


def check_values(targets: TeacherTargets, *, vocab_size: int | None = None,
                 temperatures: Sequence[float] | None = None) -> TeacherTargets:
  """Checks the values of a teacher's answer (host arrays), beyond `validate`'s shapes; returns it.

  * every top-k (and sampled) id is in [0, vocab_size) (an id outside makes the loss read past
    the logits);
  * the temperatures are the ones asked for (each logsumexp column belongs to one);
  * the first top-k value of every position is exactly 0 (values are shifted by the row max).

  Raises:
    ValueError: naming the field and the first offending position.
  """
  for field in ("topk_ids", "sample_ids"):
    ids = getattr(targets, field)
    ids = None if ids is None else np.asarray(ids)
    if vocab_size is not None and ids is not None and ids.size:
      bad = (ids < 0) | (ids >= vocab_size)
      if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{field}: id {int(ids[where])} at {list(where)} is outside the vocabulary "
                         f"[0, {vocab_size}) ({int(bad.sum())} such ids)")
  if temperatures is not None:
    want = np.asarray(temperatures, np.float32).reshape(-1)
    got = np.asarray(targets.temperatures, np.float32).reshape(-1)
    if want.shape != got.shape or not np.array_equal(want, got):
      raise ValueError(f"temperatures: the answer is for {got.tolist()}, the request asked for {want.tolist()}")
  if targets.topk_logits.shape[-1] == 0:  # samples alone: no top-k values to check
    return targets
  first = np.asarray(targets.topk_logits[..., 0], np.float32)
  off = first != 0.0  # NaN included
  if off.any():
    where = tuple(int(i) for i in np.argwhere(off)[0])
    raise ValueError(f"topk_logits: the first value at {list(where)} is {float(first[where])}, not 0 (values "
                     f"are shifted by the row max; {int(off.sum())} such positions)")
  return targets


def _check(value: Array, field: str, ndim: int, dtypes: tuple[np.dtype, ...]) -> None:
  if value is None or not hasattr(value, "shape") or not hasattr(value, "dtype"):
    raise ValueError(f"{field}: expected an array, got {type(value).__name__}")
  if value.ndim != ndim:
    raise ValueError(f"{field}: expected rank {ndim}, got shape {tuple(value.shape)}")
  if np.dtype(value.dtype) not in dtypes:
    raise ValueError(f"{field}: dtype {np.dtype(value.dtype).name} not in "
                     f"{', '.join(d.name for d in dtypes)}")


def value_dtype_of(name: str | np.dtype) -> np.dtype:
  """`"float16"` / `"bfloat16"` / `"float32"` (or such a dtype) -> the dtype; else ValueError."""
  key = np.dtype(name).name if not isinstance(name, str) else name
  if key not in VALUE_DTYPES:
    raise ValueError(f"value_dtype: {name!r} not in {', '.join(VALUE_DTYPES)}")
  return np.dtype(VALUE_DTYPES[key])


def _shifted_logsumexp(z: jax.Array, top_id: jax.Array, temperature: jax.Array) -> jax.Array:
  """log sum_v exp(z_v / T) for (B, T, V) logits whose entry `top_id` is the row max, exactly 0.

  Computed as log1p(sum_{v != top} exp(z_v / T)): full relative precision when
  one token dominates, so the tail mass 1 - sum_i p_i derived from it is exact.
  """
  x = z / temperature
  is_top = jnp.arange(z.shape[-1]) == top_id[..., None]
  return jnp.log1p(jnp.sum(jnp.where(is_top, 0.0, jnp.exp(x)), axis=-1))


def compute_targets(logits: jax.Array, *, k: int, temperatures: Array | Sequence[float],
                    true_vocab_size: int, value_dtype: str | np.dtype = "float16",
                    states: Mapping[str, jax.Array] | None = None,
                    state_layers: Sequence[int] = (),
                    state_dtype: str | np.dtype | None = None, num_samples: int = 0,
                    sample_temperature: Array | float = 1.0, sample_seed: Array | int = 0,
                    example_ids: Array | None = None, sample_exclude: Array | int = 0,
                    sample_counts: Array | None = None, sample_start: Array | int = 0) -> TeacherTargets:
  """Top-k, per-temperature logsumexp and optional samples of teacher logits; pure jnp, under jit.

  `compute_targets_from_hidden` gives the same answer from the final hidden states, one block of
  positions at a time, without whole (B, T, V) logits.

  Args:
    logits: (B, T, V) teacher logits (any float dtype; computed in f32).
    k: how many ids to keep (static; 1 <= k <= true_vocab_size).
    temperatures: (n_temps,) temperatures (may be traced; n_temps is static).
    true_vocab_size: ids >= this are padding; their logits are set to -inf.
    value_dtype: dtype of `topk_logits`: float16 (recommended), bfloat16 or float32.
    states: optional name -> (L_sel, B, T, E) teacher layer states.
    state_layers: the teacher layer of each row of `states`.
    state_dtype: optional cast for the states (default: unchanged).
    num_samples: draw slots per position (static; 0 = no samples). See `distill_core.sampling`.
    sample_temperature: the proposal's tau > 0 (scalar or per row).
    sample_seed: the request seed: a Python int < 2**64, or its (2,) / (B, 2) uint32 words.
    example_ids: (B, 2) uint32 words of each row's example id (`sampling.split_u64`); required
      with samples.
    sample_exclude: leading top-k ids the proposal leaves out: a static int <= k (recorded as
      `sample_skip`) or a traced per-row array (then the caller records it).
    sample_counts: draws per row (<= num_samples; default num_samples).
    sample_start: the position of column 0 of `logits` in its rows (the draws are keyed by
      position; nonzero when `logits` are one block of positions).
  """
  if logits.ndim != 3:
    raise ValueError(f"logits: expected rank 3 (B, T, V), got shape {tuple(logits.shape)}")
  vocab = logits.shape[-1]
  if not 0 < true_vocab_size <= vocab:
    raise ValueError(f"true_vocab_size: {true_vocab_size} not in [1, {vocab}]")
  if not 0 < k <= true_vocab_size:
    raise ValueError(f"k: {k} not in [1, true_vocab_size={true_vocab_size}]")
  dtype = value_dtype_of(value_dtype)
  temps = jnp.asarray(temperatures, jnp.float32).reshape(-1)  # (n_temps,)
  z = logits.astype(jnp.float32)
  if true_vocab_size < vocab:
    z = jnp.where(jnp.arange(vocab) < true_vocab_size, z, -jnp.inf)
  z = z - jnp.max(z, axis=-1, keepdims=True)  # (B, T, V), row max exactly 0
  vals, ids = jax.lax.top_k(z, k)  # (B, T, k)
  # The row's first maximum, as ids[..., 0] is; taken with argmax rather than from top_k's output,
  # which on CPU keeps XLA from fusing the sort into every logsumexp pass (about 20x slower).
  top = jnp.argmax(z, axis=-1)  # (B, T)
  lse = jnp.stack([_shifted_logsumexp(z, top, temps[j]) for j in range(temps.shape[0])], axis=-1)
  layer_states = _layer_states(states, state_layers, state_dtype)
  targets = TeacherTargets(topk_ids=ids.astype(jnp.int32), topk_logits=vals.astype(dtype),
                           logsumexp=lse, temperatures=temps, layer_states=layer_states,
                           state_layers=tuple(int(x) for x in state_layers) if layer_states else ())
  if not num_samples:
    return targets
  if example_ids is None:
    raise ValueError("example_ids: required with num_samples > 0 (the draws are keyed by example id)")
  static_skip = isinstance(sample_exclude, (int, np.integer))
  if static_skip and not 0 <= sample_exclude <= min(k, true_vocab_size - 1):
    raise ValueError(f"sample_exclude: {sample_exclude} not in [0, min(k={k}, true_vocab_size - 1)]")
  if isinstance(sample_seed, (int, np.integer)):
    sample_seed = sampling.split_u64(np.asarray(sample_seed))
  b = z.shape[0]
  sids, counts, slogits, slse = sampling.draw_samples(
      z, targets.topk_ids, num_draws=num_samples,
      num_samples=num_samples if sample_counts is None else sample_counts, temperature=sample_temperature,
      exclude=sample_exclude, seeds=jnp.reshape(jnp.asarray(sample_seed, jnp.uint32), (-1, 2)),
      example_ids=jnp.reshape(jnp.asarray(example_ids, jnp.uint32), (b, 2)), start=sample_start)
  tau = jnp.reshape(jnp.asarray(sample_temperature, jnp.float32), (-1,))[0]
  return targets.replace(sample_ids=sids, sample_counts=counts, sample_logits=slogits.astype(dtype),
                         sample_logsumexp=slse, sample_temperature=tau,
                         sample_skip=int(sample_exclude) if static_skip else 0)


def _layer_states(states: Mapping[str, jax.Array] | None, state_layers: Sequence[int],
                  state_dtype: str | np.dtype | None) -> dict[str, jax.Array]:
  """The teacher's layer states by name, cast to `state_dtype` (unchanged when None)."""
  if not states:
    return {}
  if not state_layers:
    raise ValueError("state_layers: required when states are given")
  out = {}
  for name, value in states.items():
    if name not in STATE_NAMES:
      raise ValueError(f"states: unknown state {name!r} (known: {', '.join(STATE_NAMES)})")
    out[name] = value if state_dtype is None else value.astype(value_dtype_of(state_dtype))
  return out


def compute_targets_from_hidden(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], *,
                                chunk_size: int | None, states: Mapping[str, jax.Array] | None = None,
                                state_layers: Sequence[int] = (), state_dtype: str | np.dtype | None = None,
                                **kwargs) -> TeacherTargets:
  """`compute_targets(head(hidden), ...)` computed per block of `chunk_size` positions.

  Each block runs the lm_head, the top-k, the logsumexp per temperature and the draws on its
  own (B, chunk_size, V) logits, so no (B, T, V) array ever exists: the temporaries are
  O(B x chunk_size x V). T is padded up to a multiple of chunk_size (the padded positions are
  computed and dropped). Every position's answer is the one `compute_targets` gives it on the
  whole logits, samples included (they are keyed by position, not by block).

  Args:
    hidden: (B, T, E) the teacher's final hidden states (after the final norm).
    head: (B, C, E) -> (B, C, V) logits (the teacher's lm_head).
    chunk_size: positions per block; 0 or None (or >= T): one block.
    states, state_layers, state_dtype: as in `compute_targets` (passed through, not chunked).
    **kwargs: every other argument of `compute_targets` (k, temperatures, true_vocab_size, ...).
  """
  layer_states = _layer_states(states, state_layers, state_dtype)
  layers = tuple(int(x) for x in state_layers) if layer_states else ()
  b, t = hidden.shape[:2]
  if not chunk_size or chunk_size >= t:
    return compute_targets(head(hidden), **kwargs).replace(layer_states=layer_states, state_layers=layers)
  n = -(-t // chunk_size)
  padded = jnp.pad(hidden, ((0, 0), (0, n * chunk_size - t), (0, 0)))
  blocks = jnp.moveaxis(padded.reshape(b, n, chunk_size, hidden.shape[-1]), 1, 0)  # (n, B, C, E)
  starts = jnp.arange(n, dtype=jnp.int32) * chunk_size

  def block(args):
    h, start = args
    return compute_targets(head(h), sample_start=start, **kwargs)

  stacked = jax.lax.map(block, (blocks, starts))  # every leaf gains a leading (n,) axis

  def merge(x):  # (n, B, C, ...) -> (B, T, ...)
    return jnp.moveaxis(x, 0, 1).reshape((b, n * chunk_size) + x.shape[3:])[:, :t]

  fields = {name: merge(getattr(stacked, name)) for name in POSITIONAL_FIELDS
            if getattr(stacked, name) is not None}
  tau = None if stacked.sample_temperature is None else stacked.sample_temperature[0]
  return stacked.replace(temperatures=stacked.temperatures[0], sample_temperature=tau,
                         layer_states=layer_states, state_layers=layers, **fields)


def to_numpy(targets: TeacherTargets) -> dict[str, np.ndarray]:
  """Flat host arrays: the fields by name, states as `layer_states.<name>`, layers as int32."""
  out = {"topk_ids": np.asarray(targets.topk_ids), "topk_logits": np.asarray(targets.topk_logits),
         "logsumexp": np.asarray(targets.logsumexp), "temperatures": np.asarray(targets.temperatures),
         "state_layers": np.asarray(targets.state_layers, np.int32).reshape(-1)}
  for name, value in targets.layer_states.items():
    out[_STATES_PREFIX + name] = np.asarray(value)
  if targets.dense_logits is not None:
    out["dense_logits"] = np.asarray(targets.dense_logits)
  if targets.dense_hidden is not None:
    raise ValueError("dense_hidden: an in-process teacher's hidden states and lm_head are not stored or sent")
  if targets.has_samples:
    out.update({name: np.asarray(getattr(targets, name)) for name in SAMPLE_FIELDS})
    out["sample_skip"] = np.asarray(targets.sample_skip, np.int32)
  return out


def from_numpy(arrays: Mapping[str, np.ndarray], *, validate: bool = True) -> TeacherTargets:
  """Inverse of `to_numpy`; raises ValueError on missing or unknown keys and bad shapes."""
  required = ("topk_ids", "topk_logits", "logsumexp", "temperatures")
  missing = [key for key in required if key not in arrays]
  if missing:
    raise ValueError(f"teacher targets: missing {', '.join(missing)}")
  known = set(required) | {"state_layers", "dense_logits", "sample_skip"} | set(SAMPLE_FIELDS)
  states = {}
  for key, value in arrays.items():
    if key.startswith(_STATES_PREFIX):
      states[key[len(_STATES_PREFIX):]] = value
    elif key not in known:
      raise ValueError(f"teacher targets: unknown field {key!r}")
  layers = tuple(int(x) for x in np.asarray(arrays.get("state_layers", ()), np.int64).reshape(-1))
  targets = TeacherTargets(
      topk_ids=arrays["topk_ids"], topk_logits=arrays["topk_logits"], logsumexp=arrays["logsumexp"],
      temperatures=arrays["temperatures"], layer_states=states, state_layers=layers,
      dense_logits=arrays.get("dense_logits"), sample_skip=int(arrays.get("sample_skip", 0)),
      **{name: arrays.get(name) for name in SAMPLE_FIELDS})
  return targets.validate() if validate else targets


def slice_batch(targets: TeacherTargets, start: int, stop: int) -> TeacherTargets:
  """Rows [start, stop) of the batch (states are sliced on their B axis, axis 1)."""
  return targets.map_rows(lambda x, axis: x[(slice(None),) * axis + (slice(start, stop),)])


def concat(parts: Sequence[TeacherTargets]) -> TeacherTargets:
  """Concatenates along B; parts must agree on k, temperatures, states, layers and sampling."""
  if not parts:
    raise ValueError("concat: no targets given")
  first = parts[0]
  for i, part in enumerate(parts[1:], start=1):
    if part.state_layers != first.state_layers or set(part.layer_states) != set(first.layer_states):
      raise ValueError(f"concat: part {i} has states {sorted(part.layer_states)} at layers "
                       f"{part.state_layers}, part 0 has {sorted(first.layer_states)} "
                       f"at {first.state_layers}")
    if not np.array_equal(np.asarray(part.temperatures), np.asarray(first.temperatures)):
      raise ValueError(f"concat: part {i} temperatures differ from part 0")
    if (part.dense_logits is None) != (first.dense_logits is None) or (
        (part.dense_hidden is None) != (first.dense_hidden is None)):
      raise ValueError(f"concat: part {i} disagrees with part 0 on dense_logits / dense_hidden")
    if part.has_samples != first.has_samples or part.sample_skip != first.sample_skip or (
        first.has_samples and not np.array_equal(np.asarray(part.sample_temperature),
                                                 np.asarray(first.sample_temperature))):
      raise ValueError(f"concat: part {i} disagrees with part 0 on the sampled targets")
  xp = np if all(isinstance(p.topk_ids, np.ndarray) for p in parts) else jnp
  per_part = []
  for part in parts:  # map_rows visits the arrays in a fixed order
    arrays: list = []
    part.map_rows(lambda x, axis, arrays=arrays: arrays.append((x, axis)) or x)
    per_part.append(arrays)
  it = iter([xp.concatenate([arrays[j][0] for arrays in per_part], axis=per_part[0][j][1])
             for j in range(len(per_part[0]))])
  return first.map_rows(lambda x, axis: next(it))
