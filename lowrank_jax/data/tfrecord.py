"""Random access to the records of TFRecord files, without TensorFlow.

A TFRecord file is a plain sequence of frames::

    uint64 length (little endian) | uint32 masked CRC of length
    | length bytes of data | uint32 masked CRC of data

so an index of record offsets is one pass over the 12-byte headers (the data
is skipped with a seek), and a record is then one ``os.pread``. CRCs are not
verified: a truncated or misframed file is still caught, because the index
must end exactly at the end of the file and have the expected record count.
"""

from __future__ import annotations

import os
import struct

import numpy as np

from lowrank_jax.data.random_access import IndexedFiles, checked_index

__all__ = ["TFRecordShards"]

_HEADER = 12  # uint64 length + uint32 crc
_FOOTER = 4  # uint32 crc


def index_records(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Offsets of the data of each record in ``path``, and their lengths."""
  size = os.path.getsize(path)
  offsets, lengths = [], []
  with open(path, "rb", buffering=0) as f:
    pos = 0
    while pos < size:
      f.seek(pos)
      header = f.read(_HEADER)
      if len(header) < _HEADER:
        raise ValueError(
            f"{path!r}: truncated TFRecord header at offset {pos}.")
      (length,) = struct.unpack("<Q", header[:8])
      offsets.append(pos + _HEADER)
      lengths.append(length)
      pos += _HEADER + length + _FOOTER
    if pos != size:
      raise ValueError(f"{path!r}: the last TFRecord frame runs past the end "
                       "of the file (truncated or not a TFRecord file).")
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


class TFRecordShards(IndexedFiles):
  """Global record index over shard files with known record counts.

  ``shard_lengths`` (from the dataset metadata) map a global index to
  ``(shard, local index)`` without touching the files; a shard's offsets are
  scanned the first time one of its records is read, so opening a dataset of
  thousands of shards is instant.
  """

  def __init__(self, paths: list[str], shard_lengths: list[int]):
    if len(paths) != len(shard_lengths):
      raise ValueError(f"{len(paths)} shard files but {len(shard_lengths)} "
                       "shard lengths.")
    self.paths = [os.fspath(p) for p in paths]
    self.shard_lengths = [int(n) for n in shard_lengths]
    self._cum = np.cumsum([0] + self.shard_lengths)
    self._index: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    self._init_files()

  def __len__(self) -> int:
    return int(self._cum[-1])

  def _shard(self, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and lengths of shard ``k``'s records, scanned once."""
    entry = self._index.get(k)
    if entry is None:
      with self._lock:
        entry = self._index.get(k)
        if entry is None:
          offsets, lengths = index_records(self.paths[k])
          if len(offsets) != self.shard_lengths[k]:
            raise ValueError(
                f"{self.paths[k]!r} holds {len(offsets)} records but the "
                f"dataset metadata says {self.shard_lengths[k]}.")
          entry = self._index[k] = (offsets, lengths)
    return entry

  def __getitem__(self, index: int) -> bytes:
    index = checked_index(index, len(self), "records")
    k = int(np.searchsorted(self._cum, index, side="right")) - 1
    offsets, lengths = self._shard(k)
    local = index - int(self._cum[k])
    return self._pread(k, int(offsets[local]), int(lengths[local]))

  def __getstate__(self):
    # Offsets are cheap to rebuild; file descriptors cannot travel.
    return {"paths": self.paths, "shard_lengths": self.shard_lengths}

  def __setstate__(self, state):
    self.__init__(state["paths"], state["shard_lengths"])
