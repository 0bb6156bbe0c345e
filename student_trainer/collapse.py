"""`python -m student_trainer.collapse`: an LTI student checkpoint -> a plain student checkpoint.

Each LTI projection's effective kernel is computed once (`LTIProj.kernel`,
see `plain_model.py`, which `state.py` also uses to export) and written as the
plain projection's kernel; every other parameter is copied. The
result has no LTI parameters and no teacher kernels, and its logits equal the
LTI model's (exactly in float32, since the LTI forward uses the same kernel).

The command restores the run's latest (or `--step`) checkpoint the way resuming
does: the teacher kernels are fetched again from the source the run recorded
(HF/Orbax directory or teacher server) and checked against the recorded kernel
fingerprint. It writes an Orbax model directory (`save_model_orbax`, loadable by
`load_model(orbax_checkpoint=...)` and the teacher server) and/or a Hugging
Face directory (with the run's tokenizer.json).

    python -m student_trainer.collapse --run-dir runs/demo/lti
    python -m student_trainer.collapse --run-dir runs/demo/lti --orbax-out runs/demo/lti/collapsed --hf-out runs/demo/lti/hf
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from distill_core.checkpoints import save_model_orbax
from distill_core.config import apply_overrides, build, deep_merge
from distill_core.logs import add_log_level_argument, setup_logging
from distill_core.model.transformer import Transformer
from distill_core.sharding import make_mesh, rules_table
from student_trainer.checkpoint import Checkpointer
from student_trainer.config import TrainConfig
from student_trainer.lti.build import check_restored
from student_trainer.plain_model import collapse_model
from student_trainer.state import create_train_state, export_student

log = logging.getLogger(__name__)


def save_collapsed(state, path: str | Path) -> Path:
  """Writes the collapsed student of a TrainState as an Orbax model directory."""
  path = save_model_orbax(collapse_model(state.model()), path)
  log.info("collapsed student written to %s", path)
  return path


def collapse_run(run_dir: str | Path, *, step: int | None = None, checkpoint_dir: str | None = None,
                 orbax_out: str | Path | None = None, hf_out: str | Path | None = None,
                 overrides: list[str] = ()) -> Transformer:
  """Restores an LTI run's checkpoint (teacher kernels refetched and checked) and writes the collapsed student."""
  run_dir = Path(run_dir)
  config_file = run_dir / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{run_dir}: no config.json (not a student run directory)")
  data = apply_overrides(json.loads(config_file.read_text()), list(overrides))
  ckpt_dir = Path(checkpoint_dir or data.get("checkpoint", {}).get("directory") or run_dir / "checkpoints")
  ckpt = Checkpointer(ckpt_dir, keep=1_000_000, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{ckpt_dir}: no checkpoint")
    meta = ckpt.restore_meta(step)
    recorded = meta.get("lti")
    if not recorded:
      raise ValueError(f"{ckpt_dir} step {step}: not a learn-to-init checkpoint (nothing to collapse)")
    # Fetch the kernels from where the run recorded them.
    source = recorded["teacher"]
    lti = {"enabled": True, "kernels_from": source["kernels_from"]}
    if source["kernels_from"] == "remote":
      data = deep_merge(data, {"teacher": {"remote": {"address": source["address"]}}})
    else:
      lti["kernels_path"] = source["kernels_path"]
    cfg = build(TrainConfig, deep_merge(data, {"lti": lti}), source=str(config_file))
    mesh, rules = make_mesh(cfg.mesh), rules_table(cfg.mesh)
    state = create_train_state(cfg, mesh, rules)
    restored, _, meta = ckpt.restore(step, state.abstract())
    check_restored(recorded, state.lti, f"{ckpt_dir} step {step}")
    state = state.replace(restored)
  finally:
    ckpt.close()
  model = collapse_model(state.model())
  if orbax_out:
    save_model_orbax(model, orbax_out)
  if hf_out:
    export_student(state, hf_out, tokenizer_file=Path(cfg.data.path) / "tokenizer.json")
  return model


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m student_trainer.collapse",
      description="Turn a learn-to-init student checkpoint into a plain student (Orbax and/or Hugging Face) "
                  "whose logits equal the LTI model's. The teacher kernels are fetched again from the source "
                  "the run recorded and checked against its fingerprint.")
  parser.add_argument("--run-dir", required=True, help="The LTI run's directory (holds config.json).")
  parser.add_argument("--step", type=int, default=None, help="Checkpoint step (default: the latest).")
  parser.add_argument("--checkpoint-dir", default=None, help="Checkpoint directory (default: the run's).")
  parser.add_argument("--orbax-out", default=None, help="Orbax model directory to write (default: RUN_DIR/collapsed).")
  parser.add_argument("--hf-out", default=None, help="Hugging Face directory to write (default: RUN_DIR/hf).")
  parser.add_argument("--no-hf", action="store_true", help="Write only the Orbax directory.")
  add_log_level_argument(parser)
  parser.add_argument("overrides", nargs="*", metavar="key=value",
                      help="Overrides of the run's config, e.g. teacher.remote.token_file=... for the server.")
  args = parser.parse_args(argv)
  setup_logging(level=args.log_level)
  run_dir = Path(args.run_dir)
  orbax_out = args.orbax_out or run_dir / "collapsed"
  hf_out = None if args.no_hf else (args.hf_out or run_dir / "hf")
  try:
    collapse_run(run_dir, step=args.step, checkpoint_dir=args.checkpoint_dir, orbax_out=orbax_out,
                 hf_out=hf_out, overrides=args.overrides)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"collapsed student: {orbax_out}" + (f" (Orbax), {hf_out} (Hugging Face)" if hf_out else " (Orbax)"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
