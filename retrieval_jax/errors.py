"""User errors: wrong input that the user can fix, reported without a traceback.

A missing dataset, a bad config value, a weight file that is not one, a tampered ground
truth: `main.py` prints the message alone and exits with code 2
(`report_user_errors`); `--verbose` or RETRIEVAL_JAX_VERBOSE=1 shows the traceback. Any
other exception is a bug and keeps its traceback.

This module imports nothing from the package, so every layer may raise these.
"""
import os
import pickle
import sys
from typing import Any, Callable, Optional, TextIO

VERBOSE_ENV = "RETRIEVAL_JAX_VERBOSE"
EXIT_CODE = 2


class UserError(Exception):
  """Base (or mixin) of the errors whose message tells the user what to change."""


class NotAWeightFileError(UserError, ValueError):
  """A `model.pretrained` file that cannot be read as weights."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A requested checkpoint step that the workdir does not have."""


def is_user_error(exc: BaseException) -> bool:
  """UserError, a missing file, or a refused pickle (a tampered ground-truth file)."""
  return isinstance(exc, (UserError, FileNotFoundError, pickle.UnpicklingError))


def verbose_requested(flag: bool = False) -> bool:
  return bool(flag) or os.environ.get(VERBOSE_ENV, "").lower() in ("1", "true", "yes")


def one_line(exc: BaseException) -> str:
  """'error: <message>' (the message keeps its own hint lines)."""
  text = str(exc).strip() or type(exc).__name__
  if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
    text = f"{text}: {exc.filename}"
  return f"error: {text}"


def report_user_errors(fn: Callable[..., Any], *args: Any, verbose: bool = False,
                       stream: Optional[TextIO] = None, **kwargs: Any) -> Any:
  """Calls fn(*args, **kwargs); a user error is printed and exits with code 2.

  Args:
    fn: the mode to run.
    *args, **kwargs: its arguments.
    verbose: re-raise user errors with their traceback (also RETRIEVAL_JAX_VERBOSE=1).
    stream: where the message goes (default sys.stderr).

  Returns:
    fn's result.

  Raises:
    SystemExit(2) for a user error; every other exception propagates unchanged.
  """
  try:
    return fn(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    if not is_user_error(e) or verbose_requested(verbose):
      raise
    print(one_line(e) + f"\n(set {VERBOSE_ENV}=1 or pass --verbose for the traceback)",
          file=stream or sys.stderr)
    raise SystemExit(EXIT_CODE) from None
