"""On-policy steps, without a training loop: which steps, prompts cut from the drawn batch, the ids to score,
the reverse-KL metric, the generated batches kept in checkpoints, sampling before a donating step and the
options' errors."""

from __future__ import annotations

import contextlib
import fractions
import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from on_policy_utils import make_cfg

from distill_core.config import ConfigError, load_config
from distill_core.data import DataConfig, make_iterator, open_split
from distill_core.generation import (CorpusPrompts, GenerationConfig, batch_prompts, generate_batch, ids_to_score,
                                     to_batch)
from distill_core.model.generate import Generation, model_of
from distill_core.sharding import make_mesh, rules_table
from distill_core.records import read_manifest
from distill_core.targets import TeacherTargets
from student_trainer import on_policy
from student_trainer.__main__ import parse_args
from student_trainer.checkpoint import Checkpointer
from student_trainer.config import TrainConfig
from student_trainer.losses import LossConfig
from student_trainer.preflight import RunError, preflight
from student_trainer.state import create_train_state


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1 / 3, 0.7, 1.0])
def test_on_policy_steps_are_spread_evenly_and_fixed_by_the_step(fraction):
  loss = LossConfig(on_policy_fraction=fraction)
  marks = [loss.on_policy_at(m) for m in range(300)]
  for n in range(1, 301):  # every prefix holds floor(n f) on-policy steps: as even as it gets
    assert sum(marks[:n]) == math.floor(n * fractions.Fraction(repr(fraction)))
  assert marks == [LossConfig(on_policy_fraction=fraction).on_policy_at(m) for m in range(300)]


def test_options_are_checked_by_name(tiny_dataset, tmp_path):
  def refused(*overrides):
    with pytest.raises(ConfigError) as e:
      load_config(TrainConfig, None, [f"data.path={tiny_dataset}", *overrides])
    return str(e.value)

  assert "loss.on_policy_fraction" in refused("loss.on_policy_fraction=1.5")
  assert "generation.staleness" in refused("generation.staleness=0")
  assert "generation.score_student_topk" in refused("generation.score_student_topk=-1")
  for source in ("none", "offline", "cached"):
    message = refused("loss.on_policy_fraction=0.5", f"teacher.source={source}", "teacher.offline.path=x",
                      "teacher.cached.path=x")
    assert "loss.on_policy_fraction" in message and source in message
  assert "cached_shards" in refused("loss.on_policy_fraction=0.5", "teacher.source=remote",
                                    "teacher.remote.on_timeout=cached_shards", "teacher.cached.path=x")
  too_long = make_cfg(tiny_dataset, tmp_path, "loss.on_policy_fraction=1", "generation.max_new_tokens=30")
  with pytest.raises(RunError, match=r"generation.prompts.max_len \(12\) \+ generation.max_new_tokens \(30\)"):
    preflight(too_long)
  preflight(make_cfg(tiny_dataset, tmp_path, "generation.max_new_tokens=30"))  # read only when on-policy


def test_help_describes_every_new_option():
  out = io.StringIO()
  with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
    parse_args(["--help"])
  text = out.getvalue()
  for key in ("loss.on_policy_fraction", "generation.staleness", "generation.score_student_topk",
              "generation.prompts.source", "generation.max_new_tokens"):
    assert key in text, key


def test_corpus_prompts_are_the_prompt_set_items_of_the_drawn_rows(tiny_dataset):
  data = DataConfig(path=str(tiny_dataset), batch_size=8)
  cfg = GenerationConfig(seed=3, prompts={"min_len": 2, "max_len": 10})
  manifest, source = open_split(data, "train")
  prompt_set = CorpusPrompts(source, cfg.prompts, seed=3, pad_id=manifest.pad_id, eos_id=manifest.eos_id, where="t")
  first = manifest.splits["train"].first_example_id
  it = make_iterator(data, "train")
  try:
    for _ in range(3):
      batch = next(it)
      prompts = batch_prompts(batch, cfg, pad_id=manifest.pad_id, eos_id=manifest.eos_id)
      np.testing.assert_array_equal(prompts.example_ids, batch.example_ids)
      expected = prompt_set.batch([int(i) - first for i in batch.example_ids])
      np.testing.assert_array_equal(prompts.example_ids, expected.example_ids)
      np.testing.assert_array_equal(prompts.tokens, expected.tokens)
      np.testing.assert_array_equal(prompts.lengths, expected.lengths)
      # a JSONL-like prompt set is indexed by example id modulo its size, the keys stay the batch's ids
      by_set = batch_prompts(batch, cfg, pad_id=manifest.pad_id, eos_id=manifest.eos_id, prompt_set=prompt_set)
      np.testing.assert_array_equal(by_set.example_ids, batch.example_ids)
      np.testing.assert_array_equal(by_set.tokens, prompt_set.batch(batch.example_ids % len(prompt_set)).tokens)
  finally:
    it.close()


