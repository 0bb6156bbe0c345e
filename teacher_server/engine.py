"""The JAX engine: a teacher ``Transformer`` behind a few compiled bucket shapes.

One jitted function runs the forward up to the final norm and then
``distill_core.targets.compute_targets_from_hidden`` (lm_head, padded vocabulary
masked, logits shifted by the row max, top ``max_k``, logsumexp at every row's
own temperatures) on the device, one block of ``chunk_size`` positions at a time
so that no (B, T, V) logits exist, and lays its results out so that the host can
copy exactly what a batch's ``Fetch`` names and nothing else:

* the top-k ids and values are split along k at the boundaries of
  ``k_ladder(max_k)`` (1, 2, 4, ..., max_k; top-k output is sorted, so the first
  chunks are the top k), the values already cast to each value dtype;
* every selectable layer's state is its own output array, already cast to the
  batch's state dtype.

The host then copies the first chunks up to ``fetched_k(k)`` in one value dtype
and only the (state, layer) arrays asked for; the rest is freed on the device.

Batches whose requests ask for another teacher-target part (``distill_core.parts``,
e.g. sampled targets) compute it in the same program, with each row's inputs
(``Part.engine_inputs``: per-row or per-position arrays of fixed per-bucket shapes
from the part's limits) as traced inputs; a part's slotted outputs
(``Part.engine_slots``) are split along a ladder of their own, so only the slots
the batch's largest request needs leave the device.

Compiled programs are bounded: one per (bucket, state dtype or none, set of other
parts offered), i.e. at most ``len(buckets) * (1 + len(STATE_DTYPES)) * 2**parts``,
all compiled at warm-up. k, value dtype, layers, state names, temperatures and the
parts' inputs of a request never cause a recompilation: k and the value dtype only
choose which outputs are copied, layers and names too, and temperatures and the
parts' inputs are traced arrays of fixed shapes.

Parameter names (GetParameters) are the model's ``nnx`` paths joined by dots,
e.g. ``layers.0.self_attn.q_proj.kernel`` with shape (E, H, D); with
``scan_layers`` the layers are stacked: ``layers.self_attn.q_proj.kernel`` (L, E, H, D).
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tokenizers
from flax import nnx

from distill_core import checkpoints, memory, wire
from distill_core.config import build, resolve_preset
from distill_core.model.config import ModelConfig
from distill_core.model.transformer import Transformer
from distill_core.parts import BY_NAME, PARTS, limit_values
from distill_core.sharding import (MeshConfig, batch_parallelism, batch_sharding, make_mesh, rules_table, shard_batch,
                                   state_shardings, traced_on)
from distill_core.targets import compute_targets_from_hidden
from distill_core.tokenizer import fingerprint_of
from teacher_server.config import ModelSourceConfig, ServerConfig
from teacher_server.engine_api import (Engine, EngineBatch, EngineInfo, EngineOutput, Fetch, NamePattern,
                                       check_batch_shape, fetched_k, k_ladder)

log = logging.getLogger(__name__)
DEFAULT_CHUNK_SIZE = 512  # positions per block of lm_head + top-k + logsumexp (ServerConfig.logits_chunk_size)


def load_teacher(src: ModelSourceConfig) -> Transformer:
  """The teacher model from a Hugging Face folder, an Orbax checkpoint or a preset + seed."""
  if src.source == "hf":
    return checkpoints.load_model(hf_checkpoint=src.path, **src.overrides)
  if src.source == "orbax" and (Path(src.path) / "model_config.json").is_file():
    return checkpoints.load_model(orbax_checkpoint=src.path, **src.overrides)
  cfg = build(ModelConfig, {**resolve_preset(src.preset), **src.overrides}, source=f"model preset {src.preset}")
  if src.source == "preset":
    return checkpoints.load_model(cfg, seed=src.seed)
  if "preset" not in src.model_fields_set:
    raise ValueError(f"model.path {src.path} has no model_config.json: name the architecture with model.preset")
  abstract = checkpoints.abstract_model(cfg)  # bare Orbax checkpoint of nnx.state(model)
  graphdef, abstract_state = nnx.split(abstract)
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(Path(src.path).resolve(), abstract_state)
  return nnx.merge(graphdef, state)


def parameter_items(model: Transformer) -> Iterator[tuple[str, nnx.Variable]]:
  """``("layers.0.self_attn.q_proj.kernel", variable)`` for every parameter, sorted by name."""
  flat = [(".".join(map(str, path)), var) for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  return iter(sorted(flat, key=lambda item: item[0]))


def weights_fingerprint(model: Transformer) -> str:
  """sha256 over every parameter's name, dtype, shape and little-endian bytes."""
  return checkpoints.arrays_fingerprint((name, var[...]) for name, var in parameter_items(model))


