"""Generation with a KV cache: one prefill over the prompts, then a decode loop, batched and jitted.

Shapes: B rows, P the prompt bucket, N = max_new_tokens, S = P + N - 1 cache
columns, L layers, K kv heads, D head dim, V vocab_size.

Layout. Prompts arrive right- or left-padded in a fixed (B, P) bucket with their
lengths n (B,). Inside, every prompt is left-padded (its last token at column
P - 1), so the token fed at decode step i sits at column P + i in every row:
one `dynamic_update_slice` writes the cache, in place, and the write partitions
trivially on a batch-sharded mesh. Row r's rotary position of column c is
c - (P - n_r); a query at column c sees the keys at columns [P - n_r, c].

Attention. The prefill runs the configured kernel (`ModelConfig.attention`,
through `attention.attend`) over the (B, P) prompts with segment id 1 on the
prompt and 0 on the padding, as training does; left padding means the cuDNN
kernel's one-sequence-from-column-0 fast path does not apply where a row is
padded (`attend` then takes its chunked fallback, on the device). A decode step
has one query per row against S cached keys: the plain masked einsum
`attention.dot_product_attention` reads the cache once, which is all a single
query needs; the blocked kernels pay off only for long query blocks.

Sampling. Each row draws from softmax(logits / temperature) restricted to its
top-p nucleus (`draw_tokens`; temperature 0 = greedy), ids at or above the
model's real vocabulary excluded. Row r's key is a function of (seed, step,
example id) only (`key_data`), and token t of the row uses fold_in(key_r, t):
a row's samples depend on nothing else in the batch, so a resumed run, another
batch composition or another mesh regenerates the same tokens.

A row ends after N new tokens or at its first stop id (which is kept and
counted in its length, like an end-of-document token); everything after it is
`pad_id`. The loop ends early once every row has ended.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distill_core.model.attention import attend, dot_product_attention
from distill_core.model.layers import LAYERS_AXIS
from distill_core.model.rope import inverse_frequencies, rope_tables
from distill_core.model.transformer import Transformer
from distill_core.sampling import split_u64
from distill_core.sharding import (BATCH_AXES, DEFAULT_RULES, batch_parallelism, logical_to_spec, shard_batch,
                                   traced_on)

Padding = Literal["left", "right"]
PADDINGS = ("left", "right")


class KVCache(NamedTuple):
  """Rotated keys and values of every layer: k, v (L, B, S, K, D) in the model's compute dtype."""

  k: jax.Array
  v: jax.Array


class Generation(NamedTuple):
  """What `make_sampler`'s function returns (all batch-major, B rows).

  tokens: (B, P + N) int32, each row packed from column 0: its prompt (prompt_lengths), its
    generated tokens (lengths), then pad_id.
  prompt_lengths: (B,) int32.
  lengths: (B,) int32 generated tokens, a stop id included.
  logprobs: (B, N) float32 log-probability of each generated token under the model (logits at
    temperature 1 over the real vocabulary, before top-p), 0 past a row's end.
  topk_ids: (B, N, k) int32 with `make_sampler(..., topk=k)`: the model's k most probable ids (real
    vocabulary, descending logits) in the distribution each generated token was drawn from, pad_id past
    a row's end; None when k = 0.
  sampler_logprobs: (B, N) float32 log mu of each generated token under the distribution it was drawn
    from (softmax(logits / temperature) renormalised over the top-p nucleus; 0 with temperature 0), 0 past
    a row's end: what an importance weight q / mu divides by (`draw_with_logprobs`).
  """

  tokens: jax.Array
  prompt_lengths: jax.Array
  lengths: jax.Array
  logprobs: jax.Array
  topk_ids: jax.Array | None = None
  sampler_logprobs: jax.Array | None = None


