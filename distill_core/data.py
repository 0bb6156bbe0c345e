"""Data pipeline: prepared ArrayRecord shards -> grain -> :class:`Batch` of numpy arrays.

Training order (random access first, then ``to_iter_dataset`` for threaded reads)::

  MapDataset.source(ShardedRecordSource(shards))    # decoded, checksummed examples
    .seed(seed).shuffle()                           # a new permutation every epoch
    .repeat(num_epochs)                             # None = forever
    [: whole global batches][process::processes]    # this process's rows of every batch
    .batch(batch_size // processes, drop_remainder=True)
    .map(Batch.from_examples)                       # next-token targets and loss mask
    .to_iter_dataset(ReadOptions(read_threads, prefetch_buffer_size))

Evaluation uses the same chain without shuffle and repeat: a fixed order, one
pass, static shapes. Iterator state is a small JSON-serialisable dict.
"""

from __future__ import annotations

import bisect
import dataclasses
from pathlib import Path
from typing import Any, Iterator

import grain
import jax
import numpy as np
from grain.sources import ArrayRecordDataSource
from pydantic import Field

from distill_core import records
from distill_core.config import ConfigBase
from distill_core.records import Manifest, RecordError

STATE_VERSION = 1


class DataConfig(ConfigBase):
  """Where the prepared dataset lives and how batches are drawn from it."""

  path: str = Field("data/stdlib", description="Prepared dataset directory (has manifest.json).")
  batch_size: int = Field(8, ge=1, description="Global batch size (all processes together).")
  eval_batch_size: int | None = Field(
      None, ge=1, description="Global eval batch size (null = batch_size).")
  seed: int = Field(0, ge=0, description="Shuffle seed (each epoch is reshuffled from it).")
  shuffle: bool = Field(True, description="Shuffle the training split.")
  num_epochs: int | None = Field(
      None, ge=1, description="Passes over the training split (null = repeat forever).")
  read_threads: int = Field(4, ge=0, description="grain threads reading and decoding records.")
  prefetch_buffer_size: int = Field(8, ge=0, description="Batches read ahead.")
  verify_shards: bool = Field(
      True, description="Check every shard's sha256 against the manifest when opening a split "
                        "(reads each shard once; turn off for very large datasets).")


@dataclasses.dataclass(frozen=True)
class Batch:
  """A batch of packed examples (numpy, or jax arrays once on device); a pytree.

  Position t predicts token t+1: ``targets[:, t] = tokens[:, t+1]`` and
  ``loss_mask[:, t] = 1`` only where token t+1 exists and lies in the same
  non-zero segment as token t. The last column's target is 0 with mask 0.
  """

  example_ids: Any  # (B,) int64
  tokens: Any  # (B, T) int32
  segment_ids: Any  # (B, T) int32, 0 = padding
  positions: Any  # (B, T) int32
  targets: Any  # (B, T) int32
  loss_mask: Any  # (B, T) float32
  # (B, T) float32 in a batch the student generated: log mu of each generated target under the distribution
  # the sampler drew it from (temperature and top-p applied), 0 elsewhere; None in a corpus batch.
  sampler_logprobs: Any = None

  @classmethod
  def from_examples(cls, ex: dict[str, np.ndarray]) -> "Batch":
    """Builds a batch from stacked decoded records (example_ids, tokens, segment_ids, positions)."""
    tokens, seg = ex["tokens"], ex["segment_ids"]  # (B, T)
    targets = np.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    mask = np.zeros(tokens.shape, dtype=np.float32)
    mask[:, :-1] = (seg[:, :-1] != 0) & (seg[:, 1:] == seg[:, :-1])
    return cls(example_ids=np.asarray(ex["example_ids"], dtype=np.int64), tokens=tokens,
               segment_ids=seg, positions=ex["positions"], targets=targets, loss_mask=mask)

  @property
  def shape(self) -> tuple[int, int]:
    """(B, T)."""
    return tuple(self.tokens.shape)


jax.tree_util.register_dataclass(
    Batch, data_fields=[f.name for f in dataclasses.fields(Batch)], meta_fields=[])


