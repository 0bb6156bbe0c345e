"""GetParameters: which parameters a request selects, and how they are cut into chunks.

The teacher's weights leave the server only when ``serve_parameters`` is on (and,
with ``security.parameters_token``, only to holders of that token). The name
pattern is an RE2 expression (``google-re2``: linear time in the names' length,
bounded memory, no backtracking), at most :data:`MAX_NAME_REGEX_CHARS` long, so
no client pattern can stall the server. Chunks are at least :data:`MIN_CHUNK_BYTES`
(or 0 for the server default), so a download cannot be turned into a flood of
tiny messages.
"""

from __future__ import annotations

import grpc
import re2

from distill_core.wire import echo
from teacher_server.config import MIN_CHUNK_BYTES
from teacher_server.validation import RequestError

MAX_NAME_REGEX_CHARS = 1024
_REGEX_MEMORY = 8 << 20  # RE2's budget for the compiled program and its DFA cache
_INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _options() -> re2.Options:
  options = re2.Options()
  options.max_mem = _REGEX_MEMORY
  options.log_errors = False  # a bad client pattern is the client's error, not a server log line
  return options


def compile_name_regex(text: str):
  """The compiled RE2 pattern for ``GetParametersRequest.name_regex``; RequestError naming the field otherwise."""
  if not text:
    raise RequestError(_INVALID, "name_regex", "required (use '.*' for all)")
  if len(text) > MAX_NAME_REGEX_CHARS:
    raise RequestError(_INVALID, "name_regex", f"{len(text)} characters exceed the limit of "
                                               f"{MAX_NAME_REGEX_CHARS}: {echo(text)}")
  try:
    return re2.compile(text, _options())
  except re2.error as e:
    reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
    raise RequestError(_INVALID, "name_regex", f"invalid RE2 pattern {echo(text)} ({echo(reason)})") from None


def chunk_size(requested: int, default: int, max_message_bytes: int) -> int:
  """Bytes per ParameterChunk for a request's ``chunk_bytes`` (0 = ``default``), capped by the message limit."""
  if requested < 0 or 0 < requested < MIN_CHUNK_BYTES:
    raise RequestError(_INVALID, "chunk_bytes", f"{requested} must be 0 (the server default) or at least "
                                                f"{MIN_CHUNK_BYTES}")
  return max(1, min(requested or default, max_message_bytes - 4096))
