"""Generation in the student: its options, the prompt set, and packing what was generated into a `Batch`.

A prompt set is random access (``len``, ``[index]``), so the data pipeline's
order and batching (`data.ordered_batches`) apply to it as to the corpus. Item
``i`` is ``{"example_ids", "prompt" (P,) right-padded with pad_id, "prompt_length"}``
with P = ``prompts.max_len``:

* ``corpus`` (default): record ``i`` of a prepared split. The prompt is a prefix
  of the record's longest segment (the first of equal ones), without a final
  end-of-document token; its length is drawn uniformly from
  [``min_len``, ``max_len``] by (``seed``, example id) and capped at what the
  segment holds. The example id is the record's.
* ``jsonl``: line ``i`` (blank lines skipped) of a file of ``{"text": ...}``
  objects, tokenized with the corpus tokenizer; a text longer than ``max_len``
  tokens keeps its last ``max_len`` (the end of a prompt is what the generation
  continues). The example id is ``i``.

`generate_batch` samples continuations (`distill_core.model.generate`) and
`to_batch` packs prompt + generation into the trainer's `Batch` of its fixed
sequence length, with a loss mask on the generated tokens only (the stop token
included, as an end-of-document token is trained; the prompt and the padding
after a stop are not).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pydantic
from jax.sharding import Mesh
from pydantic import Field

from distill_core.config import ConfigBase
from distill_core.data import Batch, DataConfig, ShardedRecordSource, load_manifest, open_split
from distill_core.model.generate import Generation, generate, key_data, local_rows
from distill_core.model.transformer import Transformer
from distill_core.records import TOKENIZER_NAME
from distill_core.sampling import split_u64
from distill_core.tokenizer import Tokenizer

_LENGTH_STREAM = 0x70726F6D  # separates the prompt-length draws from any other use of the seed


class PromptConfig(ConfigBase):
  """Where the prompts of generated batches come from."""

  source: Literal["corpus", "jsonl"] = Field(
      "corpus", description="'corpus': prefixes cut from the prepared corpus (data.path); 'jsonl': the texts "
      "of prompts.path, one {\"text\": ...} object per line, tokenized with the corpus tokenizer.")
  split: str = Field("train", description="Corpus split the prefixes are cut from.")
  path: str | None = Field(None, description="The JSONL file of prompts (required with source: jsonl).")
  min_len: int = Field(8, ge=1, description="Shortest corpus prefix, in tokens (a shorter segment gives a "
                       "shorter one).")
  max_len: int = Field(32, ge=1, description="Longest prompt, in tokens: the prompt bucket every batch is padded "
                       "to (one compilation); a longer JSONL text keeps its last max_len tokens.")

  @pydantic.model_validator(mode="after")
  def _check(self) -> "PromptConfig":
    if self.min_len > self.max_len:
      raise ValueError(f"min_len ({self.min_len}) exceeds max_len ({self.max_len})")
    if self.source == "jsonl" and not self.path:
      raise ValueError("path: required when source is jsonl")
    return self


class GenerationConfig(ConfigBase):
  """Sampling from the student: prompts, temperature, top-p, length and stop ids (docs/on_policy.md)."""

  temperature: float = Field(1.0, ge=0, description="Softmax temperature of sampling; 0 = greedy (argmax).")
  top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: draw among the most probable tokens "
                       "holding this much probability (1 = all).")
  max_new_tokens: int = Field(32, ge=1, description="Generated tokens per prompt at most (the fixed decode "
                              "length: one compilation).")
  stop_ids: list[int] | None = Field(
      None, description="Token ids that end a row (kept and trained, like an end-of-document token); null = the "
      "corpus's eos id; [] = rows always run max_new_tokens.")
  seed: int = Field(0, ge=0, description="Seed of the samples and of the corpus prefix lengths; with the step "
                    "and the example id it fixes every row's draws.")
  score_student_topk: int = Field(
      0, ge=0, description="Also return the student's k most probable ids at every generated position "
      "(Generation.topk_ids; a top_k of the logits the decode step already has), so the teacher can score "
      "them beside the sampled token; 0 = none.")
  prompts: PromptConfig = Field(default_factory=PromptConfig, description="The prompt set.")

  @pydantic.field_validator("stop_ids")
  @classmethod
  def _stop_ids(cls, value):
    if value is not None and any(i < 0 for i in value):
      raise ValueError(f"stop ids must be non-negative, got {value}")
    return value

  def resolved_stop_ids(self, eos_id: int) -> tuple[int, ...]:
    """The stop ids, `eos_id` when unset."""
    return (int(eos_id),) if self.stop_ids is None else tuple(int(i) for i in self.stop_ids)

  @property
  def sequence_len(self) -> int:
    """Longest prompt + generation: prompts.max_len + max_new_tokens."""
    return self.prompts.max_len + self.max_new_tokens

  def check_fits(self, seq_len: int, where: str = "generation") -> None:
    """ValueError naming the keys when prompt + generation may exceed the trainer's `seq_len`."""
    if self.sequence_len > seq_len:
      raise ValueError(f"{where}.prompts.max_len ({self.prompts.max_len}) + {where}.max_new_tokens "
                       f"({self.max_new_tokens}) = {self.sequence_len} exceeds the sequence length {seq_len}")


