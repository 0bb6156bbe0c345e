"""`python -m teacher_server.dump --remote` through two teacher-server processes, with the trainer's failover.

The first replica hangs on its first forward and is then killed (SIGKILL) while
it holds the dump's requests; the dump re-sends them to the second replica and
stores exactly what a dump through that replica alone stores. The order of
events is forced, not timed: the second replica starts only after the first
has begun a forward, and nothing can answer the dump before the kill.
"""

from __future__ import annotations

import threading

import numpy as np
from remote_utils import TeacherProcess, wait_serving
from server_utils import free_port, wait_for

from distill_core import shards
from distill_core.config import load_config
from distill_core.shards_io import AnswerStore
from teacher_server.dump import DumpSummary, dump
from teacher_server.dump_config import DumpConfig

FAKE = ["--vocab-size", "384", "--announce-forwards"]


def dump_cfg(dataset, output, address: str) -> DumpConfig:
  return load_config(DumpConfig, None, [
      f"data={dataset}", "splits=[train]", "max_examples=24", "k=4", "temperatures=[1.0,2.0]", "rows_per_request=4",
      "window=2", "records_per_shard=8", "progress=false", "process_index=0", "process_count=1",
      f"output={output}", f"remote.address={address}", "remote.request_timeout_s=null", "remote.timeout_s=600",
      "remote.backoff_initial_s=0.1", "remote.backoff_max_s=0.5"])


def test_dump_fails_over_to_a_second_replica_and_stores_the_same_answers(small_dataset, tmp_path):
  ports = [free_port(), free_port()]
  doomed = TeacherProcess(ports[0], [], tmp_path / "doomed.log", fake=["--hang-after", "0", *FAKE])
  survivor = None
  outcome: dict = {}

  def run() -> None:
    try:
      outcome["summary"] = dump(dump_cfg(small_dataset, tmp_path / "failover",
                                         f"[127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}]"))
    except BaseException as e:  # noqa: BLE001 - asserted below
      outcome["error"] = e

  thread = threading.Thread(target=run, daemon=True)
  try:
    wait_serving(doomed)
    thread.start()
    wait_for(lambda: "forward 1 started" in doomed.log_path.read_text(errors="replace"), 120,
             "the first replica starting a forward for the dump")
    survivor = TeacherProcess(ports[1], [], tmp_path / "survivor.log", fake=FAKE)
    wait_serving(survivor)
    assert thread.is_alive() and not outcome, "the dump finished while its requests were held by a hung replica"
    doomed.kill()
    thread.join(300)
    assert not thread.is_alive(), "the dump did not finish after the failover"
    assert "error" not in outcome, outcome.get("error")
    reference = dump(dump_cfg(small_dataset, tmp_path / "one", f"127.0.0.1:{ports[1]}"))
  finally:
    doomed.kill()
    if survivor is not None:
      survivor.stop()
  summary: DumpSummary = outcome["summary"]
  assert summary.records == reference.records == 24
  assert summary.failovers >= 1 and summary.retries >= 1, summary.line()
  assert reference.failovers == 0 and reference.retries == 0
  assert "failovers" in summary.line()
  got, want = shards.read_manifest(tmp_path / "failover"), shards.read_manifest(tmp_path / "one")
  assert got.complete and want.complete and got.teacher == want.teacher and got.spec == want.spec
  assert [(s.file, s.ids, s.sha256) for s in got.shards] == [(s.file, s.ids, s.sha256) for s in want.shards]
  for info in got.shards:  # byte for byte
    assert (tmp_path / "failover" / info.file).read_bytes() == (tmp_path / "one" / info.file).read_bytes()
  ids = shards.expand_runs([r for info in got.shards for r in info.ids])
  a, b = AnswerStore(tmp_path / "failover").batch(ids), AnswerStore(tmp_path / "one").batch(ids)
  for name in ("topk_ids", "topk_logits", "logsumexp"):
    np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)), err_msg=name)