def fake_generation(rng, b=3, p=5, n=6, k=2, vocab=50, pad=0):
  prompt_lengths = rng.integers(1, p + 1, b).astype(np.int32)
  lengths = rng.integers(1, n + 1, b).astype(np.int32)
  tokens = np.full((b, p + n), pad, np.int32)
  for r in range(b):
    tokens[r, :prompt_lengths[r] + lengths[r]] = rng.integers(1, vocab, prompt_lengths[r] + lengths[r])
  logprobs = np.where(np.arange(n)[None] < lengths[:, None], -rng.random((b, n)), 0).astype(np.float32)
  topk = rng.integers(1, vocab, (b, n, k)).astype(np.int32)
  log_mu = np.where(np.arange(n)[None] < lengths[:, None], -rng.random((b, n)), 0).astype(np.float32)
  return Generation(tokens, prompt_lengths, lengths, logprobs, topk, log_mu)


def test_ids_to_score_and_logprobs_sit_at_the_positions_that_predict_each_generated_token():
  rng = np.random.default_rng(0)
  g = fake_generation(rng)
  t = 14
  batch = to_batch(g, np.arange(3), t, 0)
  ids = ids_to_score(batch, g)
  lp = on_policy.logprobs_at_positions(g, t)
  assert ids.shape == (3, t, 3) and ids.dtype == np.int32
  for r in range(3):
    for pos in range(t):
      i = pos + 1 - g.prompt_lengths[r]  # the generated token this position predicts
      generated = 0 <= i < g.lengths[r]
      assert ids[r, pos, 0] == batch.targets[r, pos]
      assert bool(batch.loss_mask[r, pos]) == generated
      if generated:
        assert ids[r, pos, 0] == g.tokens[r, g.prompt_lengths[r] + i]
        np.testing.assert_array_equal(ids[r, pos, 1:], g.topk_ids[r, i])
        assert lp[r, pos] == g.logprobs[r, i] and batch.sampler_logprobs[r, pos] == g.sampler_logprobs[r, i]
      else:
        assert (ids[r, pos, 1:] == 0).all() and lp[r, pos] == 0 and batch.sampler_logprobs[r, pos] == 0
  assert ids_to_score(batch, g._replace(topk_ids=None)).shape == (3, t, 1)
  assert to_batch(g._replace(sampler_logprobs=None), np.arange(3), t, 0).sampler_logprobs is None


def test_reverse_kl_metric_matches_a_numpy_loop():
  rng = np.random.default_rng(1)
  b, t, k, vocab = 2, 7, 4, 20
  logits = rng.normal(size=(b, t, vocab)) * 2
  temps = np.float32([0.5, 1.0])
  ids = np.argsort(-logits, axis=-1)[..., :k].astype(np.int32)
  z = np.take_along_axis(logits, ids, -1) - logits.max(-1, keepdims=True)
  lse = np.stack([np.log(np.exp((logits - logits.max(-1, keepdims=True)) / tau).sum(-1)) for tau in temps], -1)
  targets = TeacherTargets(topk_ids=jnp.asarray(ids), topk_logits=jnp.asarray(z, jnp.float32),
                           logsumexp=jnp.asarray(lse, jnp.float32), temperatures=temps)
  sampled = rng.integers(0, vocab, (b, t)).astype(np.int32)
  sampled[:, ::2] = ids[:, ::2, 1]  # half the positions inside the teacher's top-k
  student = -rng.random((b, t)).astype(np.float32)
  mask = (rng.random((b, t)) < 0.8).astype(np.float32)
  out = on_policy.reverse_kl_sums(targets, jnp.asarray(sampled), jnp.asarray(student), jnp.asarray(mask))
  total = hits = 0.0
  for r in range(b):
    for pos in range(t):
      if mask[r, pos] and sampled[r, pos] in ids[r, pos]:
        log_t = logits[r, pos, sampled[r, pos]] - logits[r, pos].max() - lse[r, pos, 1]  # temperature 1
        total += student[r, pos] - log_t
        hits += 1
  assert float(out["topk_hits"]) == hits and float(out["tokens"]) == mask.sum()
  assert float(out["rkl_topk_sum"]) == pytest.approx(total, rel=1e-5)
  assert float(out["temperature"]) == 1.0


