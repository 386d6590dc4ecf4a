"""Random access to the rows of Parquet files, one decoded row group at a time.

Parquet keeps rows in row groups, compressed column by column, so one row cannot be decoded
without its group. The index is the row count of every (file, group), read from the files'
footers once (no data is read); ``source[i]`` finds its group by binary search, decodes the
group's needed columns, or takes them from a small per-process cache of decoded groups, and
returns the row. A shuffled read of files far larger than the cache decodes about one group per
document: for training data, write Parquet with small row groups (``row_group_size`` of a few
thousand rows) or give the cache more room.

A file is opened for each group read, with its footer already parsed, and closed again: no open
file travels with a pickled source (grain worker processes), and reader threads share nothing but
the cache, which a lock guards. Needs ``pyarrow`` (the ``hf`` extra brings it).
"""

from __future__ import annotations

import collections
import threading

import numpy as np

from lowrank_jax.data.errors import DataError, DataFileError
from lowrank_jax.data.random_access import checked_index
from lowrank_jax.data.text_files import resolve_paths

__all__ = ["ParquetRecords", "ParquetSource", "is_parquet"]

CACHE_BYTES = 256 << 20  # decoded row groups kept per process (at least one, whatever its size)


def is_parquet(path: str) -> bool:
  return str(path).lower().endswith(".parquet")


def _parquet():
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError("Reading .parquet files needs pyarrow: pip install 'lowrank-jax[hf]' (or pyarrow)") from None
  return pq


class _RowGroups:
  """The shared machinery: a row index over the groups of several files, and a cache of decoded groups.

  ``columns``: the columns decoded (None: all). ``source.paths``: the files, globs expanded.
  """

  def __init__(self, paths, columns: list[str] | None = None, cache_bytes: int = CACHE_BYTES):
    pq = _parquet()
    self.paths = resolve_paths(paths)
    self.columns, self.cache_bytes = columns, int(cache_bytes)
    self._schemas, counts, group_file, group_index = [], [], [], []
    for k, path in enumerate(self.paths):
      try:
        meta = pq.read_metadata(path)
      except Exception as e:  # pyarrow's ArrowInvalid et al.: not a Parquet file
        raise DataFileError(path, None, f"not a readable Parquet file ({e})") from None
      self._schemas.append(meta.schema.to_arrow_schema())
      for g in range(meta.num_row_groups):
        counts.append(meta.row_group(g).num_rows)
        group_file.append(k)
        group_index.append(g)
    self._group_file = np.asarray(group_file, np.int32)
    self._group_index = np.asarray(group_index, np.int32)
    self._group_start = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    self._init_cache()

  def _init_cache(self) -> None:
    self._cache: collections.OrderedDict = collections.OrderedDict()  # group -> pyarrow Table
    self._cached_bytes = 0
    self._lock = threading.Lock()
    self._footers: dict[int, object] = {}  # file -> parsed footer (pyarrow FileMetaData)

  def __len__(self) -> int:
    return int(self._group_start[-1])

  def file_starts(self) -> list[int]:
    """The index of each non-empty file's first row."""
    firsts = np.flatnonzero(np.diff(np.concatenate([[-1], self._group_file])) != 0)
    return [int(self._group_start[g]) for g in firsts if self._group_start[g] < len(self)]

  def _decode(self, g: int):
    k = int(self._group_file[g])
    footer = self._footers.get(k)
    pq = _parquet()
    if footer is None:
      footer = self._footers[k] = pq.read_metadata(self.paths[k])
    with pq.ParquetFile(self.paths[k], metadata=footer) as f:
      return f.read_row_group(int(self._group_index[g]), columns=self.columns)

  def _group(self, g: int):
    with self._lock:
      table = self._cache.get(g)
      if table is not None:
        self._cache.move_to_end(g)
        return table
    table = self._decode(g)  # outside the lock: threads decode different groups at once
    with self._lock:
      if g not in self._cache:
        self._cache[g] = table
        self._cached_bytes += table.nbytes
        while len(self._cache) > 1 and self._cached_bytes > self.cache_bytes:
          self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
    return table

  def _row(self, index: int):
    """(decoded group, row in it, file path, row in the file) of row ``index``."""
    index = checked_index(index, len(self), "rows")
    g = int(np.searchsorted(self._group_start, index, side="right")) - 1
    k = int(self._group_file[g])
    first_of_file = int(self._group_start[np.searchsorted(self._group_file, k)])
    return self._group(g), index - int(self._group_start[g]), self.paths[k], index - first_of_file

  def __getstate__(self):
    state = self.__dict__.copy()
    for name in ("_cache", "_cached_bytes", "_lock", "_footers"):
      del state[name]  # decoded data and locks stay in their process
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()


class ParquetSource(_RowGroups):
  """Parquet files; document ``i`` is row ``i``'s ``text_key`` column (a string).

  Every file's schema is checked when the source is built: a missing column is a ``DataError``
  (``argument='text_key'``) naming the columns found, a column of another type a
  ``DataFileError`` naming the file. A null text raises ``DataFileError`` naming the file and
  the row (counted from 0) when it is read.
  """

  def __init__(self, paths, text_key: str = "text", cache_bytes: int = CACHE_BYTES):
    super().__init__(paths, [text_key], cache_bytes)
    self.text_key = text_key
    import pyarrow as pa

    for path, schema in zip(self.paths, self._schemas):
      if text_key not in schema.names:
        raise DataError(f"{path}: no column {text_key!r} (found: {', '.join(map(repr, schema.names))}); set "
                        "text_key to the column that holds the document text", argument="text_key")
      kind = schema.field(text_key).type
      if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataFileError(path, None, f"row 0: column {self.text_key!r} holds {kind} values, not strings")

  def __getitem__(self, index: int) -> str:
    table, row, path, row_in_file = self._row(index)
    text = table.column(0)[row].as_py()
    if text is None:
      raise DataFileError(path, None, f"row {row_in_file}: {self.text_key!r} is null, not a string")
    return text

  def __repr__(self) -> str:
    return f"ParquetSource({self.paths!r}, text_key={self.text_key!r}, {len(self)} documents)"


class ParquetRecords(_RowGroups):
  """Parquet rows as records: ``record(i)`` is ``(row i as a dict of all columns, fail)``, where
  ``fail(message)`` is a ``DataFileError`` naming the file and row (as ``JsonRecords.record``)."""

  def __init__(self, paths, cache_bytes: int = CACHE_BYTES):
    super().__init__(paths, None, cache_bytes)

  def record(self, index: int):
    table, row, path, row_in_file = self._row(index)
    fail = lambda message: DataFileError(path, None, f"row {row_in_file}: {message}")  # noqa: E731
    return {name: table.column(name)[row].as_py() for name in table.column_names}, fail

  def __repr__(self) -> str:
    return f"ParquetRecords({self.paths!r}, {len(self)} rows)"
