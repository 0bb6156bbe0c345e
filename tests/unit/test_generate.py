"""Generation with a KV cache against a reference that re-runs the whole forward pass for every new token;
prompt sets (corpus prefixes, JSONL) and packing into a Batch."""

from __future__ import annotations

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from distill_core.config import ConfigError, build, resolve_preset
from distill_core.data import DataConfig, open_split, ordered_batches
from distill_core.generation import (GenerationConfig, Prompts, corpus_prefix, generate_batch, make_prompt_set,
                                     prefix_length, to_batch)
from distill_core.model.config import ModelConfig
from distill_core.model.generate import (Generation, decode_step, draw_tokens, empty_cache, generate, key_data,
                                         make_sampler, mask_vocab, prefill, to_left_padding, token_keys)
from distill_core.model.layout import to_scanned
from distill_core.model.transformer import create_model
from distill_core.records import read_manifest
from distill_core.sharding import MeshConfig, make_mesh, rules_table, state_shardings
from distill_core.tokenizer import Tokenizer

PAD = 0


def sharp_model(seed: int = 0, **changes):
  """The tiny model with its output head scaled up, so next-token distributions are peaked (greedy choices are
  far from ties) and 300 padded vocabulary rows beyond a real vocabulary of 300 are masked."""
  cfg = ModelConfig(**{**resolve_preset("tiny"), "true_vocab_size": 300, **changes})
  model = create_model(cfg, seed=seed)
  model.lm_head.kernel[...] = model.lm_head.kernel[...] * 40.0
  return model


@nnx.jit
def forward(model, tokens, segment_ids):
  return model(tokens, None, segment_ids).logits


def reference(model, prompts, lengths, keys, n, *, temperature, top_p, stop_ids=()):
  """The full forward pass over each row's sequence so far for every new token (right-padded rows in a
  (B, P + N) buffer); the same per-token keys and sampling function as the sampler.
  Returns (tokens (B, P + N), lengths (B,), next-token logits (N, B, V))."""
  b, p = prompts.shape
  seq = np.full((b, p + n), PAD, np.int32)
  seq[:, :p] = prompts
  seq[:, :p][np.arange(p)[None, :] >= lengths[:, None]] = PAD
  cur = lengths.astype(np.int64).copy()
  done = np.zeros(b, bool)
  generated = np.zeros(b, np.int32)
  all_logits = []
  for i in range(n):
    segments = (np.arange(p + n)[None, :] < cur[:, None]).astype(np.int32)
    logits = np.asarray(forward(model, jnp.asarray(seq), jnp.asarray(segments)))[np.arange(b), cur - 1]
    all_logits.append(logits)
    masked = mask_vocab(jnp.asarray(logits), model.cfg.real_vocab_size)
    ids = np.asarray(draw_tokens(masked, token_keys(jax.random.wrap_key_data(keys), i), temperature, top_p))
    for r in range(b):
      if not done[r]:
        seq[r, cur[r]] = ids[r]
        cur[r] += 1
        generated[r] += 1
        done[r] = ids[r] in stop_ids
  return seq, generated, np.stack(all_logits)


def right_padded(rng, lengths, p, vocab=300):
  prompts = rng.integers(1, vocab, (len(lengths), p)).astype(np.int32)
  prompts[np.arange(p)[None, :] >= np.asarray(lengths)[:, None]] = PAD
  return prompts


def run(model, prompts, lengths, keys, n, **kw):
  out = generate(model, prompts, lengths, key_data=keys, max_new_tokens=n, pad_id=PAD, **kw)
  return Generation(*(None if x is None else np.asarray(x) for x in out))