def tokenizer_fingerprint(path: str | None) -> str:
  """The project's tokenizer fingerprint of a tokenizer.json, or "" without one."""
  return fingerprint_of(tokenizers.Tokenizer.from_file(str(path))) if path else ""


def row_targets(hidden: jax.Array, temperatures: jax.Array, inputs: Mapping[str, Any] | None = None, *, head,
                chunk_size: int | None, k: int, true_vocab_size: int, limits: Mapping[str, int] | None = None):
  """Targets for one row: hidden (T, E), temperatures (n,) -> ids, values (T, k), lse (T, n), and
  {part: {field: (T, ...)}} of the other parts asked for.

  `head` maps (1, C, E) final hidden states to (1, C, V) logits; it runs per block of
  `chunk_size` positions (`compute_targets_from_hidden`), so the row's (T, V) logits never
  exist whole. `inputs`: part name -> this row's engine inputs of that part (`Part.engine_inputs`
  without the row axis), turned into `compute_targets` arguments by the part (`Part.engine_args`).
  """
  inputs, limits = inputs or {}, limits or {}
  args = {}
  for name, row in inputs.items():
    args.update(BY_NAME[name].engine_args(row, limits))
  t = compute_targets_from_hidden(hidden[None], head, chunk_size=chunk_size, k=k, temperatures=temperatures,
                                  true_vocab_size=true_vocab_size, value_dtype="float32", **args)
  parts = {name: {field: getattr(t.parts[name], field)[0] for field in BY_NAME[name].positional}
           for name in inputs}
  return t.topk_ids[0], t.topk_logits[0], t.logsumexp[0], parts