class Prompts(NamedTuple):
  """A batch of prompts: example_ids (B,) int64, tokens (B, P) int32 right-padded, lengths (B,) int32."""

  example_ids: np.ndarray
  tokens: np.ndarray
  lengths: np.ndarray

  @classmethod
  def stack(cls, items: dict[str, np.ndarray]) -> "Prompts":
    """From a batch of prompt-set items stacked by grain (or `PromptSet.batch`)."""
    return cls(np.asarray(items["example_ids"], np.int64), np.asarray(items["prompt"], np.int32),
               np.asarray(items["prompt_length"], np.int32))


def prefix_length(seed: int, example_id: int, min_len: int, max_len: int) -> int:
  """Uniform in [min_len, max_len], a function of (seed, example id) only."""
  lo, hi = split_u64(np.asarray([example_id]))[0]
  rng = np.random.default_rng([int(seed), _LENGTH_STREAM, int(lo), int(hi)])
  return int(rng.integers(min_len, max_len + 1))


def corpus_prefix(tokens: np.ndarray, segment_ids: np.ndarray, length: int, eos_id: int) -> np.ndarray:
  """The first `length` tokens of the row's longest segment (the first of equal ones), without its final
  `eos_id`, fewer when the segment holds fewer (at least one token)."""
  ids, starts, counts = np.unique(segment_ids, return_index=True, return_counts=True)
  real = ids != 0
  if not real.any():
    raise ValueError("the corpus row holds no tokens")
  starts, counts = starts[real], counts[real]
  best = int(np.argmax(counts))  # argmax takes the first maximum: the earliest of equal segments
  segment = tokens[starts[best]:starts[best] + counts[best]]
  usable = max(len(segment) - int(segment[-1] == eos_id), 1)
  return segment[:min(length, usable)]


class PromptSet:
  """Random access over prompts (see the module docstring); every item is padded to `max_len`."""

  def __init__(self, prompts: list[np.ndarray] | None, example_ids: np.ndarray | None, *, max_len: int,
               pad_id: int, where: str):
    self._prompts, self._ids = prompts, example_ids
    self.max_len, self.pad_id, self.where = max_len, pad_id, where

  def __len__(self) -> int:
    return len(self._prompts)

  def prompt(self, index: int) -> tuple[int, np.ndarray]:
    """(example id, prompt tokens) of item `index`."""
    return int(self._ids[index]), self._prompts[index]

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = index.__index__()
    if not 0 <= index < len(self):
      raise IndexError(f"prompt {index} outside [0, {len(self)}) of {self.where}")
    example_id, prompt = self.prompt(index)
    padded = np.full((self.max_len,), self.pad_id, np.int32)
    padded[:len(prompt)] = prompt
    return {"example_ids": np.int64(example_id), "prompt": padded, "prompt_length": np.int32(len(prompt))}

  def batch(self, indices) -> Prompts:
    """The items at `indices`, stacked."""
    items = [self[i] for i in indices]
    return Prompts.stack({k: np.stack([it[k] for it in items]) for k in items[0]})

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.where}, {len(self)} prompts, max_len {self.max_len})"


