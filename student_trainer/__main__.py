"""`python -m student_trainer --config FILE [key=value ...]`: train a student."""

from __future__ import annotations

import argparse
import logging
import sys

from distill_core.config import ConfigError, describe, load_config
from distill_core.logs import add_log_level_argument, setup_logging
from student_trainer import distributed
from student_trainer.config import TrainConfig
from student_trainer.lti.build import plan_for
from student_trainer.lti.surgery import LTIPlanError
from student_trainer.preflight import one_line, user_errors
from student_trainer.train import run


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(
      prog="student-trainer",
      description="Train a student LLM with cross-entropy and knowledge distillation from a teacher "
                  "(none, local in-process, or a remote teacher server).",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="options (set in the YAML file or as key=value overrides, e.g. optim.learning_rate=1e-3):\n  "
             + "\n  ".join(describe(TrainConfig)))
  parser.add_argument("--config", help="YAML run configuration (see configs/).")
  add_log_level_argument(parser)
  parser.add_argument("--lti-plan", action="store_true",
                      help="Dry run of learn-to-init (lti.*): print what every projection/share/copy/train "
                           "pattern matches, from parameter shapes only (no model is allocated, no teacher "
                           "weights are read), then exit.")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="Overrides applied on top of the file.")
  return parser.parse_args(argv), []


def main(argv: list[str] | None = None) -> int:
  args, _ = parse_args(argv)
  setup_logging(level=args.log_level)
  try:
    cfg = load_config(TrainConfig, args.config, args.overrides)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.lti_plan:
    return _print_lti_plan(cfg)
  try:
    result = run(cfg)
  except LTIPlanError as e:
    print(f"error: {one_line(e)}", file=sys.stderr)
    distributed.exit_after_failure(2)
    return 2
  except user_errors() as e:  # a message naming the file or option; no traceback to dig through
    print(f"error: {one_line(e)}", file=sys.stderr)
    distributed.exit_after_failure(1)
    return 1
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    distributed.exit_after_failure(130)
    return 130
  except BaseException:
    logging.getLogger("student_trainer").exception("training failed")
    distributed.exit_after_failure()  # several processes: leave now, the others are ending too
    raise
  status = "stopped early (preempted)" if result.preempted else "finished"
  print(f"{status} at step {result.step}; run directory: {result.run_dir}")
  for key, value in sorted(result.last_metrics.items()):
    print(f"  {key} = {value:.5g}")
  return 0


def _print_lti_plan(cfg: TrainConfig) -> int:
  if not cfg.from_teacher:
    print("error: --lti-plan needs lti.enabled=true or copy_from_teacher (and lti.kernels_from)", file=sys.stderr)
    return 2
  try:
    plan, _ = plan_for(cfg)
  except (LTIPlanError, FileNotFoundError, ConnectionError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(plan.describe())
  return 0


if __name__ == "__main__":
  sys.exit(main())