def load_manifest(path: str | Path) -> Manifest:
  """Reads ``<path>/manifest.json`` (a :class:`distill_core.records.Manifest`)."""
  return records.read_manifest(path)


class ShardedRecordSource:
  """Random access over a split's shards; items are decoded, checksummed examples.

  Read errors (the ArrayRecord block checksums) and record errors (crc32,
  header) raise :class:`RecordError` naming the shard file and record index.
  """

  def __init__(self, paths: list[Path], counts: list[int], seq_len: int):
    self._paths = [str(p) for p in paths]
    self._seq_len = seq_len
    self._sources = []
    for path, count in zip(self._paths, counts):
      try:
        src = ArrayRecordDataSource([path])
      except (RuntimeError, OSError, ValueError) as e:
        raise RecordError(f"{path}: cannot open shard: {e}") from e
      if len(src) != count:
        raise RecordError(f"{path}: has {len(src)} records, the manifest says {count}")
      self._sources.append(src)
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64).tolist()

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, index) -> dict[str, np.ndarray]:
    index = index.__index__()
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} outside [0, {len(self)})")
    shard = bisect.bisect_right(self._starts, index) - 1
    local = index - self._starts[shard]
    where = f"{self._paths[shard]} (record {local})"
    try:
      raw = self._sources[shard][local]
    except RuntimeError as e:  # riegeli: "Corrupted Riegeli/records file: ... hash mismatch"
      raise RecordError(f"{where}: corrupt shard: {e}") from e
    return records.decode_record(raw, seq_len=self._seq_len, where=where)

  def __repr__(self) -> str:
    return f"ShardedRecordSource({len(self._paths)} shards, {len(self)} records)"


def open_split(cfg: DataConfig, split: str) -> tuple[Manifest, ShardedRecordSource]:
  """The manifest and a record source over ``split`` (shard hashes checked if configured)."""
  manifest = load_manifest(cfg.path)
  paths = manifest.shard_paths(cfg.path, split)
  info = manifest.splits[split]
  for p, shard in zip(paths, info.shards):
    if not p.is_file():
      raise RecordError(f"{p}: shard listed in the manifest is missing")
    if cfg.verify_shards and records.file_sha256(p) != shard.sha256:
      raise RecordError(f"{p}: sha256 differs from the manifest; corrupt shard")
  if not paths:
    raise RecordError(f"{Path(cfg.path) / records.MANIFEST_NAME}: split {split!r} has no examples")
  return manifest, ShardedRecordSource(paths, [s.records for s in info.shards], manifest.seq_len)


def _global_batch_size(cfg: DataConfig, training: bool) -> int:
  return cfg.batch_size if training else (cfg.eval_batch_size or cfg.batch_size)


def _local_batch_size(global_batch: int, shard_count: int) -> int:
  if global_batch % shard_count:
    raise ValueError(f"batch size {global_batch} is not divisible by {shard_count} processes")
  return global_batch // shard_count


def make_dataset(cfg: DataConfig, split: str = "train", *, training: bool | None = None,
                 shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
  """The grain pipeline of ``split``; it yields :class:`Batch`.

  Args:
    cfg: data config.
    split: a split of the manifest ("train" or "eval").
    training: shuffle (if ``cfg.shuffle``) and repeat ``cfg.num_epochs`` times
      with ``cfg.batch_size``; otherwise a fixed-order single pass with the eval
      batch size. Defaults to ``split == "train"``.
    shard_index, shard_count: this process's index and the process count
      (``jax.process_index()``, ``jax.process_count()``); each process gets
      ``batch_size // shard_count`` rows of every global batch, and global batch
      i holds the same examples whatever the process count.
  """
  _, source = open_split(cfg, split)
  ds = ordered_batches(grain.MapDataset.source(source), cfg, split, training=training, shard_index=shard_index,
                       shard_count=shard_count).map(Batch.from_examples)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.prefetch_buffer_size))