@pytest.fixture(scope="module")
def model():
  return sharp_model()


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_cached_logits_equal_the_full_forward(model, layout):
  """Teacher-forced: prefill, then decode steps feeding a fixed continuation; every step's logits are the
  full forward's at that position (rows of different prompt lengths in one batch)."""
  m = to_scanned(model) if layout == "scanned" else model
  rng = np.random.default_rng(1)
  p, n = 6, 5
  lengths = np.array([6, 2, 4], np.int32)
  prompts = right_padded(rng, lengths, p)
  continuation = rng.integers(1, 300, (3, n)).astype(np.int32)
  seq = np.full((3, p + n), PAD, np.int32)
  for r in range(3):
    seq[r, :lengths[r]] = prompts[r, :lengths[r]]
    seq[r, lengths[r]:lengths[r] + n] = continuation[r]
  full = np.asarray(forward(m, jnp.asarray(seq), jnp.asarray(seq != PAD, dtype=jnp.int32)))

  @nnx.jit
  def steps(m, prompts, lengths, continuation):
    cache, logits = prefill(m, to_left_padding(prompts, lengths, PAD), lengths, empty_cache(m, 3, p + n - 1))
    out = [logits]
    for i in range(n - 1):
      cache, logits = decode_step(m, cache, continuation[:, i], p + i, lengths, p)
      out.append(logits)
    return jnp.stack(out, axis=1)

  cached = np.asarray(steps(m, jnp.asarray(prompts), jnp.asarray(lengths), jnp.asarray(continuation)))
  for r in range(3):
    np.testing.assert_allclose(cached[r], full[r, lengths[r] - 1:lengths[r] - 1 + n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout,attention,dtype", [("unrolled", "xla", "float32"), ("scanned", "chunked", "float32"),
                                                    ("unrolled", "xla", "bfloat16")])
def test_greedy_equals_the_full_forward_reference(layout, attention, dtype):
  """The cache holds k and v in the compute dtype, so a bfloat16 model decodes as its own full forward does."""
  m = sharp_model(seed=2, attention=attention, attention_chunk=4, dtype=dtype)
  m = to_scanned(m) if layout == "scanned" else m
  rng = np.random.default_rng(2)
  lengths = np.array([5, 1, 8, 3], np.int32)
  prompts = right_padded(rng, lengths, 8)
  keys = key_data(0, 0, np.arange(4))
  out = run(m, prompts, lengths, keys, 6, temperature=0.0)
  seq, generated, logits = reference(m, prompts, lengths, keys, 6, temperature=0.0, top_p=1.0)
  np.testing.assert_array_equal(out.tokens, seq)
  np.testing.assert_array_equal(out.lengths, generated)
  np.testing.assert_array_equal(out.prompt_lengths, lengths)
  assert (generated == 6).all()
  # logprobs are the reference logits' log-softmax (real vocabulary) at the chosen ids
  ref = jax.nn.log_softmax(mask_vocab(jnp.asarray(logits), 300), axis=-1)
  chosen = np.stack([seq[r, lengths[r]:lengths[r] + 6] for r in range(4)])  # (B, N)
  expected = np.take_along_axis(np.asarray(ref).transpose(1, 0, 2), chosen[..., None], -1)[..., 0]
  tol = 1e-4 if dtype == "float32" else 5e-2
  np.testing.assert_allclose(out.logprobs, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.8)])
def test_sampled_equals_the_reference_with_the_same_keys(model, temperature, top_p):
  rng = np.random.default_rng(3)
  lengths = np.array([4, 7, 2, 5], np.int32)
  prompts = right_padded(rng, lengths, 8)
  keys = key_data(11, 3, np.array([10, 20, 30, 1 << 41]))
  out = run(model, prompts, lengths, keys, 7, temperature=temperature, top_p=top_p)
  seq, generated, logits = reference(model, prompts, lengths, keys, 7, temperature=temperature, top_p=top_p)
  np.testing.assert_array_equal(out.tokens, seq)
  np.testing.assert_array_equal(out.lengths, generated)
  # log mu: the drawn id's probability under softmax(logits / temperature) renormalised over the nucleus
  want = np.zeros((len(lengths), 7))
  for r in range(len(lengths)):
    for i in range(generated[r]):
      z = np.asarray(logits[i, r, :300], np.float64) / temperature
      probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
      kept = nucleus(probs, top_p)
      want[r, i] = np.log(probs[seq[r, lengths[r] + i]] / probs[kept].sum())
  np.testing.assert_allclose(out.sampler_logprobs, want, rtol=1e-4, atol=1e-4)
  if top_p == 1.0 and temperature == 1.0:  # no truncation, temperature 1: mu is the model's own distribution
    np.testing.assert_allclose(out.sampler_logprobs, out.logprobs, rtol=1e-5, atol=1e-5)
  greedy = run(model, prompts, lengths, keys, 7, temperature=0.0)
  assert not np.array_equal(out.tokens, greedy.tokens)  # the draws are not the argmax
  assert (out.tokens[:, :15] < 300).all()  # never an id of the padded vocabulary rows


