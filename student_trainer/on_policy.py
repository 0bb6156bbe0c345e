"""On-policy steps of the train loop: sampling their batches from parameter snapshots, keeping the samples
not yet trained across a checkpoint, and their metrics (docs/on_policy.md, "The pipeline").

A `Generator` samples the batch of an on-policy step in two halves: `dispatch` cuts the prompts from the
step's corpus batch and launches the jitted sampler on the parameters it is given (JAX dispatch is
asynchronous: the call returns at once), and `collect` fetches the tokens to the host and packs them into
the trainer's `Batch` (`generation.to_batch`: the loss mask covers the generated tokens only). The train
loop dispatches before it dispatches the train step that donates those parameters' buffers, so the device
runs the sampler first, on the parameters as they were.

A generated batch is a function of (generation.seed, step, the example ids of the step's corpus batch, the
parameters it was drawn with). The parameters of a batch generated but not trained yet at a checkpoint are
not in the checkpoint (they are older), so such batches are saved with it (`pack`) and handed back on
resume (`unpack`) instead of being sampled again.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from distill_core.data import Batch, DataConfig, load_manifest
from distill_core.generation import (GenerationConfig, Prompts, at_positions, batch_prompts, make_prompt_set,
                                     ids_to_score, to_batch)
from distill_core.model.config import ModelConfig
from distill_core.model.generate import Generation, check_prompts, key_data, local_rows, make_sampler
from distill_core.parts import scored
from distill_core.sharding import shard_batch
from distill_core.targets import TeacherTargets
from student_trainer.errors import RunError


@dataclasses.dataclass
class Generated:
  """One on-policy step's batch, on the host.

  `version`: the optimizer steps taken by the parameters it was drawn with (staleness = step - version).
  `seconds`: from dispatching the sampler to its tokens being on the host; `blocked`: the part of that the
  host spent waiting in `collect` (both 0 for a batch restored from a checkpoint).
  """

  step: int
  version: int
  batch: Batch
  generation: Generation
  student_logprobs: np.ndarray  # (B, T) f32: log p_S of the target at each generated position, else 0
  seconds: float = 0.0
  blocked: float = 0.0


@dataclasses.dataclass
class Dispatched:
  """A sampler call in flight: its outputs are device arrays not yet fetched."""

  step: int
  version: int
  prompts: Prompts
  out: Generation
  started: float


def teacher_parts(given_ids_per_position: int) -> tuple[tuple[str, scored.ScoredRequest], ...]:
  """The target parts (name, request) an on-policy run needs from its teacher besides top-k: the teacher's
  logits at `given_ids_per_position` given ids per position (none when its loss reads no scores)."""
  return (("scored", scored.ScoredRequest(given_ids_per_position)),) if given_ids_per_position else ()


def generated_batch(step: int, version: int, example_ids, host: Generation, *, seq_len: int, pad_id: int,
                    **timing) -> Generated:
  """A step's `Generated` from the sampler's host arrays (`to_batch` packs them into `seq_len` columns)."""
  batch = to_batch(host, example_ids, seq_len, pad_id)
  return Generated(step, version, batch, host, logprobs_at_positions(host, seq_len), **timing)


def pack(pending: list[Generated]) -> dict[str, np.ndarray]:
  """This process's untrained generated batches as arrays stacked over steps (for `np.savez`)."""
  if not pending:
    return {}
  g = [p.generation for p in pending]
  out = {"steps": np.asarray([p.step for p in pending], np.int64),
         "versions": np.asarray([p.version for p in pending], np.int64),
         "example_ids": np.stack([np.asarray(p.batch.example_ids, np.int64) for p in pending]),
         "tokens": np.stack([np.asarray(x.tokens, np.int32) for x in g]),
         "prompt_lengths": np.stack([np.asarray(x.prompt_lengths, np.int32) for x in g]),
         "lengths": np.stack([np.asarray(x.lengths, np.int32) for x in g]),
         "logprobs": np.stack([np.asarray(x.logprobs, np.float32) for x in g])}
  if g[0].topk_ids is not None:
    out["topk_ids"] = np.stack([np.asarray(x.topk_ids, np.int32) for x in g])
  if g[0].sampler_logprobs is not None:
    out["sampler_logprobs"] = np.stack([np.asarray(x.sampler_logprobs, np.float32) for x in g])
  return out


def unpack(arrays: dict[str, np.ndarray], *, seq_len: int, pad_id: int) -> list[Generated]:
  """The batches `pack` stored, rebuilt exactly (the same `to_batch` of the same tokens)."""
  if not arrays:
    return []
  out = []
  for j, step in enumerate(arrays["steps"]):
    topk = arrays["topk_ids"][j] if "topk_ids" in arrays else None
    host = Generation(arrays["tokens"][j], arrays["prompt_lengths"][j], arrays["lengths"][j], arrays["logprobs"][j],
                      topk, arrays["sampler_logprobs"][j] if "sampler_logprobs" in arrays else None)
    out.append(generated_batch(int(step), int(arrays["versions"][j]), arrays["example_ids"][j], host,
                               seq_len=seq_len, pad_id=pad_id))
  return out