class JaxEngine(Engine):
  """Serves ``model`` at fixed bucket shapes on a device mesh.

  Args:
    model: the teacher.
    buckets: (batch, length) shapes; each batch must divide by the mesh size.
    max_k: top-k computed for every position.
    max_temperatures: logsumexp columns computed for every position.
    selectable_layers: layers whose states may be requested.
    state_names: states offered ("attn_in", "attn_out").
    mesh: device mesh config (default: all devices, data parallel).
    tokenizer_fingerprint: reported by GetInfo.
    chunk_size: positions per block of the lm_head, top-k, logsumexp and the other parts (0 or None: the
      whole row at once); the logits temporaries are O(B x chunk_size x V), not O(B x T x V).
    devices: the mesh's devices (default: all). With an abstract `model`
      (`checkpoints.abstract_model`) and a TPU topology's compile-only devices, the engine's
      programs can be compiled (`lower`) for a slice this machine does not have, never run.
    part_limits: the other parts' limits by name (`Part.limits`, the server config's `limits` of those names);
      a part whose limits are 0 is not offered.
  """

  def __init__(self, model: Transformer, *, buckets, max_k: int, max_temperatures: int,
               selectable_layers, state_names, mesh: MeshConfig | None = None, tokenizer_fingerprint: str = "",
               chunk_size: int | None = DEFAULT_CHUNK_SIZE, devices=None, **part_limits: int):
    cfg: ModelConfig = model.cfg
    known = {name for part in PARTS for name in part.limits}
    if set(part_limits) - known:
      raise TypeError(f"JaxEngine: unknown part limits {sorted(set(part_limits) - known)} (known: {sorted(known)})")
    selectable = tuple(range(cfg.num_hidden_layers)) if selectable_layers == "all" else tuple(selectable_layers)
    bad = [i for i in selectable if not 0 <= i < cfg.num_hidden_layers]
    if bad or len(set(selectable)) != len(selectable):
      raise ValueError(f"limits.selectable_layers {list(selectable)}: must be distinct layers in "
                       f"[0, {cfg.num_hidden_layers})")
    buckets = tuple(sorted((int(b), int(t)) for b, t in buckets))
    if max(t for _, t in buckets) > cfg.max_position_embeddings:
      raise ValueError(f"bucket length {max(t for _, t in buckets)} exceeds the model's "
                       f"max_position_embeddings {cfg.max_position_embeddings}")
    self._mesh = make_mesh(mesh or MeshConfig(), devices)
    self._memory_budget = (mesh or MeshConfig()).device_memory_bytes
    n_dev = batch_parallelism(self._mesh)
    if any(b % n_dev for b, _ in buckets):
      raise ValueError(f"every bucket batch must divide by the mesh size {n_dev} (data x fsdp: devices taking "
                       f"distinct rows): {list(buckets)}")
    graphdef, state = nnx.split(model)
    abstract = all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(state))
    start = time.perf_counter()
    self._info = EngineInfo(
        model_type=cfg.model_type, vocab_size=cfg.real_vocab_size, padded_vocab_size=cfg.vocab_size,
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.dim_per_head, max_position_embeddings=cfg.max_position_embeddings,
        buckets=tuple(sorted(buckets, key=lambda bt: (bt[1], bt[0]))),
        max_k=min(max_k, cfg.real_vocab_size), max_temperatures=max_temperatures,
        selectable_layers=selectable, state_names=tuple(state_names),
        weights_fingerprint="" if abstract else weights_fingerprint(model),
        tokenizer_fingerprint=tokenizer_fingerprint,
        part_limits={name: int(part_limits.get(name, 0)) for name in sorted(known)})
    log.info("weights fingerprint %s (%.1f s)", self._info.weights_fingerprint[:16], time.perf_counter() - start)
    self._graphdef = graphdef
    shardings = state_shardings(state, self._mesh, rules_table(mesh or MeshConfig()))
    self._state = (jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
                   if abstract else jax.device_put(state, shardings))
    if chunk_size is not None and chunk_size < 0:
      raise ValueError(f"logits_chunk_size: {chunk_size} must be >= 0 (0: no chunking)")
    self._chunk_size = chunk_size
    self._chunks = _chunks(k_ladder(self._info.max_k))
    limits = self._info.part_limits
    self._offered = tuple(part.name for part in PARTS if part.offered(limits))
    self._slot_chunks = {name: _chunks(k_ladder(BY_NAME[name].max_slots(limits))) for name in self._offered}
    # Traced on the mesh: `attention: auto` builds for its platform, splash runs in shard_map over it.
    self._fn = jax.jit(traced_on(self._mesh, self._forward), static_argnames=("state_dtype",))
    self.last_host_bytes = 0  # bytes copied to the host by the latest forward

  @classmethod
  def from_config(cls, cfg: ServerConfig) -> "JaxEngine":
    """Loads the model named by ``cfg.model`` and builds the engine."""
    start = time.perf_counter()
    model = load_teacher(cfg.model)
    log.info("loaded %s teacher (%s) in %.1f s", cfg.model.source, cfg.model.path or cfg.model.preset,
             time.perf_counter() - start)
    tok_path = cfg.tokenizer_path
    if tok_path is None and cfg.model.source == "hf" and (Path(cfg.model.path) / "tokenizer.json").is_file():
      tok_path = str(Path(cfg.model.path) / "tokenizer.json")
    lim = cfg.limits
    return cls(model, buckets=cfg.batcher.buckets, max_k=lim.max_k, max_temperatures=lim.max_temperatures,
               selectable_layers=lim.selectable_layers, state_names=lim.state_names, mesh=cfg.mesh,
               tokenizer_fingerprint=tokenizer_fingerprint(tok_path), chunk_size=cfg.logits_chunk_size,
               **limit_values(lim))

  @property
  def info(self) -> EngineInfo:
    return self._info

  def _forward(self, state, tokens, segment_ids, positions, temperatures, part_inputs, *, state_dtype: str | None):
    """Device outputs: id chunks, {value dtype: value chunks}, lse, {state: per-layer arrays} and, for every
    other part in `part_inputs` (name -> its engine inputs), {field: output} with slotted fields split along
    the part's ladder and value fields as {value dtype: ...}."""
    model = nnx.merge(self._graphdef, state)
    info = self._info
    layers = info.selectable_layers if state_dtype else ()
    out = model.hidden_states(tokens, positions, segment_ids, state_layers=layers, state_names=info.state_names)
    per_row = jax.vmap(lambda h, tp, inputs: row_targets(h, tp, inputs, head=model.logits_from_hidden,
                                                         chunk_size=self._chunk_size, k=info.max_k,
                                                         true_vocab_size=info.vocab_size, limits=info.part_limits))
    ids, values, lse, parts = per_row(out.hidden, temperatures, part_inputs)  # (B, T, K), (B, T, K), (B, T, n)
    id_chunks = tuple(ids[..., a:b] for a, b in self._chunks)
    value_chunks = {name: tuple(values[..., a:b].astype(name) for a, b in self._chunks)
                    for name in wire.VALUE_DTYPES}
    states = {name: tuple(v[i].astype(state_dtype) for i in range(len(layers))) for name, v in out.states.items()}
    laid_out = {}
    for name, fields in parts.items():
      part, chunks = BY_NAME[name], self._slot_chunks[name]
      split = (lambda x: tuple(x[..., a:b] for a, b in chunks)) if part.engine_slots else (lambda x: x)

      def lay(field, x, part=part, split=split):
        x = split(x) if field in part.engine_slots else x
        if field in part.engine_values:
          return {dtype: jax.tree.map(lambda y: y.astype(dtype), x) for dtype in wire.VALUE_DTYPES}
        return x

      laid_out[name] = {field: lay(field, x) for field, x in fields.items()}
    return id_chunks, value_chunks, lse, states, laid_out

  def _variants(self) -> list[tuple[int, int, str | None, tuple[str, ...]]]:
    offered = self._info.selectable_layers and self._info.state_names
    state_dtypes = (None, *wire.STATE_DTYPES) if offered else (None,)
    part_sets = [names for n in range(len(self._offered) + 1) for names in itertools.combinations(self._offered, n)]
    return [(b, t, d, names) for b, t in self._info.buckets for d in state_dtypes for names in part_sets]

  def _warmup_batch(self, b: int, t: int, state_dtype: str | None, names: tuple[str, ...]) -> EngineBatch:
    info = self._info
    ones = np.ones((b, t), np.int32)
    states = dict(layers=info.selectable_layers[:1], states=info.state_names[:1],
                  state_dtype=state_dtype) if state_dtype else {}
    inputs = {name: BY_NAME[name].engine_inputs(b, t, info.part_limits) for name in names}
    return EngineBatch(np.zeros((b, t), np.int32), ones, np.cumsum(ones, axis=1, dtype=np.int32) - 1,
                       np.ones((b, info.max_temperatures), np.float32),
                       Fetch(k=info.max_k, parts={name: 1 for name in names}, **states), inputs)

  def programs(self) -> list[tuple[str, jax.stages.Lowered]]:
    """(name, lowered program) of every variant `warmup` compiles, from shapes alone (nothing runs).

    The arguments are those `forward` passes to the same jitted function, as
    `jax.ShapeDtypeStruct`s with the mesh's shardings, so `.compile()` gives the
    very program a batch of that bucket runs.
    """
    out = []
    for b, t, state_dtype, names in self._variants():
      batch = self._warmup_batch(b, t, state_dtype, names)
      spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(self._mesh, x.ndim))  # noqa: E731
      inputs = tuple(spec(x) for x in (batch.tokens, batch.segment_ids, batch.positions, batch.temperatures))
      part_inputs = jax.tree.map(lambda x: spec(np.asarray(x)), batch.part_inputs)
      out.append((_variant_name(b, t, state_dtype, names),
                  self._fn.lower(self._state, *inputs, part_inputs, state_dtype=state_dtype)))
    return out

  def check_memory(self) -> list[memory.ProgramMemory]:
    """Compiles every variant ahead and stops (MemoryBudgetError, one line) if one exceeds a device's memory.

    The budget is `mesh.device_memory_bytes` or the device's own limit; with
    neither (CPU) nothing is compiled here. The compiled programs stay in JAX's
    cache, so the warm-up's forwards do not compile them again.
    """
    device = self._mesh.devices.flat[0]
    if memory.device_budget(device, self._memory_budget)[0] is None:
      return []
    compiled = ((name, lowered.compile()) for name, lowered in self.programs())
    return memory.compiled_programs_fit(compiled, device, self._memory_budget, where="teacher engine bucket",
                                        knobs=memory.ENGINE_KNOBS)

  def warmup(self) -> dict[str, float]:
    for program in self.check_memory():  # before anything is allocated: a start that cannot fit stops here
      log.info("bucket %s: %s", program.name, program.summary())
    timings = {}
    for variant in self._variants():
      start = time.perf_counter()
      self.forward(self._warmup_batch(*variant))
      timings[_variant_name(*variant)] = time.perf_counter() - start
    return timings

  def forward(self, batch: EngineBatch) -> EngineOutput:
    check_batch_shape(self._info, batch)
    fetch, info = batch.fetch, self._info
    inputs = shard_batch((batch.tokens, batch.segment_ids, batch.positions, batch.temperatures), self._mesh)
    part_inputs = shard_batch(dict(batch.part_inputs), self._mesh)
    state_dtype = fetch.state_dtype.name if fetch.with_states else None
    id_chunks, value_chunks, lse, states, parts = self._fn(self._state, *inputs, part_inputs, state_dtype=state_dtype)
    n = k_ladder(info.max_k).index(fetched_k(fetch.k, info.max_k)) + 1  # chunks to copy
    rows = {layer: info.selectable_layers.index(layer) for layer in fetch.layers}
    wanted_parts = {}
    for name, slots in fetch.parts:
      part = BY_NAME[name]
      ladder = k_ladder(part.max_slots(info.part_limits)) if part.engine_slots else ()
      m = ladder.index(fetched_k(slots, ladder[-1])) + 1 if ladder else 0
      wanted_parts[name] = {}
      for field, x in parts[name].items():
        x = x[fetch.value_dtype.name] if field in part.engine_values else x
        wanted_parts[name][field] = x[:m] if field in part.engine_slots else x
    wanted = (id_chunks[:n], value_chunks[fetch.value_dtype.name][:n], lse,
              {name: {layer: states[name][i] for layer, i in rows.items()} for name in fetch.states}, wanted_parts)
    ids, values, lse, states, host_parts = jax.device_get(wanted)  # the only device -> host copy
    out = EngineOutput(topk_ids=np.concatenate(ids, axis=-1), topk_logits=np.concatenate(values, axis=-1),
                       logsumexp=np.asarray(lse), states=states)
    for name, fields in host_parts.items():
      part = BY_NAME[name]
      out.parts[name] = {field: np.concatenate(x, axis=-1) if field in part.engine_slots else np.asarray(x)
                         for field, x in fields.items()}
    self.last_host_bytes = out.nbytes
    return out

  def parameters(self, pattern: NamePattern) -> Iterator[tuple[str, np.ndarray]]:
    for name, var in parameter_items(nnx.merge(self._graphdef, self._state)):
      if pattern.search(name):
        yield name, var[...]  # a device array: the servicer copies it to the host only if it sends the bytes

  def compilations(self) -> int:
    return self._fn._cache_size()  # noqa: SLF001 - jitted-function cache: one entry per compiled variant


def _variant_name(b: int, t: int, state_dtype: str | None, names: tuple[str, ...]) -> str:
  return f"{b}x{t}{'+' + state_dtype if state_dtype else ''}{''.join('+' + name for name in names)}"


def _chunks(ladder: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """[(0, 1), (1, 2), (2, 4), ...]: the k ranges between consecutive ladder entries."""
  return tuple(zip((0, *ladder[:-1]), ladder))