def test_stop_ids_end_a_row_and_only_generated_tokens_are_trained(model):
  rng = np.random.default_rng(4)
  lengths = np.array([3, 6], np.int32)
  prompts = right_padded(rng, lengths, 6)
  keys = key_data(5, 0, np.array([0, 1]))
  free = run(model, prompts, lengths, keys, 8, temperature=1.0)
  stop = int(free.tokens[0, lengths[0] + 2])  # row 0's third new token
  first = list(free.tokens[0, lengths[0]:]).index(stop)
  out = run(model, prompts, lengths, keys, 8, temperature=1.0, stop_ids=[stop])
  seq, generated, _ = reference(model, prompts, lengths, keys, 8, temperature=1.0, top_p=1.0, stop_ids=(stop,))
  np.testing.assert_array_equal(out.tokens, seq)
  np.testing.assert_array_equal(out.lengths, generated)
  assert out.lengths[0] == first + 1 and out.tokens[0, lengths[0] + first] == stop
  assert (out.tokens[0, lengths[0] + first + 1:] == PAD).all() and (out.logprobs[0, first + 1:] == 0).all()

  batch = to_batch(out, np.array([7, 8]), seq_len=20, pad_id=PAD)
  assert batch.tokens.shape == (2, 20)
  for r in range(2):  # brute force: target t is trained iff it is one of the row's generated tokens
    total = lengths[r] + out.lengths[r]
    for t in range(20):
      assert batch.loss_mask[r, t] == float(lengths[r] <= t + 1 < total), (r, t)
      assert batch.segment_ids[r, t] == int(t < total)
      assert batch.positions[r, t] == (t if t < total else 0)
      if t + 1 < total:
        assert batch.targets[r, t] == batch.tokens[r, t + 1]
    assert (batch.tokens[r, :total] == out.tokens[r, :total]).all() and (batch.tokens[r, total:] == PAD).all()
  assert batch.tokens[0, lengths[0] + first] == stop and batch.loss_mask[0, lengths[0] + first - 1] == 1
  np.testing.assert_array_equal(batch.example_ids, [7, 8])
  with pytest.raises(ValueError, match="exceed the sequence length 10"):
    to_batch(out, np.array([7, 8]), seq_len=10, pad_id=PAD)


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
  """NumPy: the ids kept by top-p (mass before each id in descending order below top_p; ties kept)."""
  order = np.argsort(-probs, kind="stable")
  before = np.cumsum(probs[order]) - probs[order]
  threshold = probs[order][before < top_p].min()
  return np.flatnonzero(probs >= threshold)


def test_top_p_draws_only_from_the_nucleus_in_proportion():
  logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32))
  draws = 4000
  keys = jax.random.split(jax.random.key(0), draws)
  for top_p, temperature in [(0.5, 1.0), (0.75, 1.0), (1.0, 1.0), (0.9, 2.0), (1e-6, 1.0)]:
    ids = np.asarray(jax.jit(draw_tokens)(jnp.tile(logits, (draws, 1)), keys, temperature, top_p))
    probs = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    kept = nucleus(probs, top_p)
    assert set(np.unique(ids)) == set(kept), (top_p, temperature)
    expected = probs[kept] / probs[kept].sum()
    freq = np.bincount(ids, minlength=6)[kept] / draws
    np.testing.assert_allclose(freq, expected, atol=0.03)


def test_tiny_top_p_is_greedy_and_full_top_p_is_not(model):
  rng = np.random.default_rng(5)
  lengths = np.array([3, 5, 2], np.int32)
  prompts = right_padded(rng, lengths, 5)
  keys = key_data(1, 2, np.arange(3))
  greedy = run(model, prompts, lengths, keys, 6, temperature=0.0)
  tiny = run(model, prompts, lengths, keys, 6, temperature=1.5, top_p=1e-6)
  full = run(model, prompts, lengths, keys, 6, temperature=1.5, top_p=1.0)
  np.testing.assert_array_equal(tiny.tokens, greedy.tokens)
  assert not np.array_equal(full.tokens, greedy.tokens)
  assert (greedy.sampler_logprobs == 0).all() and (tiny.sampler_logprobs == 0).all()  # a certain draw: log 1


