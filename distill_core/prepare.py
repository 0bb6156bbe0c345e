"""Corpus preparation: text files -> tokenizer -> packed ArrayRecord shards + manifest.

Usage::

  python -m distill_core.prepare [--config configs/prepare.yaml] [key=value ...]
  python -m distill_core.prepare --help      # every option with its description

Steps: list the source files (sorted), split them into train/eval by a hash of
each relative path, train a byte-level BPE tokenizer on the train split (or load
one), tokenize, append ``<eos>`` to every document, pack greedily into rows of
exactly ``seq_len`` tokens, write ArrayRecord shards, ``tokenizer.json`` and
``manifest.json``. Re-running with the same config on the same files is a no-op.
See docs/data.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import logging
import shutil
import struct
import sys
import sysconfig
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from pydantic import Field, field_validator
from rich.console import Console, Group
from rich.table import Table

from distill_core import records
from distill_core.config import ConfigBase, ConfigError, describe, load_config
from distill_core.logs import add_log_level_argument, setup_logging
from distill_core.progress import ProgressBar
from distill_core.tokenizer import Tokenizer, train_bpe

log = logging.getLogger("distill_core.prepare")  # also under `python -m`

SPLITS = ("train", "eval")
# Example ids: split base + row index, so the two splits never collide.
SPLIT_ID_BASE = {"train": 0, "eval": 1 << 40}
DEFAULT_EXCLUDE = ["site-packages/*", "dist-packages/*", "test/*", "*/test/*", "tests/*",
                   "*/tests/*", "*/idle_test/*"]


class PrepareConfig(ConfigBase):
  """Options of ``python -m distill_core.prepare``."""

  source_dir: str | None = Field(
      None, description="Directory of text files; null = this Python's standard library.")
  glob: str = Field("**/*.py", description="Files to take, a pathlib glob relative to source_dir.")
  exclude: list[str] = Field(
      default_factory=lambda: list(DEFAULT_EXCLUDE),
      description="fnmatch patterns over the relative POSIX path ('*' also matches '/'); "
                  "matching files are skipped.")
  max_files: int | None = Field(
      None, ge=1, description="Keep only the first N files in sorted order (null = all).")
  tokenizer: str | None = Field(
      None, description="Existing tokenizer.json to use instead of training one.")
  eos_token: str | None = Field(
      None, description="End-of-document token of an existing tokenizer (null = detect).")
  pad_token: str | None = Field(
      None, description="Padding token of an existing tokenizer (null = detect, else eos).")
  vocab_size: int = Field(8192, ge=258, description="Vocabulary size of the trained BPE tokenizer.")
  min_frequency: int = Field(2, ge=1, description="BPE: pairs seen fewer times are never merged.")
  seq_len: int = Field(256, ge=2, description="Tokens per packed example.")
  eval_fraction: float = Field(
      0.05, ge=0.0, lt=1.0, description="Share of files (by path hash) in the eval split.")
  records_per_shard: int = Field(4096, ge=1, description="Packed examples per ArrayRecord file.")
  output_dir: str = Field("data/stdlib", description="Where the prepared dataset is written.")
  overwrite: bool = Field(False, description="Rebuild even when an identical dataset exists.")

  @field_validator("exclude")
  @classmethod
  def _no_empty_patterns(cls, v: list[str]) -> list[str]:
    if any(not p for p in v):
      raise ValueError("exclude patterns must be non-empty")
    return v

  def resolved_source_dir(self) -> Path:
    return Path(self.source_dir or sysconfig.get_paths()["stdlib"]).expanduser().resolve()

  def identity(self) -> dict:
    """The options that determine the dataset's content (stored in the manifest)."""
    return self.model_dump(mode="json", exclude={"overwrite", "output_dir"})


def split_of(relpath: str, eval_fraction: float) -> str:
  """'eval' when the path's sha256 falls below ``eval_fraction`` of the hash range."""
  h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
  return "eval" if h < eval_fraction * 2.0**64 else "train"


def list_files(cfg: PrepareConfig) -> list[tuple[str, Path]]:
  """(relative POSIX path, path) of every selected file, sorted by relative path."""
  root = cfg.resolved_source_dir()
  if not root.is_dir():
    raise ConfigError(f"source_dir: {root} is not a directory")
  out = []
  for p in root.glob(cfg.glob):
    rel = p.relative_to(root).as_posix()
    if p.is_file() and not any(fnmatch.fnmatchcase(rel, pat) for pat in cfg.exclude):
      out.append((rel, p))
  out.sort()
  if cfg.max_files is not None:
    out = out[: cfg.max_files]
  if not out:
    raise ConfigError(f"no files match glob={cfg.glob!r} under {root} (after exclude)")
  return out


