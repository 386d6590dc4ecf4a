"""The one error type a user sees for bad input."""

from __future__ import annotations

from typing import Iterable


class ConfigError(ValueError):
  """A configuration value that cannot work, named by its dotted key.

  Raised before anything is compiled, so a user sees one line that says which
  key is wrong, what it was, and what would be accepted, instead of a traceback
  from inside JAX.
  """

  def __init__(self, key: str, message: str, choices: Iterable[object] | None = None):
    self.key = key
    self.choices = list(choices) if choices is not None else None
    text = f"config.{key}: {message}"
    if self.choices is not None:
      text += f" (valid choices: {', '.join(repr(c) for c in self.choices)})"
    super().__init__(text)


class TrainingStopped(RuntimeError):
  """A run that cannot go on (e.g. it diverged), said in one line; `exit_code` for the CLI."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class StopSignal(KeyboardInterrupt):
  """A stop signal that ends the run at once: a second Ctrl-C, SIGTERM or SIGUSR1, or one before
  training starts. Checkpoints already written are intact. A `KeyboardInterrupt`, so code that
  handles Ctrl-C handles the others alike; `exit_code` is the shell's 128 + signal number."""

  def __init__(self, signum: int):
    super().__init__(signal_name(signum))
    self.name, self.exit_code = signal_name(signum), 128 + signum


def signal_name(signum: int) -> str:
  """'Ctrl-C' for SIGINT (what a user pressed), else the signal's name ('SIGTERM')."""
  import signal

  return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