def logprobs_at_positions(generation: Generation, seq_len: int) -> np.ndarray:
  """(B, seq_len) float32: `generation.logprobs[r, i]` at position prompt_length_r + i - 1 (the position whose
  target is generated token i), for i < lengths_r; 0 elsewhere."""
  return at_positions(generation.logprobs, generation, seq_len)


class Generator:
  """Samples the batches of on-policy steps with `gen_cfg` (see the module docstring): prompts from the
  corpus at `data_cfg.path` (its pad and eos ids, its row length), the student `model_cfg` whose
  `graphdef` (a train state's) the parameters are merged into."""

  def __init__(self, gen_cfg: GenerationConfig, data_cfg: DataConfig, model_cfg: ModelConfig, graphdef,
               mesh: Mesh, rules):
    self._gen, self._model_cfg, self._mesh = gen_cfg, model_cfg, mesh
    manifest = load_manifest(data_cfg.path)
    self.seq_len, self.pad_id, self.eos_id = manifest.seq_len, manifest.pad_id, manifest.eos_id
    self.stop_ids = self._gen.resolved_stop_ids(self.eos_id)
    vocab = model_cfg.real_vocab_size
    bad = [i for i in self.stop_ids if not 0 <= i < vocab]
    if bad:
      raise RunError(f"generation.stop_ids: {bad} outside the student's vocabulary [0, {vocab})")
    if self._gen.score_student_topk > vocab:
      raise RunError(f"generation.score_student_topk ({self._gen.score_student_topk}) exceeds the student's "
                     f"vocabulary ({vocab})")
    prompts = self._gen.prompts
    # Corpus prefixes of the training split come from the drawn batch itself; other prompt sets by example id.
    from_batch = prompts.source == "corpus" and prompts.split == "train"
    self._prompt_set = None if from_batch else make_prompt_set(self._gen, data_cfg)
    self._sample = make_sampler(graphdef, max_new_tokens=self._gen.max_new_tokens, stop_ids=self.stop_ids,
                                pad_id=self.pad_id, padding="right", mesh=mesh, rules=rules,
                                topk=self._gen.score_student_topk)

  def dispatch(self, step: int, params, version: int, corpus: Batch) -> Dispatched:
    """Launches the sampler for `step`'s batch on `params` (after `version` optimizer steps); returns at once."""
    prompts = batch_prompts(corpus, self._gen, pad_id=self.pad_id, eos_id=self.eos_id, prompt_set=self._prompt_set)
    check_prompts(self._model_cfg, prompts.tokens, prompts.lengths, self._gen.max_new_tokens, self.stop_ids)
    keys = key_data(self._gen.seed, step, prompts.example_ids)
    started = time.perf_counter()
    inputs = shard_batch((prompts.tokens, prompts.lengths, keys), self._mesh)
    out = self._sample(params, *inputs, np.float32(self._gen.temperature), np.float32(self._gen.top_p))
    return Dispatched(step, version, prompts, out, started)

  def collect(self, dispatched: Dispatched) -> Generated:
    """Fetches a dispatched batch's tokens (blocks until the device has them) and packs them."""
    waiting = time.perf_counter()
    host = Generation(*(local_rows(x) for x in dispatched.out))
    done = time.perf_counter()
    return generated_batch(dispatched.step, dispatched.version, dispatched.prompts.example_ids, host,
                           seq_len=self.seq_len, pad_id=self.pad_id, seconds=done - dispatched.started,
                           blocked=done - waiting)

  def teacher_inputs(self, generated: Generated) -> dict[str, np.ndarray]:
    """The part inputs asking the teacher for its logits at the ids of `generation.ids_to_score` (the sampled
    token, the student's top-k) at each position of a generated batch."""
    return scored.request_inputs(ids_to_score(generated.batch, generated.generation))

  def stopped(self, generated: Generated) -> np.ndarray:
    """(B,) bool: rows that ended at a stop id (not at max_new_tokens)."""
    g = generated.generation
    lengths = np.asarray(g.lengths)
    last = np.asarray(g.tokens)[np.arange(len(lengths)), np.asarray(g.prompt_lengths) + lengths - 1]
    return (lengths > 0) & np.isin(last, np.asarray(self.stop_ids, np.int32))