def test_left_and_right_padding_and_each_row_alone_agree(model):
  rng = np.random.default_rng(6)
  lengths = np.array([3, 7, 5, 1], np.int32)
  right = right_padded(rng, lengths, 8)
  left = np.stack([np.roll(right[r], 8 - lengths[r]) for r in range(4)])
  np.testing.assert_array_equal(np.asarray(to_left_padding(jnp.asarray(right), jnp.asarray(lengths), PAD)), left)
  keys = key_data(2, 9, np.array([4, 5, 6, 7]))
  kw = dict(temperature=0.9, top_p=0.95)
  a = run(model, right, lengths, keys, 5, **kw)
  b = run(model, left, lengths, keys, 5, padding="left", **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  for r in range(4):
    alone = run(model, right[r:r + 1], lengths[r:r + 1], keys[r:r + 1], 5, **kw)
    np.testing.assert_array_equal(alone.tokens[0], a.tokens[r])
    np.testing.assert_allclose(alone.logprobs[0], a.logprobs[r], rtol=1e-5, atol=1e-5)
    tight = run(model, right[r:r + 1, :lengths[r]], lengths[r:r + 1], keys[r:r + 1], 5, **kw)  # its own bucket
    np.testing.assert_array_equal(tight.tokens[0, :lengths[r] + 5], a.tokens[r, :lengths[r] + 5])


def test_samples_are_a_function_of_seed_step_and_example_id(model):
  rng = np.random.default_rng(7)
  lengths = np.array([4, 6, 3], np.int32)
  prompts = right_padded(rng, lengths, 6)
  ids = np.array([100, 200, 300])
  kw = dict(temperature=1.0)
  base = run(model, prompts, lengths, key_data(3, 4, ids), 6, **kw)
  # the same rows in another order, beside another row: each row's samples are unchanged
  order = np.array([2, 0, 1])
  other = np.concatenate([prompts[order], right_padded(rng, [5], 6)])
  other_lengths = np.concatenate([lengths[order], [5]]).astype(np.int32)
  shuffled = run(model, other, other_lengths, key_data(3, 4, np.concatenate([ids[order], [999]])), 6, **kw)
  np.testing.assert_array_equal(shuffled.tokens[:3], base.tokens[order])
  np.testing.assert_array_equal(base.tokens, run(model, prompts, lengths, key_data(3, 4, ids), 6, **kw).tokens)
  for changed in (key_data(4, 4, ids), key_data(3, 5, ids), key_data(3, 4, ids + 1)):
    assert not np.array_equal(run(model, prompts, lengths, changed, 6, **kw).tokens, base.tokens)
  np.testing.assert_array_equal(key_data(3, 4, ids)[order], key_data(3, 4, ids[order]))
  assert not np.array_equal(key_data(0, 0, [1 << 40]), key_data(0, 0, [0]))  # the high word counts


def test_one_compilation_per_shape(model):
  graphdef, params = nnx.split(model)
  sampler = make_sampler(graphdef, max_new_tokens=3, stop_ids=(1,), pad_id=PAD)
  rng = np.random.default_rng(8)
  for seed, temperature, top_p in [(0, 1.0, 1.0), (1, 0.5, 0.9), (2, 0.0, 1.0)]:
    lengths = rng.integers(1, 5, 2).astype(np.int32)
    sampler(params, right_padded(rng, lengths, 4), lengths, key_data(seed, 0, [0, 1]), np.float32(temperature),
            np.float32(top_p))
  assert sampler._cache_size() == 1  # noqa: SLF001 - jit cache size


def test_a_train_state_samples_as_its_model(model):
  """A train state's (model, optimizer) graph and parameters sample what the model alone does."""
  state_def, state = nnx.split((model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)))
  lengths = np.array([2, 4], np.int32)
  prompts = right_padded(np.random.default_rng(10), lengths, 4)
  keys = key_data(0, 7, [3, 4])
  sampler = make_sampler(state_def, max_new_tokens=4, pad_id=PAD)
  out = sampler(state, prompts, lengths, keys, np.float32(1.0), np.float32(1.0))
  np.testing.assert_array_equal(np.asarray(out.tokens), run(model, prompts, lengths, keys, 4).tokens)


def test_bad_requests_are_refused_by_name(model):
  prompts, lengths, keys = np.ones((2, 4), np.int32), np.array([2, 5], np.int32), key_data(0, 0, [0, 1])
  with pytest.raises(ValueError, match=r"prompt_lengths must lie in \[1, 4\]"):
    generate(model, prompts, lengths, key_data=keys, max_new_tokens=2)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    generate(model, prompts, np.array([2, 2]), key_data=keys, max_new_tokens=300)
  with pytest.raises(ValueError, match=r"stop_ids \[300\] outside the vocabulary"):
    generate(model, prompts, np.array([2, 2]), key_data=keys, max_new_tokens=2, stop_ids=[300])
  with pytest.raises(ValueError, match="step -1"):
    key_data(0, -1, [0])


