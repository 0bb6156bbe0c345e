"""What a run needs from its teacher (`Needs`), what a source offers (`Offer`), and the one check
between them (`check`).

A student (or a dump) derives its `Needs` once from its configuration: the top-k it reads,
the value dtype, the temperatures stored answers must hold, the teacher layers and states its
losses read, the requests of the other teacher-target parts its losses read (`Needs.parts`, e.g.
the draws of sampled targets), the vocabulary, tokenizer and sequence length of its data.
Every source describes what it can give as an `Offer`: a teacher server by its GetInfo
(`Offer.from_info`), stored answers by their manifest (`Offer.from_manifest`). `check` lists
every mismatch, each naming the field and both values; the vocabulary, tokenizer and sequence
checks are here, and each teacher-target part (`distill_core.parts`) adds its own piece.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping

from distill_core.parts import PARTS, by_part_name
from distill_core.proto import teacher_pb2 as pb
from distill_core.tensor_codec import dtype_name

if TYPE_CHECKING:
  from distill_core.shards import Manifest


@by_part_name
@dataclasses.dataclass(frozen=True)
class Needs:
  """What the caller's losses (or stored answers) and data need from a teacher; `parts`: (part name, request)
  of the parts its losses read besides top-k and states (also given and read by name, `Needs(samples=...)`)."""

  k: int  # top-k ids per position (loss.top_k, or 1 with another part alone)
  value_dtype: str  # dtype of the top-k values
  vocab_size: int | None  # the student's real vocabulary; must equal the teacher's (None: the teacher's)
  data_vocab_size: int  # token ids in the data are below this
  seq_len: int  # T of every batch
  batch_rows: int  # rows of this process's batches
  tokenizer_fingerprint: str  # of the prepared dataset ("" = unknown)
  hidden_size: int | None  # student width (states are compared with it; None: the teacher's)
  feature_layers: Callable[[int], tuple[int, ...]]  # teacher depth -> layers whose states are needed
  state_names: tuple[str, ...] = ("attn_out",)  # states needed at those layers (attn_in too for blockwise)
  temperatures: tuple[float, ...] = ()  # logsumexp columns stored answers must hold (exactly; () = any)
  dataset_fingerprint: str = ""  # of the prepared dataset stored answers must be of ("" = any)
  weights_fingerprint: str = ""  # the teacher weights stored answers must be of ("" = any)
  state_dtype: str | None = None  # dtype the layer states are asked in (None: not checked)
  parts: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), kw_only=True)

  def layers(self, teacher_depth: int) -> tuple[int, ...]:
    """The teacher layers whose states are read (empty when no loss reads states)."""
    return tuple(self.feature_layers(teacher_depth)) if self.state_names else ()


@by_part_name
@dataclasses.dataclass(frozen=True)
class Offer:
  """What a source can give. `stored`: fixed answers (a manifest) rather than a teacher computing on request;
  the problems then name the manifest's fields (`spec.k`, `teacher.vocab_size`, ...)."""

  stored: bool
  vocab_size: int
  num_layers: int
  hidden_size: int
  tokenizer_fingerprint: str = ""
  padded_vocab_size: int | None = None
  max_seq_len: int | None = None  # the longest bucket (a server)
  max_position_embeddings: int | None = None
  max_k: int = 0  # a server's largest k, or the k stored
  value_dtypes: tuple[str, ...] = ()
  temperatures: tuple[float, ...] | None = None  # stored logsumexp columns (None: any is computed)
  layers: tuple[int, ...] = ()  # selectable (a server) or stored teacher layers
  states: tuple[str, ...] = ()
  state_dtypes: tuple[str, ...] | None = None
  part_limits: Mapping[str, int] = dataclasses.field(default_factory=dict)  # a server's limits of its parts
  dataset_fingerprint: str = ""  # stored answers: of the dataset answered
  dataset_tokenizer_fingerprint: str = ""
  seq_len: int | None = None  # stored answers: T of every record
  weights_fingerprint: str = ""
  # (part name, request) of the parts stored answers hold (with `stored`), also read by name (`offer.samples`)
  parts: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), kw_only=True)

  @classmethod
  def from_info(cls, info: pb.GetInfoResponse) -> "Offer":
    """A teacher server, by its GetInfo."""
    limits = info.limits
    return cls(stored=False, vocab_size=info.vocab_size, padded_vocab_size=info.padded_vocab_size,
               num_layers=info.num_layers, hidden_size=info.hidden_size,
               tokenizer_fingerprint=info.tokenizer_fingerprint, max_seq_len=limits.max_seq_len,
               max_position_embeddings=info.max_position_embeddings, max_k=limits.max_k,
               value_dtypes=_dtype_names(info.value_dtypes), layers=tuple(limits.selectable_layers),
               states=tuple(info.state_names), state_dtypes=_dtype_names(info.state_dtypes),
               part_limits={name: value for part in PARTS for name, value in part.read_limits(limits).items()},
               weights_fingerprint=info.weights_fingerprint)

  @classmethod
  def from_manifest(cls, manifest: "Manifest") -> "Offer":
    """Stored answers, by their manifest."""
    spec, teacher = manifest.spec, manifest.teacher
    return cls(stored=True, vocab_size=teacher.vocab_size, num_layers=teacher.num_layers,
               hidden_size=teacher.hidden_size, tokenizer_fingerprint=teacher.tokenizer_fingerprint,
               max_k=spec.k, value_dtypes=(spec.value_dtype,), temperatures=tuple(manifest.temperatures),
               layers=spec.layers, states=spec.states, parts=spec.parts,
               dataset_fingerprint=manifest.dataset.dataset_fingerprint,
               dataset_tokenizer_fingerprint=manifest.dataset.tokenizer_fingerprint, seq_len=manifest.dataset.seq_len,
               weights_fingerprint=teacher.weights_fingerprint)


