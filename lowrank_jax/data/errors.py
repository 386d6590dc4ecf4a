"""The data package's own exception types."""

from __future__ import annotations

__all__ = ["DataError", "DataFileError"]


class DataError(ValueError):
  """A request the data cannot satisfy (e.g. too few tokens for one batch).

  A ``ValueError`` subclass so callers that already catch bad-argument errors
  keep working, while the trainer can single out "your data is too small".
  ``argument`` names the argument at fault when it is not the data itself
  (``"text_key"``, ``"split"``), so a caller that maps arguments to its own
  settings can blame the right one.
  """

  def __init__(self, message: str, *, argument: str | None = None):
    super().__init__(message)
    self.argument = argument

  def __reduce__(self):  # keep `argument` across processes (grain workers)
    return _rebuild_data_error, (type(self), self.args[0], self.argument)


class DataFileError(ValueError):
  """A data file whose content cannot be read as documents, at a known place.

  The message starts with ``path:line:`` (1-based line, as editors and
  compilers print it), so a user can open the file at the bad record.
  ``line`` is None when the problem is the file as a whole (e.g. binary).
  """

  def __init__(self, path: str, line: int | None, message: str):
    super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")
    self.path = path
    self.line = line
    self.message = message

  def __reduce__(self):
    return type(self), (self.path, self.line, self.message)


def _rebuild_data_error(cls, message, argument):
  return cls(message, argument=argument)
