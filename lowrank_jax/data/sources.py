"""Document sources: random-access collections the pipeline reads from.

A source is anything with ``__len__`` and ``__getitem__(i)`` returning one
document: a ``str`` (tokenized by the pipeline) or a 1-D ``np.ndarray`` of
token ids (used as is). Random access, rather than iteration, is what makes
global shuffling, disjoint per-process shares and exact checkpointing by a
single index possible (grain ``MapDataset.source``). Sources must be
pickleable (they hold paths and indexes, never open file objects).

* ``JsonlSource`` / ``TextSource``: lazily read JSONL / plain-text lines.
* ``ParquetSource``: one column of Parquet files, a row group decoded at a time.
* ``file_source``: the files of a list (JSONL or text, and Parquet) as one source.
* ``DatasetSource`` (``hf_source``): a split of a Hugging Face ``datasets.Dataset``.
* ``TfdsSource``: a split of a TFDS-prepared directory (no TensorFlow).
* ``SyntheticLanguage``: generated token ids with a known entropy rate.
* ``SourceView`` / ``split_holdout``: a contiguous range of another source,
  e.g. to hold out validation documents when there is no validation file.
* ``Concatenation``: several sources one after another.
"""

from __future__ import annotations

import itertools

import numpy as np

from lowrank_jax.data.errors import DataError
from lowrank_jax.data.parquet import ParquetRecords, ParquetSource, is_parquet
from lowrank_jax.data.random_access import checked_index
from lowrank_jax.data.synthetic import SyntheticLanguage, SyntheticTokenizer
from lowrank_jax.data.text_files import JsonlSource, JsonRecords, TextSource, resolve_paths
from lowrank_jax.data.tfds_source import TfdsSource

__all__ = [
    "Concatenation", "DataError", "JsonlSource", "ParquetSource", "SourceView", "SyntheticLanguage",
    "SyntheticTokenizer", "TextSource", "TfdsSource", "file_source", "records", "split_holdout",
]


class SourceView:
  """Documents ``start .. stop-1`` of ``source``, re-indexed from 0."""

  def __init__(self, source, start: int, stop: int):
    if not 0 <= start <= stop <= len(source):
      raise ValueError(f"Invalid range [{start}, {stop}) for a source of "
                       f"{len(source)} documents.")
    self.source, self.start, self.stop = source, int(start), int(stop)

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int):
    return self.source[self.start + checked_index(index, len(self))]

  def __repr__(self) -> str:
    return f"SourceView({self.source!r}, {self.start}, {self.stop})"


def split_holdout(source, fraction: float) -> tuple[SourceView, SourceView]:
  """``(train, heldout)``: the last ``fraction`` of the documents held out.

  A contiguous tail (not a random subset) so the split needs no seed and is
  the same for every run over the same source. At least one document goes to
  each side.
  """
  n = len(source)
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"fraction must be in (0, 1), got {fraction}")
  if n < 2:
    raise DataError(f"Cannot hold out documents from a source of {n}.")
  held = min(n - 1, max(1, round(n * fraction)))
  return SourceView(source, 0, n - held), SourceView(source, n - held, n)


class Concatenation:
  """The documents of ``parts[0]``, then those of ``parts[1]``, ...: one source."""

  def __init__(self, parts):
    self.parts = list(parts)
    self.starts = np.concatenate([[0], np.cumsum([len(p) for p in self.parts], dtype=np.int64)])

  @property
  def paths(self) -> list[str]:
    return [path for part in self.parts for path in getattr(part, "paths", ())]

  def __len__(self) -> int:
    return int(self.starts[-1])

  def locate(self, index: int):
    """(the part holding document ``index``, its index there)."""
    index = checked_index(index, len(self))
    k = int(np.searchsorted(self.starts, index, side="right")) - 1
    return self.parts[k], index - int(self.starts[k])

  def __getitem__(self, index: int):
    part, local = self.locate(index)
    return part[local]

  def __repr__(self) -> str:
    return f"Concatenation({self.parts!r})"


def _runs(paths) -> list[tuple[bool, list[str]]]:
  """The files of ``paths`` (globs expanded, in order) as runs of (is Parquet, files)."""
  return [(parquet, list(run)) for parquet, run in itertools.groupby(resolve_paths(paths), key=is_parquet)]


def file_source(paths, *, kind: str = "jsonl", text_key: str = "text"):
  """The documents of data files, in the order given (globs sorted).

  ``kind`` says how the files that are not Parquet are read: ``'jsonl'`` (the ``text_key`` field
  of each line's object) or ``'text'`` (each non-blank line). Parquet files (``*.parquet``) are
  read by their ``text_key`` column whatever the kind, so a list may mix them with the others.
  """
  if kind not in ("jsonl", "text"):
    raise ValueError(f"kind must be 'jsonl' or 'text', got {kind!r}")
  parts = [ParquetSource(run, text_key) if parquet else JsonlSource(run, text_key) if kind == "jsonl"
           else TextSource(run) for parquet, run in _runs(paths)]
  return parts[0] if len(parts) == 1 else Concatenation(parts)


def records(paths) -> Concatenation:
  """The records of JSON-lines files (each line an object) and Parquet files (each row), in the
  order given: parts with ``record(i) -> (dict, fail)`` and ``file_starts()``."""
  return Concatenation([ParquetRecords(run) if parquet else JsonRecords(run) for parquet, run in _runs(paths)])
