"""The trainer's one error for a run that cannot start or go on as configured (below every module that raises it)."""


class RunError(ValueError):
  """A run that cannot start (or go on) as configured; the message names the file or option."""
