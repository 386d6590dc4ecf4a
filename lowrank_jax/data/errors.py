"""The data package's own exception type."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
  """A request the data cannot satisfy (e.g. too few tokens for one batch).

  A ``ValueError`` subclass so callers that already catch bad-argument errors
  keep working, while the trainer can single out "your data is too small".
  """