def key_data(seed: int, step: int, example_ids) -> np.ndarray:
  """Each row's PRNG key data (B, 2) uint32: fold_in(fold_in(fold_in(key(seed), step), id low word), id high word).

  `example_ids` (B,) non-negative integers below 2**64, split into 32-bit words on the host (where 64-bit
  ids exist). Nothing but (seed, step, example id) enters a row's key, so a row's samples do not depend
  on the batch it is in. Plain uint32 data, so it is placed and sharded like any batch array.
  """
  if not 0 <= int(step) < 2**32:
    raise ValueError(f"step {step} outside [0, 2**32)")
  words = split_u64(np.asarray(example_ids).reshape(-1))  # (B, 2) uint32
  return np.asarray(jax.random.key_data(_fold_rows(jax.random.key(seed), jnp.uint32(step), jnp.asarray(words))))


@jax.jit
def _fold_rows(base: jax.Array, step: jax.Array, words: jax.Array) -> jax.Array:
  key = jax.random.fold_in(base, step)
  return jax.vmap(lambda w: jax.random.fold_in(jax.random.fold_in(key, w[0]), w[1]))(words)


def token_keys(keys: jax.Array, index) -> jax.Array:
  """The keys of token `index` (0 = the first generated token) of each row: fold_in(row key, index)."""
  return jax.vmap(lambda k: jax.random.fold_in(k, index))(keys)


def mask_vocab(logits: jax.Array, real_vocab_size: int) -> jax.Array:
  """logits (..., V) with ids >= real_vocab_size at -inf (the rows of a padded embedding table)."""
  vocab = logits.shape[-1]
  if real_vocab_size >= vocab:
    return logits
  return jnp.where(jnp.arange(vocab) < real_vocab_size, logits, -jnp.inf)


def draw_tokens(logits: jax.Array, keys: jax.Array, temperature, top_p) -> jax.Array:
  """One id per row from softmax(logits / temperature) within the top-p nucleus; temperature 0 = argmax.

  logits (B, V) float32 (ids to exclude at -inf), keys (B,), temperature >= 0 and top_p in (0, 1] scalars
  (traced: changing them compiles nothing). The nucleus keeps, in order of probability, every id whose
  preceding mass is below top_p (so always the most probable id), and any id tied with the last one kept.
  Returns (B,) int32.
  """
  return draw_with_logprobs(logits, keys, temperature, top_p)[0]


def draw_with_logprobs(logits: jax.Array, keys: jax.Array, temperature, top_p) -> tuple[jax.Array, jax.Array]:
  """(ids, log mu(ids)): `draw_tokens`' draw and the log-probability of each drawn id under the
  distribution it was drawn from, softmax(logits / temperature) renormalised over the nucleus (the
  behaviour policy an importance weight divides by); 0 with temperature 0 (argmax is certain)."""
  logits = logits.astype(jnp.float32)
  temperature = jnp.asarray(temperature, jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
  probs = jax.nn.softmax(scaled, axis=-1)
  ordered = -jnp.sort(-probs, axis=-1)  # descending
  before = jnp.cumsum(ordered, axis=-1) - ordered
  kept = before < jnp.asarray(top_p, jnp.float32)
  threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)  # the last kept probability
  nucleus = jnp.where(probs >= threshold, scaled, -jnp.inf)
  drawn = jax.vmap(jax.random.categorical)(keys, nucleus).astype(jnp.int32)
  ids = jnp.where(temperature > 0, drawn, greedy)
  log_mu = jnp.take_along_axis(jax.nn.log_softmax(nucleus, axis=-1), ids[:, None], axis=-1)[:, 0]
  return ids, jnp.where(temperature > 0, log_mu, 0.0)


def _token_logprobs(logits: jax.Array, ids: jax.Array) -> jax.Array:
  """log softmax(logits)[id] per row: logits (B, V), ids (B,) -> (B,) float32."""
  return jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), ids[:, None], axis=-1)[:, 0]


def _layer_block(layer, x: jax.Array, attn_out_of) -> jax.Array:
  """`DecoderLayer`'s residual wiring with its attention computed by `attn_out_of(attn_in) -> (B, T, E)`:
  x + attn(norm(x)), then x + mlp(norm(x))."""
  x = x + attn_out_of(layer.input_layernorm(x))
  return x + layer.mlp(layer.post_attention_layernorm(x))


