"""Checks a run can start, before anything heavy happens: one clear message naming the file or option.

Everything a run needs from disk is looked at here (the dataset and both of its
splits, token and certificate files, checkpoints to load), so a mistake costs
seconds, not a crash at the end of training with nothing saved. The default
dataset (`data.path: data/stdlib_tiny`) is prepared on first use, so
`python -m student_trainer` with no arguments runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from distill_core import records
from distill_core.config import load_config
from distill_core.data import load_manifest, num_batches
from distill_core.memory import MemoryBudgetError
from distill_core.prepare import PrepareConfig, prepare
from distill_core.records import RecordError
from distill_core.shards import ShardError
from distill_core.shards_io import MissingAnswers
from distill_core.stream.pool import RemoteTeacherError
from student_trainer.checkpoint import ConfigChanged
from student_trainer.config import (DEFAULT_DATA_PATH, DEFAULT_PREPARE_CONFIG, LocalTeacherConfig,
                                    RemoteTeacherConfig, TrainConfig)
from student_trainer.errors import RunError
from student_trainer.sources import source_kind

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


def user_errors() -> tuple[type[BaseException], ...]:
  """Errors that mean "this run cannot go on as configured": the command line prints their message
  (one line, `one_line`) instead of a traceback. Each names the file or option at fault."""
  return (RunError, ConfigChanged, RemoteTeacherError, RecordError, ShardError, MissingAnswers,
          MemoryBudgetError)


def one_line(error: BaseException) -> str:
  """The error's message on one line (a message listing several problems joins them with '; ')."""
  parts = [part.strip() for part in str(error).splitlines() if part.strip()]
  return "; ".join(parts) if parts else type(error).__name__


def prepare_default_dataset(path: str | Path) -> None:
  """Prepares the trainer's default dataset at `path` from configs/prepare_tiny.yaml."""
  cfg = load_config(PrepareConfig, REPO / DEFAULT_PREPARE_CONFIG, [f"output_dir={path}"])
  log.info("data.path %s does not exist: preparing the default dataset (%s: the standard library, "
           "vocabulary %d); this takes a minute once", path, DEFAULT_PREPARE_CONFIG, cfg.vocab_size)
  prepare(cfg, show_progress=False)


def _need_file(option: str, value: str | None) -> None:
  if value and not Path(value).exists():
    raise RunError(f"{option}: {value} does not exist")


def _local_paths(local_cfg: LocalTeacherConfig) -> None:
  _need_file("teacher.local.hf_checkpoint", local_cfg.hf_checkpoint)
  _need_file("teacher.local.orbax_checkpoint", local_cfg.orbax_checkpoint)


def _remote_paths(remote_cfg: RemoteTeacherConfig) -> None:
  for option in ("token_file", "root_certificates", "client_cert", "client_key"):
    value = getattr(remote_cfg, option)
    if value and not Path(value).is_file():
      hint = (" (a token file a cluster mounts as a secret; off the cluster, point it at a local file or "
              "set teacher.remote.token_file=null)") if option == "token_file" else ""
      raise RunError(f"teacher.remote.{option}: {value} does not exist{hint}")


# The files a source's options name, checked for every sub-config the run's source reads (sources/registry.py).
_SOURCE_PATHS: dict[type, Callable[[Any], None]] = {LocalTeacherConfig: _local_paths,
                                                    RemoteTeacherConfig: _remote_paths}


def preflight(cfg: TrainConfig) -> records.Manifest:
  """Raises RunError for every problem found before training; returns the dataset's manifest."""
  data = Path(cfg.data.path)
  if not (data / records.MANIFEST_NAME).is_file():
    if cfg.data.path == DEFAULT_DATA_PATH and not data.exists():
      prepare_default_dataset(data)
    else:
      raise RunError(f"data.path: {data} holds no prepared dataset (no {records.MANIFEST_NAME}); run "
                     f"`python -m distill_core.prepare output_dir={data}` or point data.path at one")
  try:
    manifest = load_manifest(data)
  except records.RecordError as e:
    raise RunError(f"data.path: {e}") from None
  if manifest.vocab_size > cfg.model.real_vocab_size:
    raise RunError(f"data.path: tokenizer vocabulary ({manifest.vocab_size}) is larger than the student's "
                   f"({cfg.model.real_vocab_size}); choose a model whose vocab_size covers it")
  if manifest.seq_len > cfg.model.max_position_embeddings:
    raise RunError(f"data.path: rows of {manifest.seq_len} tokens exceed the student's max_position_embeddings "
                   f"({cfg.model.max_position_embeddings})")
  if cfg.loss.on_policy_fraction > 0:
    try:
      cfg.generation.check_fits(manifest.seq_len)
    except ValueError as e:
      raise RunError(f"{e} (data.path's rows; the generated rows are packed into them)") from None
  for split in ("train", "eval"):
    info = manifest.splits.get(split)
    batches = num_batches(cfg.data, split) if info is not None else 0
    if batches < 1:
      examples = info.examples if info is not None else 0
      what = "training" if split == "train" else "evaluation (the run evaluates at its end)"
      raise RunError(f"data.path: the {split} split of {data} has {examples} examples, less than one "
                     f"{split} batch, so {what} cannot run; prepare it with more files or a larger "
                     f"eval_fraction, or lower data.{'batch_size' if split == 'train' else 'eval_batch_size'}")
  _need_file("init_hf_checkpoint", cfg.init_hf_checkpoint)
  for options in source_kind(cfg.teacher.source).sub_configs(cfg.teacher):
    check_paths = _SOURCE_PATHS.get(type(options))
    if check_paths is not None:
      check_paths(options)
  return manifest