def test_generation_config_names_the_bad_key():
  cfg = GenerationConfig()
  assert cfg.resolved_stop_ids(eos_id=1) == (1,) and GenerationConfig(stop_ids=[]).resolved_stop_ids(1) == ()
  for data, key in [({"top_p": 0}, "top_p"), ({"temperature": -1}, "temperature"), ({"max_new_tokens": 0},
                    "max_new_tokens"), ({"prompts": {"min_len": 9, "max_len": 8}}, "min_len"),
                    ({"prompts": {"source": "jsonl"}}, "path"), ({"stop_ids": [-2]}, "stop_ids"),
                    ({"prompts": {"lenght": 3}}, "prompts.lenght")]:
    with pytest.raises(ConfigError, match=key):
      build(GenerationConfig, data)
  with pytest.raises(ValueError, match=r"generation.prompts.max_len \(32\) \+ generation.max_new_tokens \(32\)"):
    cfg.check_fits(48)
  cfg.check_fits(64)


def test_corpus_prompts_are_prefixes_of_the_records(small_dataset):
  data = DataConfig(path=str(small_dataset), batch_size=4, seed=0)
  manifest = read_manifest(small_dataset)
  cfg = GenerationConfig(seed=3, prompts={"min_len": 3, "max_len": 12})
  prompts = make_prompt_set(cfg, data)
  _, source = open_split(data, "train")
  assert len(prompts) == len(source)
  lengths = []
  for i in range(0, len(source), 37):
    ex, item = source[i], prompts[i]
    assert item["example_ids"] == ex["example_ids"] and item["prompt"].shape == (12,)
    n = int(item["prompt_length"])
    want = prefix_length(3, int(ex["example_ids"]), 3, 12)
    # brute force: the longest segment's first tokens
    seg_ids, counts = np.unique(ex["segment_ids"][ex["segment_ids"] > 0], return_counts=True)
    longest = ex["tokens"][ex["segment_ids"] == seg_ids[np.argmax(counts)]]
    usable = max(len(longest) - int(longest[-1] == manifest.eos_id), 1)
    assert n == min(want, usable)
    np.testing.assert_array_equal(item["prompt"][:n], longest[:n])
    assert (item["prompt"][n:] == manifest.pad_id).all() and manifest.eos_id not in item["prompt"][:n]
    lengths.append(n)
  assert min(lengths) >= 3 and len(set(lengths)) > 3  # drawn over the range
  again = make_prompt_set(cfg, data)
  assert all((again[i]["prompt"] == prompts[i]["prompt"]).all() for i in range(0, len(source), 37))
  reseeded = make_prompt_set(cfg.model_copy(update={"seed": 4}), data)
  assert any(reseeded[i]["prompt_length"] != prompts[i]["prompt_length"] for i in range(0, len(source), 37))
  # the data pipeline's order and batching apply to a prompt set as to the corpus
  batch = Prompts.stack(ordered_batches(grain.MapDataset.source(prompts), data, "train")[0])
  assert batch.tokens.shape == (4, 12) and batch.example_ids.dtype == np.int64
  assert corpus_prefix(np.array([5, 6, 1, 7, 8, 9]), np.array([1, 1, 1, 2, 2, 0]), 5, eos_id=1).tolist() == [5, 6]


def test_jsonl_prompts_are_tokenized_and_bad_lines_named(small_dataset, tmp_path):
  data = DataConfig(path=str(small_dataset))
  tok = Tokenizer.from_file(small_dataset / "tokenizer.json")
  texts = ["def main():", "import os\nprint(os.getcwd())", "x" * 400]
  path = tmp_path / "prompts.jsonl"
  path.write_text("\n".join(json.dumps({"text": t}) for t in texts[:2]) + "\n\n" + json.dumps({"text": texts[2]}))
  cfg = GenerationConfig(prompts={"source": "jsonl", "path": str(path), "max_len": 10})
  prompts = make_prompt_set(cfg, data)
  assert len(prompts) == 3
  for i, text in enumerate(texts):
    ids = tok.encode(text)[-10:]
    item = prompts[i]
    assert item["example_ids"] == i and item["prompt_length"] == len(ids)
    np.testing.assert_array_equal(item["prompt"][:len(ids)], ids)
  for body, message in [('{"text": "a"}\n{"text": "b"\n', r"prompts.jsonl:2: not valid JSON"),
                        ('{"text": "a"}\n\n["a"]\n', r"prompts.jsonl:3: expected an object"),
                        ('{"txt": "a"}\n', r"prompts.jsonl:1: expected an object with a string \"text\""),
                        ('{"text": ""}\n', r"prompts.jsonl:1: \"text\" is empty")]:
    path.write_text(body)
    with pytest.raises(ValueError, match=message):
      make_prompt_set(cfg, data)