def pack_documents(docs: Sequence[np.ndarray], seq_len: int, pad_id: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Packs documents (each already ending in eos) greedily into rows of ``seq_len``.

  The documents are laid end to end; a document that does not fit in the rest of
  a row continues at the start of the next row as a new segment. Segment ids
  count 1, 2, ... per piece within a row; positions restart at 0 per piece; the
  tail of the final row is padding (segment 0, position 0, ``pad_id``). No token
  is dropped.

  Returns:
    tokens, segment_ids, positions: (N, seq_len) int32 each.
  """
  lengths = np.array([len(d) for d in docs], dtype=np.int64)
  if (lengths == 0).any():
    raise ValueError("pack_documents: empty document (every document ends with eos)")
  total = int(lengths.sum())
  n_rows = -(-total // seq_len)
  if n_rows == 0:
    empty = np.zeros((0, seq_len), dtype=np.int32)
    return empty, empty.copy(), empty.copy()
  padded = n_rows * seq_len
  tokens = np.full(padded, pad_id, dtype=np.int32)
  tokens[:total] = np.concatenate(docs)
  is_start = np.zeros(padded, dtype=bool)
  is_start[np.cumsum(lengths) - lengths] = True  # document starts
  is_start[::seq_len] = True  # row starts
  idx = np.arange(padded)
  real = idx < total
  seg = np.cumsum(is_start.reshape(n_rows, seq_len), axis=1).reshape(-1)
  segment_ids = np.where(real, seg, 0).astype(np.int32)
  last_start = np.maximum.accumulate(np.where(is_start, idx, 0))
  positions = np.where(real, idx - last_start, 0).astype(np.int32)
  shape = (n_rows, seq_len)
  return tokens.reshape(shape), segment_ids.reshape(shape), positions.reshape(shape)


@dataclasses.dataclass
class Sources:
  """The selected files, read and split."""

  texts: dict[str, list[str]]
  files: dict[str, int]
  bytes: dict[str, int]
  undecodable: list[str]
  fingerprint: str  # sha256 over (relative path, content sha256) of every selected file


def read_sources(files: Sequence[tuple[str, Path]], eval_fraction: float, progress) -> Sources:
  """Reads every file as UTF-8 (undecodable files are skipped and listed) and splits them."""
  task = progress.add_task("reading files", total=len(files))
  src = Sources({n: [] for n in SPLITS}, dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), [],
                "")
  fp = hashlib.sha256()
  for rel, path in files:
    data = path.read_bytes()
    fp.update(f"{rel}\0{hashlib.sha256(data).hexdigest()}\0".encode())
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      src.undecodable.append(rel)
    else:
      name = split_of(rel, eval_fraction)
      src.texts[name].append(text)
      src.files[name] += 1
      src.bytes[name] += len(data)
    progress.advance(task)
  src.fingerprint = fp.hexdigest()
  return src


def check_existing(out_dir: Path, identity: dict, source_fp: str, overwrite: bool,
                   tokenizer_fp: str | None) -> records.Manifest | None:
  """The existing manifest when ``out_dir`` already holds this exact dataset, else None.

  Raises:
    ConfigError: ``out_dir`` holds something else and ``overwrite`` is false, or
      it is a non-empty directory that is not a prepared dataset.
  """
  if not out_dir.exists():
    return None
  if not (out_dir / records.MANIFEST_NAME).is_file():
    if out_dir.is_dir() and not any(out_dir.iterdir()):
      return None
    raise ConfigError(f"output_dir: {out_dir} exists and is not a prepared dataset "
                      "(no manifest.json); choose another output_dir or remove it")
  if overwrite:
    return None
  old = records.read_manifest(out_dir)
  reasons = []
  if old.config != identity:
    changed = sorted(k for k in set(old.config) | set(identity)
                     if old.config.get(k) != identity.get(k))
    reasons.append(f"config differs in {', '.join(changed)}")
  if old.source_fingerprint != source_fp:
    reasons.append("the source files changed")
  if tokenizer_fp is not None and old.tokenizer_fingerprint != tokenizer_fp:
    reasons.append("the tokenizer file changed")
  for split in old.splits.values():
    for shard in split.shards:
      path = out_dir / shard.file
      if not path.is_file() or records.file_sha256(path) != shard.sha256:
        reasons.append(f"{path} is missing or fails its sha256")
  if reasons:
    raise ConfigError(f"output_dir: {out_dir} holds a different or damaged dataset "
                      f"({'; '.join(reasons)}); pass overwrite=true to rebuild it")
  return old


def _dataset_fingerprint(seq_len: int, tok_fp: str, split_hashes: dict[str, str]) -> str:
  h = hashlib.sha256()
  h.update(struct.pack("<III", records.MANIFEST_VERSION, records.RECORD_VERSION, seq_len))
  h.update(tok_fp.encode())
  for name in SPLITS:
    h.update(f"\0{name}\0{split_hashes[name]}".encode())
  return h.hexdigest()


def _load_tokenizer(cfg: PrepareConfig) -> Tokenizer | None:
  if cfg.tokenizer is None:
    return None
  return Tokenizer.from_file(cfg.tokenizer, eos_token=cfg.eos_token, pad_token=cfg.pad_token)


def _train_tokenizer(cfg: PrepareConfig, texts: list[str], progress) -> Tokenizer:
  if not texts:
    raise ConfigError("the train split has no documents to train the tokenizer on")
  task = progress.add_task(f"training BPE (vocab {cfg.vocab_size})", total=None)
  tok = train_bpe(texts, cfg.vocab_size, min_frequency=cfg.min_frequency)
  progress.update(task, total=1, completed=1)
  return tok


def _tokenize(tok: Tokenizer, texts: list[str], name: str, progress, chunk: int = 64
              ) -> list[np.ndarray]:
  task = progress.add_task(f"tokenizing {name}", total=len(texts))
  eos = np.array([tok.eos_id], dtype=np.int32)
  docs = []
  for i in range(0, len(texts), chunk):
    for ids in tok.encode_batch(texts[i:i + chunk]):
      if ids.size:  # an empty file is no document
        docs.append(np.concatenate([ids, eos]))
    progress.advance(task, len(texts[i:i + chunk]))
  return docs


def _progress(show: bool, console) -> ProgressBar:
  return ProgressBar(enabled=show, console=console, description_width=28)


def prepare(cfg: PrepareConfig, *, show_progress: bool = True, console=None
            ) -> tuple[records.Manifest, bool]:
  """Builds (or finds up to date) the dataset of ``cfg``; returns (manifest, skipped).

  The dataset is written to ``<output_dir>.partial`` and renamed into place at
  the end, so an interrupted run never leaves a half-written dataset behind.
  """
  out_dir = Path(cfg.output_dir)
  with _progress(show_progress, console) as progress:
    task = progress.add_task("listing files", total=None)
    files = list_files(cfg)
    progress.update(task, total=len(files), completed=len(files))
    log.info("%d source files under %s", len(files), cfg.source_dir or "the standard library")
    sources = read_sources(files, cfg.eval_fraction, progress)
    if not sources.files["eval"]:
      log.warning("eval_fraction: none of the %d files falls into the eval split (eval_fraction=%g); the "
                  "trainer refuses a dataset it cannot evaluate on: raise eval_fraction or add files",
                  sources.files["train"], cfg.eval_fraction)
    tok = _load_tokenizer(cfg)
    existing = check_existing(out_dir, cfg.identity(), sources.fingerprint, cfg.overwrite,
                              tok.fingerprint if tok else None)
    if existing is not None:
      return existing, True
    if tok is None:
      log.info("training a byte-level BPE tokenizer (vocabulary %d) on %d files", cfg.vocab_size,
               sources.files["train"])
    tok = tok or _train_tokenizer(cfg, sources.texts["train"], progress)
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    if tmp_dir.exists():
      shutil.rmtree(tmp_dir)
    tmp_dir.mkdir(parents=True)
    tok.save(tmp_dir / records.TOKENIZER_NAME)
    splits: dict[str, records.SplitInfo] = {}
    for name in SPLITS:
      log.info("tokenizing and packing the %s split (%d files)", name, sources.files[name])
      docs = _tokenize(tok, sources.texts[name], name, progress)
      tokens, segment_ids, positions = pack_documents(docs, cfg.seq_len, tok.pad_id)
      write_task = progress.add_task(f"writing {name}", total=len(tokens))
      shards, digest = records.write_shards(
          tmp_dir, name, tokens, segment_ids, positions, SPLIT_ID_BASE[name],
          cfg.records_per_shard, advance=lambda k, t=write_task: progress.advance(t, k))
      splits[name] = records.SplitInfo(
          files=sources.files[name], bytes=sources.bytes[name], documents=len(docs),
          tokens=int(sum(len(d) for d in docs)), examples=len(tokens),
          first_example_id=SPLIT_ID_BASE[name], records_sha256=digest, shards=shards)
  manifest = records.Manifest(
      format_version=records.MANIFEST_VERSION, record_version=records.RECORD_VERSION,
      seq_len=cfg.seq_len, vocab_size=tok.vocab_size, pad_id=tok.pad_id, eos_id=tok.eos_id,
      tokenizer_file=records.TOKENIZER_NAME, tokenizer_fingerprint=tok.fingerprint,
      dataset_fingerprint=_dataset_fingerprint(
          cfg.seq_len, tok.fingerprint, {n: s.records_sha256 for n, s in splits.items()}),
      source_fingerprint=sources.fingerprint, config=cfg.identity(), splits=splits,
      skipped_files=sources.undecodable)
  records.write_manifest(manifest, tmp_dir)
  if out_dir.exists():
    shutil.rmtree(out_dir)  # check_existing allowed it: an old prepared dataset, or empty
  tmp_dir.replace(out_dir)
  return manifest, False


def summary(manifest: records.Manifest, out_dir: str, elapsed: float):
  """Rich renderables: a per-split table, then vocabulary, fingerprints (first 16 hex
  digits; manifest.json holds them whole) and time."""
  table = Table(title=f"prepared dataset: {out_dir}", title_justify="left")
  for col in ("split", "files", "bytes", "documents", "tokens", "examples", "shards"):
    table.add_column(col, justify="left" if col == "split" else "right")
  for name, s in manifest.splits.items():
    table.add_row(name, f"{s.files:,}", f"{s.bytes:,}", f"{s.documents:,}", f"{s.tokens:,}",
                  f"{s.examples:,}", str(len(s.shards)))
  facts = Table.grid(padding=(0, 2))
  for key, value in (
      ("seq_len / vocab", f"{manifest.seq_len} / {manifest.vocab_size} "
                          f"(pad {manifest.pad_id}, eos {manifest.eos_id})"),
      ("skipped (not UTF-8)", str(len(manifest.skipped_files))),
      ("tokenizer fingerprint", manifest.tokenizer_fingerprint[:16]),
      ("dataset fingerprint", manifest.dataset_fingerprint[:16]),
      ("source fingerprint", manifest.source_fingerprint[:16]),
      ("elapsed", f"{elapsed:.1f}s")):
    facts.add_row(key, value)
  return Group(table, facts)


def main(argv: Sequence[str] | None = None) -> int:
  """Console entry point (``distill-prepare``)."""
  parser = argparse.ArgumentParser(
      prog="distill-prepare", add_help=False,
      description="Tokenize a text corpus into packed ArrayRecord shards (docs/data.md).")
  parser.add_argument("--config", help="YAML file (e.g. configs/prepare.yaml)")
  parser.add_argument("-h", "--help", action="store_true", help="print every option")
  add_log_level_argument(parser)
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
  args = parser.parse_args(argv)
  setup_logging(level=args.log_level)
  console = Console(stderr=False)
  if args.help:
    console.print(parser.format_usage(), markup=False)
    console.print("Options (set in --config YAML or as key=value):", markup=False)
    for line in describe(PrepareConfig):
      console.print("  " + line, markup=False, soft_wrap=True)
    return 0
  try:
    cfg = load_config(PrepareConfig, args.config, args.overrides)
    start = time.perf_counter()
    manifest, skipped = prepare(cfg, console=console)
  except (ConfigError, records.RecordError, ValueError) as e:
    console.print(f"[bold red]error:[/] {e}", highlight=False)
    return 2
  elapsed = time.perf_counter() - start
  if skipped:
    console.print(f"{cfg.output_dir} is up to date (same config and sources); "
                  "pass overwrite=true to rebuild.")
  console.print(summary(manifest, cfg.output_dir, elapsed))
  return 0


if __name__ == "__main__":
  sys.exit(main())