def _over_layers(model: Transformer, fn, carry):
  """Runs `fn(layer, l, carry) -> carry` over the layers in order (unrolled, or `nnx.scan` when scanned)."""
  if not model.cfg.scan_layers:
    for l, layer in enumerate(model.layers):
      carry = fn(layer, l, carry)
    return carry

  @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: LAYERS_AXIS})
  def body(carry, layer, l):
    return fn(layer, l, carry)

  return body(carry, model.layers, jnp.arange(model.cfg.num_hidden_layers))


def _rope(model: Transformer, positions: jax.Array):
  cfg = model.cfg
  return rope_tables(positions, inverse_frequencies(cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling))


def empty_cache(model: Transformer, batch: int, length: int) -> KVCache:
  """A zero cache of `length` columns for `batch` rows."""
  cfg = model.cfg
  shape = (cfg.num_hidden_layers, batch, length, cfg.num_key_value_heads, cfg.dim_per_head)
  zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
  return KVCache(zeros, zeros)


def prefill(model: Transformer, prompts: jax.Array, prompt_lengths: jax.Array, cache: KVCache
            ) -> tuple[KVCache, jax.Array]:
  """Runs left-padded prompts (B, P) through the model with the configured attention kernel.

  Writes every layer's k and v into cache columns [0, P) and returns (cache, logits (B, V) float32 at
  column P - 1, the distribution of each row's first new token).
  """
  b, p = prompts.shape
  start = p - prompt_lengths[:, None]  # (B, 1) first prompt column
  cols = jnp.arange(p, dtype=jnp.int32)[None, :]
  segment_ids = (cols >= start).astype(jnp.int32)  # (B, P): 1 on the prompt, 0 on the padding
  cos, sin = _rope(model, jnp.maximum(cols - start, 0))

  def layer_fn(layer, l, carry):
    x, k_cache, v_cache = carry
    attn = layer.self_attn
    kv = {}

    def attn_out_of(h):
      q, k, v = attn.qkv(h, cos, sin)
      kv["k"], kv["v"] = k, v
      return attn.o_proj(attend(q, k, v, segment_ids, impl=attn.impl, chunk=attn.chunk))

    x = _layer_block(layer, x, attn_out_of)
    k_cache = jax.lax.dynamic_update_slice(k_cache, kv["k"][None].astype(k_cache.dtype), (l, 0, 0, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, kv["v"][None].astype(v_cache.dtype), (l, 0, 0, 0, 0))
    return x, k_cache, v_cache

  x, k_cache, v_cache = _over_layers(model, layer_fn, (model.embed_tokens(prompts), cache.k, cache.v))
  hidden = model.norm(x[:, -1:])  # (B, 1, E)
  return KVCache(k_cache, v_cache), model.logits_from_hidden(hidden)[:, 0]


def decode_step(model: Transformer, cache: KVCache, tokens: jax.Array, column, prompt_lengths: jax.Array,
                prompt_len: int) -> tuple[KVCache, jax.Array]:
  """Feeds one token per row (B,) at cache `column` (>= prompt_len, the same in every row).

  Writes its k and v there and returns (cache, logits (B, V) float32 of the next token). Row r's token
  has rotary position column - (prompt_len - prompt_lengths[r]) and attends to columns
  [prompt_len - prompt_lengths[r], column].
  """
  b = tokens.shape[0]
  s = cache.k.shape[2]
  start = prompt_len - prompt_lengths  # (B,)
  cos, sin = _rope(model, (column - start)[:, None])  # (B, 1, D)
  keys_at = jnp.arange(s, dtype=jnp.int32)[None, None, :]  # (1, 1, S)
  mask = (keys_at >= start[:, None, None]) & (keys_at <= column)  # (B, 1, S)

  def layer_fn(layer, l, carry):
    x, k_cache, v_cache = carry
    attn = layer.self_attn
    new = {}

    def attn_out_of(h):
      q, k, v = attn.qkv(h, cos, sin)  # (B, 1, H, D), (B, 1, K, D)
      new["k"] = jax.lax.dynamic_update_slice(k_cache, k[None].astype(k_cache.dtype), (l, 0, column, 0, 0))
      new["v"] = jax.lax.dynamic_update_slice(v_cache, v[None].astype(v_cache.dtype), (l, 0, column, 0, 0))
      k_all = jax.lax.dynamic_index_in_dim(new["k"], l, 0, keepdims=False)  # (B, S, K, D)
      v_all = jax.lax.dynamic_index_in_dim(new["v"], l, 0, keepdims=False)
      return attn.o_proj(dot_product_attention(q, k_all, v_all, mask))

    x = _layer_block(layer, x, attn_out_of)
    return x, new["k"], new["v"]

  x = model.embed_tokens(tokens[:, None])  # (B, 1, E)
  x, k_cache, v_cache = _over_layers(model, layer_fn, (x, cache.k, cache.v))
  return KVCache(k_cache, v_cache), model.logits_from_hidden(model.norm(x))[:, 0]


def to_left_padding(prompts: jax.Array, prompt_lengths: jax.Array, pad_id: int) -> jax.Array:
  """Right-padded prompts (B, P) -> the same prompts left-padded (each row's tokens end at column P - 1)."""
  p = prompts.shape[1]
  src = jnp.arange(p, dtype=jnp.int32)[None, :] - (p - prompt_lengths[:, None])  # (B, P)
  taken = jnp.take_along_axis(prompts, jnp.clip(src, 0, p - 1), axis=1)
  return jnp.where(src >= 0, taken, pad_id).astype(jnp.int32)


def _packed(left: jax.Array, prompt_lengths: jax.Array, generated: jax.Array, pad_id: int) -> jax.Array:
  """Left-padded prompts (B, P) and generated tokens (B, N) (pad_id past the end) -> rows packed from
  column 0: prompt, generation, pad_id; (B, P + N)."""
  b, p = left.shape
  n = generated.shape[1]
  c = jnp.arange(p + n, dtype=jnp.int32)[None, :]
  lengths = prompt_lengths[:, None]
  from_prompt = jnp.take_along_axis(left, jnp.clip(c + p - lengths, 0, p - 1), axis=1)
  from_generated = jnp.take_along_axis(generated, jnp.clip(c - lengths, 0, n - 1), axis=1)
  return jnp.where(c < lengths, from_prompt, jnp.where(c < lengths + n, from_generated, pad_id))


def cache_sharding(mesh: Mesh, rules, model_cfg, batch: int) -> NamedSharding:
  """(L, B, S, K, D): kv heads as the rules place them, rows over the batch axes where they divide B (and
  the rules use neither for the heads)."""
  cfg = model_cfg
  shape = (cfg.num_hidden_layers, batch, 1, cfg.num_key_value_heads, cfg.dim_per_head)
  spec = list(logical_to_spec((LAYERS_AXIS, None, None, "kv_heads", "head_dim"), shape, rules, mesh))
  used = {a for axes in spec if axes is not None for a in ((axes,) if isinstance(axes, str) else axes)}
  if batch % batch_parallelism(mesh) == 0 and not used & set(BATCH_AXES):
    spec[1] = BATCH_AXES
  return NamedSharding(mesh, PartitionSpec(*spec))


def model_of(merged) -> Transformer:
  """The Transformer in what `nnx.merge` gave: a model, or a tuple such as a train state's (model, optimizer)."""
  if isinstance(merged, Transformer):
    return merged
  if isinstance(merged, tuple) and merged and isinstance(merged[0], Transformer):
    return merged[0]
  raise TypeError(f"expected a Transformer or a tuple starting with one, got {type(merged).__name__}")


def make_sampler(graphdef: nnx.GraphDef, *, max_new_tokens: int, stop_ids: Sequence[int] = (), pad_id: int = 0,
                 padding: Padding = "right", mesh: Mesh | None = None, rules=None, topk: int = 0):
  """Returns `sample(params, prompts, prompt_lengths, key_data, temperature, top_p) -> Generation`, jitted.

  `graphdef`/`params`: `nnx.split` of a Transformer, or of a tuple whose first element is one (a train
  state's `(model, optimizer)`: the optimizer is not used). prompts (B, P) int32 `padding`-padded,
  prompt_lengths (B,) in [1, P], key_data (B, 2) from `key_data`, temperature >= 0 and top_p in (0, 1]
  (traced scalars). One compilation per (B, P). With `mesh` the program is traced for it (the attention
  kernel for its platform), the cache is sharded like the batch (and kv heads by `rules`, default
  `DEFAULT_RULES`) and the results come back batch-sharded; params keep the shardings they come with.
  `topk` > 0 also returns each step's top-k ids (`Generation.topk_ids`, from the logits the step has).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if topk < 0:
    raise ValueError(f"topk must be >= 0, got {topk}")
  if padding not in PADDINGS:
    raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
  n = int(max_new_tokens)
  stops = np.asarray(sorted(set(int(i) for i in stop_ids)), np.int32)
  rules = DEFAULT_RULES if rules is None else rules

  def sample(params, prompts, prompt_lengths, key_data, temperature, top_p) -> Generation:
    model = model_of(nnx.merge(graphdef, params))
    keys = jax.random.wrap_key_data(key_data)
    cfg = model.cfg
    prompts = jnp.asarray(prompts, jnp.int32)
    lengths_in = jnp.asarray(prompt_lengths, jnp.int32)
    b, p = prompts.shape
    left = prompts if padding == "left" else to_left_padding(prompts, lengths_in, pad_id)
    cache = empty_cache(model, b, p + n - 1)
    if mesh is not None:
      cache = jax.lax.with_sharding_constraint(cache, cache_sharding(mesh, rules, cfg, b))
    cache, logits = prefill(model, left, lengths_in, cache)

    if topk > cfg.real_vocab_size:
      raise ValueError(f"topk ({topk}) exceeds the model's vocabulary ({cfg.real_vocab_size})")

    def draw(logits, index):
      logits = mask_vocab(logits, cfg.real_vocab_size)
      ids, log_mu = draw_with_logprobs(logits, token_keys(keys, index), temperature, top_p)
      top = jax.lax.top_k(logits, topk)[1].astype(jnp.int32) if topk else jnp.zeros((b, 0), jnp.int32)
      return ids, jnp.stack([_token_logprobs(logits, ids), log_mu], axis=-1), top

    def is_stop(ids):
      return jnp.isin(ids, jnp.asarray(stops)) if stops.size else jnp.zeros(ids.shape, bool)

    first, first_lp, first_top = draw(logits, 0)
    generated = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((b, n, 2), jnp.float32).at[:, 0].set(first_lp)  # log p at 1, log mu
    top_ids = jnp.full((b, n, topk), pad_id, jnp.int32).at[:, 0].set(first_top)
    init = (jnp.int32(1), cache, first, generated, logprobs, top_ids, is_stop(first), jnp.ones((b,), jnp.int32))

    def cond(state):
      i, done = state[0], state[6]
      return (i < n) & ~jnp.all(done)

    model_def, model_state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(model_state)

    def body(state):
      i, cache, last, generated, logprobs, top_ids, done, lengths = state
      # Rebuilt inside the loop: the scanned layers' nnx.scan only takes variables made at this trace level.
      step_model = nnx.merge(model_def, jax.tree.unflatten(treedef, leaves))
      cache, logits = decode_step(step_model, cache, last, p + i - 1, lengths_in, p)
      ids, lp, top = draw(logits, i)
      ids = jnp.where(done, pad_id, ids)
      generated = jax.lax.dynamic_update_index_in_dim(generated, ids, i, 1)
      logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, jnp.where(done[:, None], 0.0, lp), i, 1)
      top_ids = jax.lax.dynamic_update_index_in_dim(top_ids, jnp.where(done[:, None], pad_id, top), i, 1)
      lengths = lengths + (~done).astype(jnp.int32)
      return i + 1, cache, ids, generated, logprobs, top_ids, done | is_stop(ids), lengths

    _, _, _, generated, logprobs, top_ids, _, lengths = jax.lax.while_loop(cond, body, init)
    return Generation(_packed(left, lengths_in, generated, pad_id), lengths_in, lengths, logprobs[..., 0],
                      top_ids if topk else None, logprobs[..., 1])

  out = None
  if mesh is not None:
    rows = lambda ndim: NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))  # noqa: E731
    out = Generation(rows(2), rows(1), rows(1), rows(2), rows(3) if topk else None, rows(2))
  return jax.jit(traced_on(mesh, sample), out_shardings=out)


def check_prompts(model_cfg, prompts, prompt_lengths, max_new_tokens: int, stop_ids: Sequence[int] = ()) -> None:
  """Host-side checks of a request to the sampler; ValueError naming what is wrong."""
  shape = np.shape(prompts)
  if len(shape) != 2 or shape[1] < 1:
    raise ValueError(f"prompts must be a (B, P) array with P >= 1, got shape {shape}")
  lengths = np.asarray(prompt_lengths)
  if lengths.shape != shape[:1]:
    raise ValueError(f"prompt_lengths must have shape ({shape[0]},), got {lengths.shape}")
  if lengths.size and (lengths.min() < 1 or lengths.max() > shape[1]):
    raise ValueError(f"prompt_lengths must lie in [1, {shape[1]}], got [{lengths.min()}, {lengths.max()}]")
  if shape[1] + max_new_tokens > model_cfg.max_position_embeddings:
    raise ValueError(f"prompt length {shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
                     f"max_position_embeddings ({model_cfg.max_position_embeddings})")
  bad = [i for i in stop_ids if not 0 <= int(i) < model_cfg.real_vocab_size]
  if bad:
    raise ValueError(f"stop_ids {bad} outside the vocabulary [0, {model_cfg.real_vocab_size})")


@functools.lru_cache(maxsize=32)
def _cached_sampler(graphdef, max_new_tokens, stop_ids, pad_id, padding, mesh, topk):
  return make_sampler(graphdef, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id,
                      padding=padding, mesh=mesh, topk=topk)


def generate(model: Transformer, prompts, prompt_lengths, *, key_data, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
             padding: Padding = "right", mesh: Mesh | None = None, topk: int = 0) -> Generation:
  """`make_sampler` for `model` (kept per graph and options: one compilation per shape), checked and run.

  prompts (B, P), prompt_lengths (B,) and key_data (B, 2) (`key_data(seed, step, example_ids)`) are host
  arrays; with `mesh` they are this process's rows, placed batch-sharded (`sharding.shard_batch`), and the
  result is a global batch-sharded `Generation` (`local_rows` gives this process's rows back).
  """
  check_prompts(model.cfg, prompts, prompt_lengths, max_new_tokens, stop_ids)
  graphdef, params = nnx.split(model)
  fn = _cached_sampler(graphdef, int(max_new_tokens), tuple(int(i) for i in stop_ids), int(pad_id), padding, mesh,
                       int(topk))
  inputs = (np.asarray(prompts, np.int32), np.asarray(prompt_lengths, np.int32), np.asarray(key_data, np.uint32))
  if mesh is not None:
    inputs = shard_batch(inputs, mesh)
  return fn(params, *inputs, np.float32(temperature), np.float32(top_p))


def local_rows(x: jax.Array | None) -> np.ndarray | None:
  """This process's rows of a batch-sharded array, in order, as numpy (all rows in a single process);
  None stays None (an optional `Generation` field)."""
  if x is None:
    return None
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}  # tensor-axis replicas repeat rows
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
