"""A newcomer's first minutes: defaults that run, messages instead of tracebacks, logs in files,
slow paths that say so, and small papercuts."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

import pytest
from server_utils import REPO

from distill_core.config import ConfigError, describe, load_config, parse_override
from student_trainer.config import DEFAULT_DATA_PATH, TrainConfig


# -- defaults that run ------------------------------------------------------------------------------

def test_trainer_defaults_validate_and_help_shows_them():
  cfg = load_config(TrainConfig, None, [])  # before: "data: Field required"
  assert cfg.data.path == DEFAULT_DATA_PATH and cfg.model.real_vocab_size == 384
  help_lines = describe(TrainConfig)
  assert any(line.startswith(f"data.path (str, default '{DEFAULT_DATA_PATH}')") for line in help_lines)


def test_missing_default_dataset_is_prepared_and_fits_the_default_model(tmp_path, monkeypatch):
  from student_trainer.preflight import preflight
  monkeypatch.chdir(tmp_path)
  manifest = preflight(load_config(TrainConfig, None, []))
  assert (tmp_path / DEFAULT_DATA_PATH / "manifest.json").is_file()
  assert manifest.vocab_size <= 384 and manifest.splits["eval"].examples > 8


# -- one clear message instead of a traceback -------------------------------------------------------

def trainer_main(*args: str) -> tuple[int, str]:
  from student_trainer.__main__ import main
  import contextlib
  import io
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = main(list(args))
  return code, err.getvalue()


def test_missing_token_file_is_one_message_naming_it(tiny_dataset):
  code, err = trainer_main("--config", "configs/student_remote_replicas.yaml", f"data.path={tiny_dataset}",
                           "model=tiny", "loss.top_k=8")
  assert code == 1 and "Traceback" not in err
  assert re.search(r"error: teacher\.remote\.token_file: /var/run/secrets/teacher-token/token does not exist .*"
                   r"teacher\.remote\.token_file=null", err), err


def test_eval_split_too_small_is_refused_at_the_start(tiny_dataset, tmp_path):
  code, err = trainer_main(f"data.path={tiny_dataset}", "data.eval_batch_size=100000", f"run_dir={tmp_path}",
                           "logging.progress=false")
  assert code == 1 and "Traceback" not in err and not (tmp_path / "checkpoints").exists()
  assert "data.path: the eval split of" in err and "less than one eval batch" in err


def test_a_corpus_without_eval_files_is_refused_before_training(tmp_path, caplog):
  """prepare warns at once; the trainer refuses the dataset at the start (before: a crash at the
  end of training, `split 'eval' has no examples`, with no checkpoint saved)."""
  from distill_core.prepare import PrepareConfig, prepare
  from student_trainer.preflight import RunError, preflight
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(3):
    (corpus / f"f{i}.py").write_text(f"x = {i}\n" * 50)
  caplog.set_level(logging.WARNING)
  prepare(PrepareConfig(source_dir=str(corpus), eval_fraction=0.0, vocab_size=300, seq_len=32,
                        output_dir=str(tmp_path / "data")), show_progress=False)
  assert any("eval_fraction: none of the 3 files falls into the eval split" in r.getMessage() for r in caplog.records)
  cfg = load_config(TrainConfig, None, [f"data.path={tmp_path / 'data'}", "data.batch_size=2"])
  with pytest.raises(RunError, match="the eval split of .* has 0 examples, less than one eval batch"):
    preflight(cfg)


# -- logs in files ----------------------------------------------------------------------------------


def test_setup_logging_wins_over_an_earlier_basic_config(root_logging):
  from distill_core.logs import TEXT_FORMAT, setup_logging
  root_logging.handlers[:] = []
  logging.basicConfig(level=logging.WARNING)  # what importing absl/orbax does
  setup_logging(level="DEBUG")
  assert root_logging.level == logging.DEBUG and len(root_logging.handlers) == 1
  assert root_logging.handlers[0].formatter._fmt == TEXT_FORMAT and "%(asctime)s" in TEXT_FORMAT


# -- silent slow paths ------------------------------------------------------------------------------

def test_bucket_fill_names_the_bucket_that_would_fit():
  from distill_core.proto import teacher_pb2 as pb
  from remote_utils import fake_requirements
  from distill_core.stream.checks import RequestPlan, bucket_fill
  plan = RequestPlan(k=4, value_dtype="float16", layers=(), states=(), state_dtype="float32", pack_ids=True,
                     rows_per_request=8)
  need = fake_requirements(seq_len=256, batch_rows=8)
  quick_start = pb.GetInfoResponse(buckets=[pb.Bucket(batch=8, length=128), pb.Bucket(batch=8, length=512)])
  assert bucket_fill(quick_start, plan, need, rows_in_flight=64) == (0.5, (8, 512), (8, 256))
  fitting = pb.GetInfoResponse(buckets=[pb.Bucket(batch=8, length=256)])
  assert bucket_fill(fitting, plan, need, rows_in_flight=64) is None
  wide = pb.GetInfoResponse(buckets=[pb.Bucket(batch=32, length=256)])
  assert bucket_fill(wide, plan, need, rows_in_flight=8) == (0.25, (32, 256), (8, 256))
  assert bucket_fill(wide, plan, need, rows_in_flight=64) is None  # 64 rows in flight fill 32


def test_teacher_wait_fraction_counts_only_device_idle_time():
  """The loop waits 1 s for the teacher in each of two steps; the device was still busy with the
  previous step for the first 0.8 s of the second wait: 1.2 s idle, 2 s host-blocked."""
  import concurrent.futures

  from student_trainer.metrics import StepWindow

  def done(t):
    future = concurrent.futures.Future()
    future.set_result(t)
    return future

  ready = iter([1.5, 2.8])  # when step 0 and step 1 finished on the device

  class Clock:
    def track(self, leaf):
      return done(next(ready))

  window = StepWindow(Clock())
  window.add(0, {"tokens": 1.0}, tokens=8, wait=(0.0, 1.0), fallback=False)  # nothing ran before: idle
  window.add(1, {"tokens": 1.0}, tokens=8, wait=(0.7, 1.7), fallback=False)  # busy until 1.5
  assert window._idle() == pytest.approx((1.0 + 0.2, 2.0))


def test_shared_cores_are_named_in_one_line():
  from student_trainer.train import shared_cores_note
  local = load_config(TrainConfig, None, ["teacher.source=remote", "teacher.remote.address=127.0.0.1:50051"])
  far = load_config(TrainConfig, None, ["teacher.source=remote", "teacher.remote.address=10.0.0.5:50051"])
  assert "share its" in shared_cores_note(local.teacher) and "CPU cores" in shared_cores_note(local.teacher)
  assert shared_cores_note(far.teacher) is None
  assert "share its devices" in shared_cores_note(load_config(TrainConfig, None, ["teacher.source=local",
                                                                                  "teacher.local.model=tiny"]).teacher)
  cached = load_config(TrainConfig, None, ["teacher.source=cached", "teacher.cached.path=c",
                                           "teacher.remote.address=localhost:50051"])
  assert "is on this machine" in shared_cores_note(cached.teacher)  # cached reaches its server through teacher.remote


# -- papercuts --------------------------------------------------------------------------------------

def test_glob_override_is_accepted_as_typed():
  assert parse_override("glob=**/*.md") == (["glob"], "**/*.md")
  with pytest.raises(ConfigError, match="is not valid YAML"):
    parse_override("loss.layer_map=[0,2")


def test_exported_weights_are_world_readable(tmp_path):
  from distill_core.checkpoints import load_model
  from distill_core.config import build, resolve_preset
  from distill_core.model.config import ModelConfig
  from distill_core.model.hf import save_hf_checkpoint
  save_hf_checkpoint(load_model(build(ModelConfig, resolve_preset("tiny")), seed=0), tmp_path / "hf")
  assert (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_help_texts_show_defaults_and_point_at_real_docs(capsys):
  sys.path.insert(0, str(REPO / "scripts"))
  try:
    import demo
  finally:
    sys.path.pop(0)
  with pytest.raises(SystemExit):
    demo.main(["--help"])
  text = capsys.readouterr().out
  assert "(default: 200)" in text and "(default: runs/demo)" in text
  help_text = "\n".join(describe(TrainConfig))
  assert "DESIGN" not in help_text and "teacher.value_dtype" in help_text
  assert "docs/losses.md, 'The teacher-target contract'" in help_text
  assert "## The teacher-target contract" in (REPO / "docs" / "losses.md").read_text()


def test_benchmarks_write_outside_the_work_tree():
  from benchmarks.bench_streaming import parse_args
  workdir = Path(parse_args([]).workdir).resolve()
  assert REPO not in workdir.parents and workdir != REPO
