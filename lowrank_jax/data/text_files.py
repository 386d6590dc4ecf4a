"""Random access to the lines of (possibly huge) JSONL and plain-text files.

A training pipeline needs ``source[i]`` for a shuffled ``i``. Loading a
multi-GB JSONL file into memory is not an option, so each file is scanned once
(vectorised, in chunks) into a byte-offset index of its non-blank lines, and
a line is read on demand with ``os.pread``. ``pread`` takes an explicit offset
and touches no shared file position, so grain's reader threads can call
``__getitem__`` concurrently without a lock.

The index costs 16 bytes per line. File descriptors are opened lazily and are
not pickled, so a source can be sent to worker processes.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Sequence

import numpy as np

from lowrank_jax.data.errors import DataFileError
from lowrank_jax.data.random_access import IndexedFiles, checked_index

__all__ = ["JsonRecords", "JsonlSource", "TextSource"]

_CHUNK = 1 << 24  # 16 MiB per scan step bounds the scan's memory (~100 MiB).
_NOT_WHITESPACE = np.ones(256, dtype=bool)
_NOT_WHITESPACE[[ord(c) for c in " \t\r\n\f\v"]] = False


def resolve_paths(paths: str | os.PathLike | Sequence[str | os.PathLike],
                  ) -> list[str]:
  """Expands globs, checks that every file exists and is not compressed."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  resolved = []
  for entry in paths:
    entry = os.path.expanduser(os.fspath(entry))
    if glob.has_magic(entry):
      matches = sorted(glob.glob(entry))
      if not matches:
        raise FileNotFoundError(f"No file matches the pattern {entry!r}.")
    else:
      if not os.path.isfile(entry):
        raise FileNotFoundError(f"Data file not found: {entry!r}.")
      matches = [entry]
    for path in matches:
      if path.endswith((".gz", ".bz2", ".xz", ".zst", ".zip")):
        raise ValueError(
            f"Compressed file {path!r} is not supported: random access needs "
            "an uncompressed file (decompress it first, e.g. `gunzip -k`).")
    resolved.extend(matches)
  if not resolved:
    raise ValueError("No data files given.")
  return resolved


def line_number(path: str, offset: int) -> int:
  """The 1-based number of the line that holds byte ``offset`` of ``path``.

  The index keeps byte offsets only (16 bytes per line); line numbers are
  counted when an error message needs one.
  """
  newlines, pos = 0, 0
  with open(path, "rb") as f:
    while pos < offset:
      block = f.read(min(_CHUNK, offset - pos))
      if not block:
        break
      newlines += block.count(b"\n")
      pos += len(block)
  return newlines + 1


def scan_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Byte ranges ``[start, end)`` of the non-blank lines of ``path``.

  ``end`` excludes the newline (and a trailing ``\\r``). A line is blank when
  it holds only whitespace; the test is done on bytes, which is exact for
  UTF-8 because ASCII whitespace bytes never occur inside multi-byte
  characters. A NUL byte, which no text file holds, raises ``DataFileError``
  naming its line: a binary file given as text fails here, not mid-training.
  """
  size = os.path.getsize(path)
  newlines = []  # absolute offsets of b"\n"
  nonblank_before = []  # non-whitespace bytes in [0, newline offset)
  seen = 0
  if size:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for lo in range(0, size, _CHUNK):
      chunk = np.asarray(data[lo:lo + _CHUNK])
      nul = np.flatnonzero(chunk == 0)
      if nul.size:
        raise DataFileError(path, line_number(path, lo + int(nul[0])),
                            "a NUL byte: a binary (or UTF-16) file, not UTF-8 "
                            "text (give text or JSON-lines files)")
      counts = np.cumsum(_NOT_WHITESPACE[chunk], dtype=np.int32)
      pos = np.flatnonzero(chunk == ord("\n"))
      newlines.append(pos + lo)
      # counts[p] includes chunk[p], which is a newline (whitespace).
      nonblank_before.append(counts[pos].astype(np.int64) + seen)
      seen += int(counts[-1])
    del data
  nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
  before = (np.concatenate(nonblank_before) if nonblank_before
            else np.zeros(0, np.int64))
  starts = np.concatenate([[0], nl + 1]).astype(np.int64)
  ends = np.concatenate([nl, [size]]).astype(np.int64)
  cum = np.concatenate([[0], before, [seen]])
  keep = np.diff(cum) > 0
  return starts[keep], ends[keep]


class _LineFiles(IndexedFiles):
  """The shared machinery: index over several files + lazy positioned reads."""

  def __init__(self, paths):
    self.paths = resolve_paths(paths)
    file_ids, starts, ends = [], [], []
    for k, path in enumerate(self.paths):
      s, e = scan_lines(path)
      file_ids.append(np.full(len(s), k, dtype=np.int32))
      starts.append(s)
      ends.append(e)
    self._file_ids = np.concatenate(file_ids)
    self._starts = np.concatenate(starts)
    self._ends = np.concatenate(ends)
    self._init_files()

  def file_starts(self) -> list[int]:
    """The index of each file's first document (files without one have none)."""
    return [int(i) for i in np.flatnonzero(np.diff(np.concatenate([[-1], self._file_ids])) != 0)]

  def _check_first_documents(self) -> None:
    """Read each file's first document, so a file of the wrong kind (or a
    wrong ``text_key``) fails when the source is built, not mid-training."""
    for index in self.file_starts():
      self[index]

  def __len__(self) -> int:
    return len(self._starts)

  def _line(self, index: int) -> tuple[bytes, str, int]:
    """(raw line bytes, file path, byte offset) for error messages."""
    index = checked_index(index, len(self), "documents")
    k = int(self._file_ids[index])
    start, end = int(self._starts[index]), int(self._ends[index])
    raw = self._pread(k, start, end - start)
    if raw.endswith(b"\r"):
      raw = raw[:-1]
    return raw, self.paths[k], start

  def __getstate__(self):
    state = self.__dict__.copy()
    del state["_fds"], state["_lock"]  # descriptors cannot travel; reopened lazily
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_files()


