"""A teacher-server process around the fake engine, for fault tests that need a real second process.

    python tests/fake_teacher.py [--delay-s 8] [--hang-after N] [--corrupt ids|first_value|lse]
                                 [--vocab-size 256] [--buckets 4x16,4x32] [--announce-forwards] key=value...

The overrides are teacher-server config fields (on top of `server_utils.fake_config`). `--delay-s`
makes every engine forward sleep and `--hang-after N` makes every forward after the first N
block for good (a hung engine whose event loop still answers health and GetInfo);
`--announce-forwards` prints ``forward N started`` as each forward begins (so a test can wait for it);
`--corrupt` makes every answer wrong in one way:

* `ids`: one top-k id per position is outside the vocabulary (still encodable in the packed bits);
* `first_value`: the top value is -0.5 instead of exactly 0;
* `lse`: the logsumexp is -60 (passes the answer checks; the loss is not finite).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server_utils import fake_config  # noqa: E402

from distill_core.logs import setup_logging  # noqa: E402
from teacher_server.engine_api import EngineOutput  # noqa: E402
from support.fake_engine import FakeEngine, fake_info  # noqa: E402
from teacher_server.server import serve  # noqa: E402

CORRUPTIONS = ("ids", "first_value", "lse")


class CorruptEngine(FakeEngine):
  """The fake engine, with every answer damaged as `corrupt` says."""

  def __init__(self, *args, corrupt: str | None = None, hang_after: int | None = None, announce: bool = False,
               **kwargs):
    super().__init__(*args, **kwargs)
    self.announce = announce
    self.corrupt = corrupt
    self.hang_after = hang_after
    self.forwards = 0

  def forward(self, batch) -> EngineOutput:
    self.forwards += 1
    if self.announce:
      print(f"forward {self.forwards} started", flush=True)
    if self.hang_after is not None and self.forwards > self.hang_after:
      threading.Event().wait()  # hung for good; the event loop (health, GetInfo) still answers
    out = super().forward(batch)
    vocab = self.info.vocab_size
    if self.corrupt == "ids":
      out.topk_ids[..., 1] = vocab + 3  # below 2**bits for the vocabularies the tests use
    elif self.corrupt == "first_value":
      out.topk_logits[..., 0] = -0.5
    elif self.corrupt == "lse":
      out.logsumexp[...] = -60.0
    return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--delay-s", type=float, default=0.0, help="sleep in every engine forward")
  parser.add_argument("--hang-after", type=int, help="every engine forward after the first N never returns")
  parser.add_argument("--corrupt", choices=CORRUPTIONS, help="damage every answer this way")
  parser.add_argument("--vocab-size", type=int, default=256, help="the fake model's vocabulary")
  parser.add_argument("--buckets", default="4x16,4x32", help="engine buckets as BxT,BxT")
  parser.add_argument("--announce-forwards", action="store_true", help="print a line as each forward starts")
  parser.add_argument("overrides", nargs="*", help="teacher-server config overrides")
  args = parser.parse_args(argv)
  buckets = tuple(tuple(int(x) for x in b.split("x")) for b in args.buckets.split(","))
  cfg = fake_config(f"batcher.buckets={[list(b) for b in buckets]}", *args.overrides)
  setup_logging(cfg.log_format, cfg.log_level)
  engine = CorruptEngine(fake_info(vocab_size=args.vocab_size, buckets=buckets), delay_s=args.delay_s,
                         corrupt=args.corrupt, hang_after=args.hang_after, announce=args.announce_forwards)
  return asyncio.run(serve(cfg, engine))


if __name__ == "__main__":
  sys.exit(main())