def ordered_batches(ds: grain.MapDataset, cfg: DataConfig, split: str = "train", *, training: bool | None = None,
                    shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
  """The order and batching of :func:`make_dataset` applied to any dataset of the split's length.

  Element i of `ds` stands for record i of the split; the result's element n is
  this process's rows of global batch n, stacked (a dict of arrays). The shuffle
  depends only on the seed and the length, so a dataset of the split's example
  ids yields exactly the ids of the batches :func:`make_dataset` yields (the
  ``offline`` teacher source reads its answers in that order).
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} outside [0, {shard_count})")
  training = split == "train" if training is None else training
  global_batch = _global_batch_size(cfg, training)
  local_batch = _local_batch_size(global_batch, shard_count)
  if training:
    ds = ds.seed(cfg.seed)
    if cfg.shuffle:
      ds = ds.shuffle()
    ds = ds.repeat(cfg.num_epochs)
  if training and cfg.num_epochs is None:
    usable = len(ds)  # sys.maxsize: any prefix is a whole number of batches
  else:
    usable = len(ds) // global_batch * global_batch
    if usable == 0:
      raise ValueError(f"{cfg.path}: split {split!r} has {len(ds)} examples (x epochs), fewer "
                       f"than one batch of {global_batch}")
  ds = ds[:usable]
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  return ds.batch(local_batch, drop_remainder=True)


def num_batches(cfg: DataConfig, split: str = "train", *, training: bool | None = None) -> int:
  """Global batches in one pass over ``split`` (per epoch when training)."""
  training = split == "train" if training is None else training
  global_batch = _global_batch_size(cfg, training)
  return load_manifest(cfg.path).splits[split].examples // global_batch


class BatchIterator(Iterator[Batch]):
  """Iterator over a split's batches with a checkpointable JSON state.

  ``get_state()`` returns ``{"version", "grain", "identity"}``: grain's own state
  plus what the position depends on (dataset fingerprint, split, batch size,
  seed, ...). ``set_state`` refuses a state taken from a different pipeline,
  naming what differs, because the same position would mean other examples.
  """

  def __init__(self, dataset: grain.IterDataset, identity: dict[str, Any]):
    self._dataset = dataset
    self._identity = identity
    self._it = iter(dataset)

  def __next__(self) -> Batch:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position (store it with ``ocp.args.JsonSave``)."""
    return {"version": STATE_VERSION, "grain": self._it.get_state(),
            "identity": dict(self._identity)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position returned by :meth:`get_state`."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
      raise ValueError(f"not a data iterator state of version {STATE_VERSION}: {state!r}")
    saved = state.get("identity", {})
    diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in self._identity.items()
            if saved.get(k) != v]
    if diff:
      raise ValueError("data iterator state belongs to another pipeline: " + "; ".join(diff))
    self._it.set_state(state["grain"])

  def close(self) -> None:
    """Stops the read-ahead threads."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def make_iterator(cfg: DataConfig, split: str = "train", *, training: bool | None = None,
                  shard_index: int = 0, shard_count: int = 1) -> BatchIterator:
  """A :class:`BatchIterator` over :func:`make_dataset` (same arguments)."""
  training = split == "train" if training is None else training
  manifest = load_manifest(cfg.path)
  identity = {"dataset_fingerprint": manifest.dataset_fingerprint, "split": split,
              "training": training, "batch_size": _global_batch_size(cfg, training),
              "shard_index": shard_index, "shard_count": shard_count}
  if training:  # num_epochs is left out: epoch e's order does not depend on it
    identity.update(seed=cfg.seed, shuffle=cfg.shuffle)
  ds = make_dataset(cfg, split, training=training, shard_index=shard_index,
                    shard_count=shard_count)
  return BatchIterator(ds, identity)


def make_eval_iterator(cfg: DataConfig, split: str = "eval", *, shard_index: int = 0,
                       shard_count: int = 1) -> BatchIterator:
  """Fixed order, one pass over ``split``, ``drop_remainder`` (static shapes)."""
  return make_iterator(cfg, split, training=False, shard_index=shard_index,
                       shard_count=shard_count)
