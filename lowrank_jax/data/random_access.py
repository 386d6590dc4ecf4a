"""What the random-access sources share: index checks and positioned reads from indexed files.

The line index of text / JSON-lines files (``text_files``) and the record index of TFRecord
shards (``tfrecord``) both read a byte range of one of their files with ``os.pread``: it takes
an explicit offset and touches no shared file position, so grain's reader threads can read
concurrently from one descriptor without a lock.
"""

from __future__ import annotations

import os
import threading

__all__ = ["IndexedFiles", "checked_index"]


def checked_index(index: int, n: int, what: str = "documents") -> int:
  """``index`` as an int in ``[0, n)``; a negative one counts from the end, as for a list.

  Raises ``IndexError`` outside ``[-n, n)`` (naming ``what`` the ``n`` items are).
  """
  if not -n <= index < n:
    raise IndexError(f"index {index} out of range for {n} {what}")
  return int(index) % n


class IndexedFiles:
  """Mixin: the files ``self.paths``, opened lazily read-only, and positioned reads from them.

  A subclass sets ``self.paths`` and calls :meth:`_init_files`. Descriptors are opened on
  first use (so a source over thousands of files opens instantly) and closed when the
  object is collected; they cannot be pickled, so a subclass's pickled state leaves them
  out and calls :meth:`_init_files` again when unpickled.
  """

  paths: list[str]

  def _init_files(self) -> None:
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()

  def _fd(self, k: int) -> int:
    """The descriptor of ``self.paths[k]``, opened once (under a lock: reader threads)."""
    fd = self._fds.get(k)
    if fd is None:
      with self._lock:
        fd = self._fds.get(k)
        if fd is None:
          fd = os.open(self.paths[k], os.O_RDONLY)
          self._fds[k] = fd
    return fd

  def _pread(self, k: int, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset`` of ``self.paths[k]``.

    ``pread`` may return fewer bytes than asked: read until done. A file that ends first
    was changed after it was indexed: ``OSError``.
    """
    fd = self._fd(k)
    parts, done = [], 0
    while done < length:
      part = os.pread(fd, length - done, offset + done)
      if not part:
        raise OSError(f"{self.paths[k]!r} ended at offset {offset + done} while being read; "
                      "was it modified after indexing?")
      parts.append(part)
      done += len(part)
    return b"".join(parts)

  def __del__(self, _close=os.close):  # os may be gone at interpreter exit
    for fd in getattr(self, "_fds", {}).values():
      try:
        _close(fd)
      except OSError:
        pass