def test_generate_batch_from_corpus_prompts(small_dataset, model):
  manifest = read_manifest(small_dataset)
  data = DataConfig(path=str(small_dataset), batch_size=3)
  cfg = GenerationConfig(max_new_tokens=6, prompts={"min_len": 2, "max_len": 8})
  prompts = make_prompt_set(cfg, data).batch([0, 5, 9])
  batch, gen = generate_batch(model, prompts, cfg, step=2, seq_len=32, pad_id=manifest.pad_id,
                              eos_id=manifest.eos_id)
  assert batch.tokens.shape == (3, 32) and batch.loss_mask.sum() == gen.lengths.sum()
  np.testing.assert_array_equal(batch.example_ids, prompts.example_ids)
  for r in range(3):
    n = prompts.lengths[r]
    np.testing.assert_array_equal(batch.tokens[r, :n], prompts.tokens[r, :n])
  with pytest.raises(ValueError, match="exceeds the sequence length 12"):
    generate_batch(model, prompts, cfg, step=2, seq_len=12, pad_id=manifest.pad_id, eos_id=manifest.eos_id)


@pytest.mark.parametrize("layout", ["unrolled", "scanned"])
def test_sharded_generation_equals_one_device(model, layout):
  model = to_scanned(model) if layout == "scanned" else model
  if jax.device_count() < 8:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8")
  rng = np.random.default_rng(9)
  lengths = rng.integers(1, 7, 8).astype(np.int32)
  prompts = right_padded(rng, lengths, 6)
  keys = key_data(6, 1, np.arange(8) * 3)
  kw = dict(temperature=0.8, top_p=0.9, stop_ids=[5])
  one = run(model, prompts, lengths, keys, 6, **kw)
  cfg = MeshConfig(data=2, fsdp=2, tensor=2)
  mesh = make_mesh(cfg)
  graphdef, state = nnx.split(model)
  sharded_state = jax.device_put(state, state_shardings(state, mesh, rules_table(cfg)))
  sharded = nnx.merge(graphdef, sharded_state)
  assert any("tensor" in str(x.sharding.spec) for x in jax.tree.leaves(sharded_state))
  out = generate(sharded, prompts, lengths, key_data=keys, max_new_tokens=6, pad_id=PAD, mesh=mesh, **kw)
  assert "data" in str(out.tokens.sharding.spec)
  np.testing.assert_array_equal(np.asarray(out.tokens), one.tokens)
  np.testing.assert_array_equal(np.asarray(out.lengths), one.lengths)
  np.testing.assert_allclose(np.asarray(out.logprobs), one.logprobs, rtol=1e-4, atol=1e-4)


def test_student_topk_ids_are_the_top_of_each_drawn_distribution(model):
  """`topk=k` returns, per generated token, the k most probable real-vocabulary ids of the logits it was drawn
  from (the full-forward reference's), pad_id past a row's end; the tokens are the same as without it."""
  rng = np.random.default_rng(9)
  lengths = np.array([4, 7, 2], np.int32)
  prompts = right_padded(rng, lengths, 8)
  keys = key_data(5, 1, np.array([3, 4, 5]))
  out = run(model, prompts, lengths, keys, 6, temperature=1.0, topk=5, stop_ids=(7, 11, 13))
  plain = run(model, prompts, lengths, keys, 6, temperature=1.0, stop_ids=(7, 11, 13))
  np.testing.assert_array_equal(out.tokens, plain.tokens)
  assert plain.topk_ids is None and out.topk_ids.shape == (3, 6, 5) and out.topk_ids.dtype == np.int32
  _, generated, logits = reference(model, prompts, lengths, keys, 6, temperature=1.0, top_p=1.0,
                                   stop_ids=(7, 11, 13))
  for r in range(3):
    for i in range(6):
      if i < generated[r]:
        expected = np.argsort(-logits[i, r, :300], kind="stable")[:5]
        np.testing.assert_array_equal(out.topk_ids[r, i], expected)
      else:
        assert (out.topk_ids[r, i] == PAD).all()