def reverse_kl_sums(targets: TeacherTargets, batch_targets, student_logprobs, loss_mask) -> dict:
  """Device sums for the reverse KL of the student's samples to the teacher, from the teacher's top-k.

  At each trained position the target x (`batch_targets`) was sampled by the student, with log p_S(x) in
  `student_logprobs` (`logprobs_at_positions`); log p_T(x) is exact when x is among the teacher's top-k ids
  (z_x / T - logsumexp_T, at the answer's temperature column nearest 1: `temperature` says which), unknown
  otherwise. Returns `rkl_topk_sum` (the sum of log p_S(x) - log p_T(x) where x is in the top-k),
  `topk_hits` (their count) and `tokens` (every generated position). Their ratio is the estimate over the
  covered tokens only, which leaves out exactly the tokens the teacher finds least likely, so it
  understates the reverse KL; the exact estimate needs the teacher's score at every x (the scored ids).
  """
  return _reverse_kl_sums(targets.topk_ids, targets.topk_logits, targets.logsumexp, targets.temperatures,
                          batch_targets, student_logprobs, loss_mask)


@jax.jit
def _reverse_kl_sums(topk_ids, topk_logits, logsumexp, temperatures, sampled, student_logprobs, loss_mask):
  temps = jnp.asarray(temperatures, jnp.float32)
  col = jnp.argmin(jnp.abs(temps - 1.0))
  counted = loss_mask > 0
  hit = (topk_ids == sampled[..., None]) & jnp.isfinite(topk_logits.astype(jnp.float32))  # (B, T, k)
  z = jnp.sum(jnp.where(hit, topk_logits.astype(jnp.float32), 0.0), axis=-1) / temps[col]
  log_t = z - jnp.take(logsumexp, col, axis=-1)
  covered = counted & jnp.any(hit, axis=-1)
  return {"rkl_topk_sum": jnp.sum(jnp.where(covered, student_logprobs - log_t, 0.0)),
          "topk_hits": jnp.sum(covered.astype(jnp.float32)), "tokens": jnp.sum(counted.astype(jnp.float32)),
          "temperature": temps[col]}


class OnPolicyWindow:
  """The on-policy metrics of the steps between two log points (`onpolicy/*`, `perf/generation_*`).

  `perf/generation_fraction` is the host-side time from dispatching each sampler call to its tokens being
  on the host, summed over the calls collected in the window, over the window's wall time. The span
  includes the device finishing the train step queued before the sampler, and it overlaps the teacher
  wait that follows the dispatch, so it bounds the device's generation time from above.
  `perf/generation_host_wait_fraction` is the part of it the host loop spent blocked fetching the tokens
  (what generation adds to the host's critical path).
  """

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self._start = time.perf_counter()
    self._steps = self._all_steps = 0
    self._staleness = 0.0
    self._rows = self._generated_tokens = self._stopped = 0.0
    self._seconds = self._blocked = 0.0
    self._kl: list[dict] = []

  def generated(self, g: Generated) -> None:
    """A batch collected in this window (generation time counts when it was spent)."""
    self._seconds += g.seconds
    self._blocked += g.blocked

  def step(self) -> None:
    """Any step trained in this window (the denominator of `onpolicy/steps_fraction`)."""
    self._all_steps += 1

  def trained(self, g: Generated, stopped: np.ndarray, kl_sums: dict | None) -> None:
    """An on-policy step trained in this window; `kl_sums` from `reverse_kl_sums` (None: no teacher answer)."""
    self._steps += 1
    self._staleness += g.step - g.version
    lengths = np.asarray(g.generation.lengths)
    self._rows += lengths.size
    self._generated_tokens += float(lengths.sum())
    self._stopped += float(stopped.sum())
    if kl_sums is not None:
      self._kl.append(kl_sums)

  def flush(self) -> dict[str, float]:
    wall = max(time.perf_counter() - self._start, 1e-9)
    out = {"perf/generation_fraction": min(self._seconds / wall, 1.0),
           "perf/generation_host_wait_fraction": min(self._blocked / wall, 1.0),
           "onpolicy/steps_fraction": self._steps / max(self._all_steps, 1)}
    if self._steps:
      out["onpolicy/staleness"] = self._staleness / self._steps
      out["onpolicy/sample_length"] = self._generated_tokens / max(self._rows, 1)
      out["onpolicy/stopped_fraction"] = self._stopped / max(self._rows, 1)
    if self._kl:
      rows = jax.device_get(self._kl)
      hits = sum(float(r["topk_hits"]) for r in rows)
      tokens = sum(float(r["tokens"]) for r in rows)
      out["onpolicy/teacher_topk_coverage"] = hits / max(tokens, 1.0)
      if hits:
        out["onpolicy/reverse_kl_topk"] = sum(float(r["rkl_topk_sum"]) for r in rows) / hits
    self.reset()
    return out