class TextSource(_LineFiles):
  """Plain text files, one document per non-blank line.

  Like the Hugging Face ``text`` dataset with line sampling, except that
  blank (whitespace-only) lines are skipped instead of becoming empty
  documents. ``paths``: one path/glob or a list of them; files are read in
  the given order, glob matches sorted. Bytes that are not UTF-8 raise
  ``DataFileError`` naming the file and line.
  """

  def __init__(self, paths):
    super().__init__(paths)
    self._check_first_documents()

  def __getitem__(self, index: int) -> str:
    raw, path, offset = self._line(index)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataFileError(path, line_number(path, offset),
                          f"not UTF-8 text ({e.reason} at byte {e.start} of "
                          "the line)") from None

  def __repr__(self) -> str:
    return f"TextSource({self.paths!r}, {len(self)} documents)"


class JsonRecords(_LineFiles):
  """JSON-lines files of objects: ``record(i)`` is ``(json.loads(line_i), fail)``.

  ``fail(message)`` is a ``DataFileError`` naming the record's file and line (the line number
  is counted only then), for the caller's own checks of the record's fields. A line that is not
  JSON, or not an object, raises one at once.
  """

  def record(self, index: int, wanted: str = "") -> tuple[dict, object]:
    """``wanted``: what the object should hold, for the message when the line is no object."""
    raw, path, offset = self._line(index)
    fail = lambda message: DataFileError(path, line_number(path, offset), message)  # noqa: E731
    try:
      record = json.loads(raw)
    except json.JSONDecodeError as e:
      raise fail(f"not valid JSON: {e.msg} (column {e.colno})") from None
    except ValueError as e:  # bytes that are not UTF-8
      raise fail(f"not valid JSON: {e}") from None
    if not isinstance(record, dict):
      raise fail(f"a JSON {type(record).__name__}, not an object{wanted}")
    return record, fail

  def __repr__(self) -> str:
    return f"JsonRecords({self.paths!r}, {len(self)} records)"


class JsonlSource(JsonRecords):
  """JSON-lines files; document ``i`` is ``json.loads(line_i)[text_key]``.

  Only the first record of each file is parsed up front (to fail fast on a
  wrong ``text_key``); the rest are parsed when read, and a malformed record
  raises ``DataFileError`` (a ``ValueError``) naming the file and line.
  """

  def __init__(self, paths, text_key: str = "text"):
    super().__init__(paths)
    self.text_key = text_key
    if len(self) == 0:
      raise ValueError(f"No non-blank lines in {self.paths!r}.")
    self._check_first_documents()

  def __getitem__(self, index: int) -> str:
    record, fail = self.record(index, f" with a {self.text_key!r} field")
    if self.text_key not in record:
      raise fail(f"the record has no key {self.text_key!r} (found: {', '.join(map(repr, sorted(record)))}); "
                 "set text_key to the field that holds the document text")
    text = record[self.text_key]
    if not isinstance(text, str):
      raise fail(f"{self.text_key!r} is {json.dumps(text)[:40]}, not a string")
    return text

  def __repr__(self) -> str:
    return (f"JsonlSource({self.paths!r}, text_key={self.text_key!r}, "
            f"{len(self)} documents)")
