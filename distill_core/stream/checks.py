"""Connect-time checks of a teacher server against its caller, and the request plan they yield.

The caller (a student, or a dump) refuses a teacher whose answers would not
mean what it assumes: another vocabulary, another tokenizer, sequences it
cannot take, layers it does not offer. A teacher whose embedding table is
padded beyond its real vocabulary is fine (the server masks the padded ids).
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
from typing import Any

import numpy as np

from distill_core.needs import Needs, Offer, check
from distill_core.parts import BY_NAME, by_part_name
from distill_core.proto import teacher_pb2 as pb
from distill_core.wire import OutputSpec


class TeacherMismatch(ValueError):
  """The teacher cannot serve this student; the message lists every mismatch."""


Requirements = Needs  # what the caller's losses and data need (`distill_core.needs`)


@dataclasses.dataclass(frozen=True)
class RequestShape:
  """How the caller asks: request sizes and encodings (not what the answers mean)."""

  state_dtype: str = "bfloat16"  # dtype of streamed layer states
  pack_ids: bool = True  # bit-packed top-k ids
  rows_per_request: int | None = None  # cap on rows per request (None: the server's limits decide)
  window: int = 1  # batches in flight ahead of the one consumed (for the padding warning)

  @classmethod
  def of(cls, cfg: Any) -> "RequestShape":
    """From a config with these four fields (the trainer's teacher.remote, the dump's config)."""
    return cls(state_dtype=cfg.state_dtype, pack_ids=cfg.pack_ids, rows_per_request=cfg.rows_per_request,
               window=cfg.window)


@by_part_name
@dataclasses.dataclass(frozen=True)
class RequestPlan:
  """How batches are asked for: the fixed part of every request (`parts`: the other parts' requests)."""

  k: int
  value_dtype: str
  layers: tuple[int, ...]
  states: tuple[str, ...]
  state_dtype: str
  pack_ids: bool
  rows_per_request: int
  parts: tuple[tuple[str, Any], ...] = dataclasses.field(default=(), kw_only=True)

  def names(self, states: tuple[str, ...] | None) -> tuple[str, ...]:
    """The planned state names a batch asking for `states` gets (None: all planned)."""
    return self.states if states is None else tuple(name for name in self.states if name in states)

  def spec(self, temperatures: float | tuple[float, ...], states: tuple[str, ...] | None = None) -> OutputSpec:
    """The request spec at one temperature or several; `states` narrows the planned state names for one
    batch (None: all of them)."""
    names = self.names(states)
    temps = (temperatures,) if isinstance(temperatures, (int, float)) else temperatures
    return OutputSpec(k=self.k, temperatures=tuple(float(t) for t in temps), value_dtype=self.value_dtype,
                      layers=self.layers if names else (), states=names, state_dtype=self.state_dtype,
                      pack_ids=self.pack_ids, parts=self.parts)

  def row_bytes(self, seq_len: int, hidden_size: int) -> int:
    """Approximate answer bytes per row (what the server checks against its message limit)."""
    per_position = self.k * (4 + np.dtype(self.value_dtype).itemsize) + 4
    per_position += sum(BY_NAME[name].answer_bytes(request, self.value_dtype) for name, request in self.parts)
    states = len(self.states) * len(self.layers) * hidden_size * np.dtype(self.state_dtype).itemsize
    return seq_len * (per_position + states)


def plan_requests(info: pb.GetInfoResponse, need: Needs, *, state_dtype: str, pack_ids: bool,
                  rows_per_request: int | None, max_message_bytes: int) -> RequestPlan:
  """Checks `info` against `need` (`distill_core.needs.check`); returns the request plan or raises
  TeacherMismatch naming every problem."""
  problems = check(dataclasses.replace(need, state_dtype=state_dtype), Offer.from_info(info))
  limits = info.limits
  try:
    layers = need.layers(info.num_layers)
  except ValueError:  # named by check
    layers = ()
  plan = RequestPlan(k=need.k, value_dtype=need.value_dtype, layers=layers,
                     states=tuple(need.state_names) if layers else (), state_dtype=state_dtype, pack_ids=pack_ids,
                     rows_per_request=1, parts=need.parts)
  message_cap = min(max_message_bytes, limits.max_message_bytes or max_message_bytes) - 4096
  caps = {"the batch": need.batch_rows, "max_batch": limits.max_batch,
          "max_tokens_per_request": limits.max_tokens_per_request // max(need.seq_len, 1),
          "the message size limit": message_cap // plan.row_bytes(need.seq_len, info.hidden_size)}
  if rows_per_request is not None:
    caps["rows_per_request"] = rows_per_request
  rows = min(caps.values())
  if rows < 1:
    tight = [name for name, cap in caps.items() if cap < 1]
    problems.append(f"request size: one row of {need.seq_len} tokens does not fit {', '.join(tight)}")
  if problems:
    raise TeacherMismatch("the teacher server cannot serve this student:\n  " + "\n  ".join(problems))
  return dataclasses.replace(plan, rows_per_request=rows)


def replica_problems(info: pb.GetInfoResponse, plan: RequestPlan, need: Needs) -> list[str]:
  """Why another replica cannot take requests planned for the first one (empty when it can): the needs as
  planned (`distill_core.needs.check`), and the planned request size."""
  planned = dataclasses.replace(need, k=plan.k, parts=plan.parts, state_dtype=plan.state_dtype if plan.layers
                                else None, feature_layers=lambda depth: plan.layers, state_names=plan.states)
  problems = check(planned, Offer.from_info(info))
  limits = info.limits
  if plan.rows_per_request > limits.max_batch or \
      plan.rows_per_request * need.seq_len > limits.max_tokens_per_request:
    problems.append(f"max_batch {limits.max_batch} / max_tokens_per_request {limits.max_tokens_per_request} "
                    f"too small for {plan.rows_per_request} rows of {need.seq_len}")
  return problems


def bucket_fill(info: pb.GetInfoResponse, plan: RequestPlan, need: Requirements, *,
                rows_in_flight: int) -> tuple[float, tuple[int, int], tuple[int, int]] | None:
  """(fill, bucket, a bucket that fits) when the server's buckets would leave half or more padding.

  The server pads each request's rows to the shortest bucket length >= T and packs the rows in
  flight into the smallest bucket batch that holds them; `fill` is the share of real tokens in
  those engine batches. None when the fill is above one half or the server lists no buckets.
  """
  fitting = sorted((b.length, b.batch) for b in info.buckets if b.length >= need.seq_len)
  if not fitting:
    return None
  length = fitting[0][0]
  batches = sorted(batch for t, batch in fitting if t == length)
  rows = min(rows_in_flight, batches[-1])
  batch = next(b for b in batches if b >= rows)
  fill = (need.seq_len * rows) / (length * batch)
  if fill > 0.5:
    return None
  return fill, (batch, length), (min(batch, max(plan.rows_per_request, rows)), need.seq_len)


# -- why nothing answers ---------------------------------------------------------------------------

def probe_target(target: str) -> tuple[str, int] | None:
  """(host, port) of a plain ``host:port`` or ``dns:///host:port`` target; None for what a probe cannot
  reach directly (unix sockets, address lists)."""
  if target.startswith(("unix:", "ipv4:", "ipv6:")):
    return None
  if target.startswith("dns:"):
    target = target.split("/")[-1]
  host, _, port = target.rpartition(":")
  if not host or not port.isdigit():
    return None
  return host.strip("[]"), int(port)


def diagnose_connection(target: str, *, tls: bool, timeout_s: float = 2.0, options: str = "teacher.remote.") -> str:
  """What a direct look at `target` finds, in words: nothing listening, no answer, or a TLS mismatch
  (the server completes a TLS handshake while the client speaks plaintext, or the other way round).
  Empty when it finds nothing wrong at that level (the gRPC error then says more). `options`: the
  prefix of the client's config keys in the advice."""
  where = probe_target(target)
  if where is None:
    return ""
  host, port = where
  try:
    sock = socket.create_connection((host, port), timeout=timeout_s)
  except ConnectionRefusedError:
    return f"nothing listens on {host}:{port} (connection refused): is the teacher server running, on this port?"
  except socket.gaierror as e:
    return f"cannot resolve {host}: {e.strerror or e}"
  except TimeoutError:
    return f"no TCP answer from {host}:{port} within {timeout_s:g} s (a firewall, or a wrong address?)"
  except OSError as e:
    return f"cannot reach {host}:{port}: {e.strerror or e}"
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
  context.check_hostname = False
  context.verify_mode = ssl.CERT_NONE  # only asking whether the server speaks TLS at all
  context.set_alpn_protocols(["h2"])
  try:
    with sock, context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False) as tls_sock:
      tls_sock.settimeout(timeout_s)
      tls_sock.do_handshake()
    speaks_tls = True
  except (ssl.SSLError, OSError):
    speaks_tls = False
  if speaks_tls and not tls:
    return (f"the server at {host}:{port} speaks TLS but this client connects in plaintext: set "
            f"{options}tls=true (and {options}root_certificates=CA.pem when its certificate is not "
            "publicly trusted)")
  if tls and not speaks_tls:
    return (f"the server at {host}:{port} does not complete a TLS handshake (a plaintext server?) but this client "
            f"uses TLS: set {options}tls=false and no root_certificates, or start the server with "
            "security.tls_cert and security.tls_key")
  return ""