class CorpusPrompts(PromptSet):
  """Prefixes of the records of a prepared split (read on access)."""

  def __init__(self, source: ShardedRecordSource, cfg: PromptConfig, *, seed: int, pad_id: int, eos_id: int,
               where: str):
    super().__init__(None, None, max_len=cfg.max_len, pad_id=pad_id, where=where)
    self._source, self._cfg, self._seed, self._eos = source, cfg, seed, eos_id

  def __len__(self) -> int:
    return len(self._source)

  def prompt(self, index: int) -> tuple[int, np.ndarray]:
    ex = self._source[index]
    example_id = int(ex["example_ids"])
    length = prefix_length(self._seed, example_id, self._cfg.min_len, self._cfg.max_len)
    return example_id, corpus_prefix(ex["tokens"], ex["segment_ids"], length, self._eos).astype(np.int32)


def read_jsonl_prompts(path: str | Path, tokenizer: Tokenizer, max_len: int) -> list[np.ndarray]:
  """The token ids of each line's "text" (blank lines skipped); ValueError naming the file and line."""
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"prompts.path: {path} is not a file")
  texts = []
  with path.open(encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise ValueError(f"{path}:{number}: expected an object with a string \"text\", got "
                         f"{type(obj).__name__ if not isinstance(obj, dict) else sorted(obj)}")
      if not obj["text"]:
        raise ValueError(f"{path}:{number}: \"text\" is empty")
      texts.append((number, obj["text"]))
  if not texts:
    raise ValueError(f"{path}: no prompts (every line is blank)")
  ids = tokenizer.encode_batch([t for _, t in texts])
  for (number, _), tokens in zip(texts, ids):
    if not len(tokens):
      raise ValueError(f"{path}:{number}: \"text\" encodes to no tokens")
  return [tokens[-max_len:] for tokens in ids]


def make_prompt_set(cfg: GenerationConfig, data: DataConfig) -> PromptSet:
  """The prompt set `cfg.prompts` describes, over the corpus at `data.path` (its tokenizer and ids)."""
  manifest = load_manifest(data.path)
  p = cfg.prompts
  if p.source == "corpus":
    _, source = open_split(data, p.split)
    return CorpusPrompts(source, p, seed=cfg.seed, pad_id=manifest.pad_id, eos_id=manifest.eos_id,
                         where=f"{data.path} split {p.split}")
  options = manifest.config
  tokenizer = Tokenizer.from_file(Path(data.path) / (manifest.tokenizer_file or TOKENIZER_NAME),
                                  eos_token=options.get("eos_token"), pad_token=options.get("pad_token"))
  prompts = read_jsonl_prompts(p.path, tokenizer, p.max_len)
  return PromptSet(prompts, np.arange(len(prompts), dtype=np.int64), max_len=p.max_len, pad_id=manifest.pad_id,
                   where=str(p.path))


def batch_prompts(batch: Batch, cfg: GenerationConfig, *, pad_id: int, eos_id: int,
                  prompt_set: PromptSet | None = None) -> Prompts:
  """The prompts of a drawn corpus batch, with the batch's example ids (host arrays, this process's rows).

  Without `prompt_set`: each row's corpus prefix (`corpus_prefix` of the row with the length
  `prefix_length(cfg.seed, example id, ...)`), the prompt `CorpusPrompts` gives for that record. With one
  (JSONL prompts, or prefixes of another split): item `example id mod len(prompt_set)`. Either way the
  example ids, hence the sampling keys, are the batch's.
  """
  ids = np.asarray(batch.example_ids, np.int64).reshape(-1)
  if prompt_set is not None:
    items = prompt_set.batch(ids % len(prompt_set))
    return Prompts(ids, items.tokens, items.lengths)
  p = cfg.prompts
  tokens = np.full((len(ids), p.max_len), pad_id, np.int32)
  lengths = np.zeros((len(ids),), np.int32)
  for r, example_id in enumerate(ids):  # one host cut per row
    prompt = corpus_prefix(np.asarray(batch.tokens[r]), np.asarray(batch.segment_ids[r]),
                           prefix_length(cfg.seed, int(example_id), p.min_len, p.max_len), eos_id)
    tokens[r, :len(prompt)] = prompt
    lengths[r] = len(prompt)
  return Prompts(ids, tokens, lengths)


def ids_to_score(batch: Batch, generation: Generation) -> np.ndarray:
  """The ids the teacher is asked to score at each position of a generated `batch`: (B, T, 1 + k) int32.

  Column 0 is the sampled next token (`batch.targets`); columns 1..k (with `Generation.topk_ids`) are the
  student's top-k ids of the distribution that token was drawn from, i.e. at position prompt_length + i - 1
  for generated token i. Positions the loss does not train (the prompt, padding) hold 0 in columns 1..k.
  """
  targets = np.asarray(batch.targets, np.int32)
  b, t = targets.shape
  top = generation.topk_ids
  k = 0 if top is None else int(np.shape(top)[-1])
  out = np.zeros((b, t, 1 + k), np.int32)
  out[:, :, 0] = targets
  if k:
    top = np.asarray(top, np.int32)
    n = top.shape[1]
    i = np.arange(n)[None, :]
    rows = np.broadcast_to(np.arange(b)[:, None], (b, n))
    cols = np.asarray(generation.prompt_lengths, np.int64)[:, None] + i - 1
    live = i < np.asarray(generation.lengths)[:, None]
    out[rows[live], cols[live], 1:] = top[live]
  return out


def to_batch(generation: Generation, example_ids, seq_len: int, pad_id: int) -> Batch:
  """Packs generated rows (host arrays: this process's rows) into a `Batch` of `seq_len` columns.

  Row r holds its prompt and its generation as one segment from column 0 (positions 0, 1, ...), then
  padding (segment 0, position 0, pad_id). `loss_mask` is 1 exactly where the target is a generated
  token, the stop token included.
  """
  tokens = np.asarray(generation.tokens, np.int32)
  prompt_lengths = np.asarray(generation.prompt_lengths, np.int32)
  total = prompt_lengths + np.asarray(generation.lengths, np.int32)
  b, width = tokens.shape
  if width > seq_len:
    raise ValueError(f"generated rows of {width} tokens (prompt bucket + max_new_tokens) exceed the sequence "
                     f"length {seq_len}")
  cols = np.arange(seq_len, dtype=np.int32)[None, :]
  real = cols < total[:, None]
  full = np.full((b, seq_len), pad_id, np.int32)
  full[:, :width] = tokens
  full = np.where(real, full, pad_id).astype(np.int32)
  batch = Batch.from_examples({"example_ids": np.asarray(example_ids, np.int64).reshape(b), "tokens": full,
                               "segment_ids": real.astype(np.int32),
                               "positions": np.where(real, cols, 0).astype(np.int32)})
  generated_target = (cols + 1 >= prompt_lengths[:, None]) & (cols + 1 < total[:, None])
  log_mu = None if generation.sampler_logprobs is None else at_positions(generation.sampler_logprobs, generation,
                                                                         seq_len)
  return dataclasses.replace(batch, loss_mask=batch.loss_mask * generated_target.astype(np.float32),
                             sampler_logprobs=log_mu)


def at_positions(values, generation: Generation, seq_len: int) -> np.ndarray:
  """(B, seq_len) float32: per-token `values[r, i]` ((B, N), e.g. `Generation.logprobs`) at position
  prompt_length_r + i - 1 (the position whose target is generated token i), for i < lengths_r; 0 elsewhere."""
  values = np.asarray(values, np.float32)
  b, n = values.shape
  i = np.arange(n)[None, :]
  live = i < np.asarray(generation.lengths)[:, None]
  cols = np.asarray(generation.prompt_lengths, np.int64)[:, None] + i - 1
  out = np.zeros((b, seq_len), np.float32)
  out[np.broadcast_to(np.arange(b)[:, None], (b, n))[live], cols[live]] = values[live]
  return out


def generate_batch(model: Transformer, prompts: Prompts, cfg: GenerationConfig, *, step: int, seq_len: int,
                   pad_id: int, eos_id: int, mesh: Mesh | None = None) -> tuple[Batch, Generation]:
  """Samples `cfg`'s continuations of `prompts` with row keys from (cfg.seed, step, example id) and packs
  them with `to_batch`. Returns (batch, the generation as host arrays)."""
  cfg.check_fits(seq_len)
  if prompts.tokens.shape[1] != cfg.prompts.max_len:
    raise ValueError(f"prompts of width {prompts.tokens.shape[1]}, expected prompts.max_len "
                     f"({cfg.prompts.max_len})")
  keys = key_data(cfg.seed, step, prompts.example_ids)
  out = generate(model, prompts.tokens, prompts.lengths, key_data=keys, max_new_tokens=cfg.max_new_tokens,
                 temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=cfg.resolved_stop_ids(eos_id),
                 pad_id=pad_id, padding="right", mesh=mesh, topk=cfg.score_student_topk)
  host = Generation(*(local_rows(x) for x in out))
  return to_batch(host, prompts.example_ids, seq_len, pad_id), host
