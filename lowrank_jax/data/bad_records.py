"""Skipping the records of a source that cannot be read, counted and named.

A corpus of millions of lines may hold one malformed JSON line, one line that is
not UTF-8, one truncated image. By default the trainer stops at such a record
(``data.on_bad_record=error``, after saving a checkpoint) and names it; with
``skip`` this wrapper turns it into ``None``, which grain's datasets treat as a
filtered element: the stream goes on with the next record, and since the
pipeline's state is an index into the source, resuming is still exact.
"""

from __future__ import annotations

import logging
import threading

from lowrank_jax.data.errors import DataFileError

__all__ = ["SkipBadRecords"]

_log = logging.getLogger(__name__)


class SkipBadRecords:
  """A random-access source whose unreadable records (``DataFileError``) read as ``None``.

  ``skipped`` counts them (reader threads included). The first ``named`` of them are
  logged as a warning each, naming file and line; later ones are only counted.
  """

  def __init__(self, source, *, named: int = 10):
    self._source, self._named = source, named
    self._lock = threading.Lock()
    self.skipped = 0

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int):
    try:
      return self._source[index]
    except DataFileError as e:
      with self._lock:
        self.skipped += 1
        count = self.skipped
      if count <= self._named:
        more = " (further ones are only counted: skipped_records in the metrics)" if count == self._named else ""
        _log.warning("skipped a bad record: %s%s", e, more)
      return None

  def __getstate__(self):  # the lock does not pickle (grain worker processes)
    return {"source": self._source, "named": self._named, "skipped": self.skipped}

  def __setstate__(self, state):
    self.__init__(state["source"], named=state["named"])
    self.skipped = state["skipped"]

  def __repr__(self) -> str:
    return f"SkipBadRecords({self._source!r})"