def test_generated_batches_round_trip_through_a_checkpoint(tiny_dataset, tmp_path):
  rng = np.random.default_rng(2)
  manifest = read_manifest(tiny_dataset)
  rows = dict(seq_len=manifest.seq_len, pad_id=manifest.pad_id)
  pending = [on_policy.generated_batch(step, step - 1, rng.integers(0, 1 << 40, 3), fake_generation(rng, p=12, n=16),
                                       **rows) for step in (4, 5)]
  ckpt = Checkpointer(tmp_path / "ckpt", keep=2, async_save=True)
  ckpt.save(4, {"x": jnp.ones(2)}, {"position": 1}, {"step": 4}, on_policy.pack(pending))
  ckpt.save(5, {"x": jnp.ones(2)}, {"position": 1}, {"step": 5})  # a run without on-policy steps
  ckpt.wait()
  back = on_policy.unpack(ckpt.restore_generated(4), **rows)
  assert ckpt.restore_generated(5) is None
  ckpt.close()
  assert [g.step for g in back] == [4, 5] and [g.version for g in back] == [3, 4]
  for a, b in zip(pending, back, strict=True):
    for x, y in zip(a.generation, b.generation, strict=True):
      np.testing.assert_array_equal(x, y)
      assert np.asarray(x).dtype == np.asarray(y).dtype
    for field in ("example_ids", "tokens", "segment_ids", "positions", "targets", "loss_mask", "sampler_logprobs"):
      np.testing.assert_array_equal(getattr(a.batch, field), getattr(b.batch, field))
    np.testing.assert_array_equal(a.student_logprobs, b.student_logprobs)


def test_sampling_dispatched_before_a_donating_step_reads_the_parameters_as_they_were(tiny_dataset, tmp_path):
  """The loop dispatches the sampler, then the train step that donates the same parameter buffers: the
  samples are those of the parameters before the step (JAX orders the donation after the read)."""
  cfg = make_cfg(tiny_dataset, tmp_path / "run", "loss.on_policy_fraction=1", "generation.score_student_topk=2")
  mesh, rules = make_mesh(cfg.mesh), rules_table(cfg.mesh)
  state = create_train_state(cfg, mesh, rules)
  generator = on_policy.Generator(cfg.generation, cfg.data, cfg.model, state.graphdef, mesh, rules)
  it = make_iterator(cfg.data, "train")
  corpus = next(it)
  it.close()
  model = model_of(nnx.merge(state.graphdef, jax.tree.map(jnp.copy, state.params)))  # an independent copy
  dispatched = generator.dispatch(4, state.params, 4, corpus)
  overwrite = jax.jit(lambda p: jax.tree.map(lambda x: x * 0 + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, p),
                      donate_argnums=0)
  before = jax.tree.leaves(state.params)[0]
  state.params = overwrite(state.params)
  assert before.is_deleted()  # donated: the buffer now belongs to the step's output
  got = generator.collect(dispatched)
  prompts = batch_prompts(corpus, cfg.generation, pad_id=generator.pad_id, eos_id=generator.eos_id)
  batch, host = generate_batch(model, prompts, cfg.generation, step=4, seq_len=generator.seq_len,
                               pad_id=generator.pad_id, eos_id=generator.eos_id)
  for x, y in zip(host, got.generation, strict=True):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(batch.tokens, got.batch.tokens)
  np.testing.assert_array_equal(batch.loss_mask, got.batch.loss_mask)
  assert got.seconds >= got.blocked >= 0