def _dtype_names(values) -> tuple[str, ...]:
  names = []
  for value in values:
    try:
      names.append(dtype_name(value))
    except ValueError:  # a dtype this client does not know: not usable anyway
      pass
  return tuple(sorted(set(names)))


def check(needs: Needs, offer: Offer) -> list[str]:
  """Every problem serving `needs` from `offer`, each naming the field and both values (empty: it fits)."""
  problems = _check_stored(needs, offer) if offer.stored else _check_server(needs, offer)
  for part in PARTS:
    problems += part.check(needs, offer)
  return problems


def _check_server(need: Needs, info: Offer) -> list[str]:
  problems = []
  if need.vocab_size is not None and info.vocab_size != need.vocab_size:
    padded = f" (embedding rows {info.padded_vocab_size})" if info.padded_vocab_size not in (None, info.vocab_size) \
        else ""
    problems.append(f"vocabulary: the teacher has {info.vocab_size} real ids{padded}, the student "
                    f"{need.vocab_size}")
  if need.data_vocab_size > info.vocab_size:
    problems.append(f"vocabulary: the dataset's tokenizer has {need.data_vocab_size} ids, more than the "
                    f"teacher's {info.vocab_size}")
  if info.tokenizer_fingerprint and need.tokenizer_fingerprint and \
      info.tokenizer_fingerprint != need.tokenizer_fingerprint:
    problems.append(f"tokenizer: the teacher's fingerprint {info.tokenizer_fingerprint[:16]}... differs from "
                    f"the dataset's {need.tokenizer_fingerprint[:16]}...")
  if info.max_seq_len is not None and need.seq_len > info.max_seq_len:
    problems.append(f"sequence length: batches have T={need.seq_len}, the teacher's longest bucket is "
                    f"{info.max_seq_len}")
  if info.max_position_embeddings is not None and need.seq_len > info.max_position_embeddings:
    problems.append(f"sequence length: T={need.seq_len} exceeds the teacher's max_position_embeddings "
                    f"{info.max_position_embeddings}")
  return problems


def _check_stored(need: Needs, stored: Offer) -> list[str]:
  problems = []

  def differ(field: str, have, want, what: str) -> None:
    if have != want:
      problems.append(f"{field}: stored {have!r}, {what} {want!r}")

  differ("dataset.tokenizer_fingerprint", stored.dataset_tokenizer_fingerprint, need.tokenizer_fingerprint,
         "data.path has")
  if stored.tokenizer_fingerprint:
    differ("teacher.tokenizer_fingerprint", stored.tokenizer_fingerprint, need.tokenizer_fingerprint, "data.path has")
  if need.dataset_fingerprint:
    differ("dataset.dataset_fingerprint", stored.dataset_fingerprint, need.dataset_fingerprint, "data.path has")
  differ("dataset.seq_len", stored.seq_len, need.seq_len, "data.path has")
  if need.vocab_size is not None:
    differ("teacher.vocab_size", stored.vocab_size, need.vocab_size, "the student's")
  if need.weights_fingerprint:
    differ("teacher.weights_fingerprint", stored.weights_fingerprint, need.weights_fingerprint,
           "teacher.offline.weights_fingerprint is")
  return problems

