"""Document sources: random-access collections the pipeline reads from.

A source is anything with ``__len__`` and ``__getitem__(i)`` returning one
document: a ``str`` (tokenized by the pipeline) or a 1-D ``np.ndarray`` of
token ids (used as is). Random access, rather than iteration, is what makes
global shuffling, disjoint per-process shares and exact checkpointing by a
single index possible (grain ``MapDataset.source``). Sources must be
pickleable (they hold paths and indexes, never open file objects).

* ``JsonlSource`` / ``TextSource``: lazily read JSONL / plain-text lines.
* ``TfdsSource``: a split of a TFDS-prepared directory (no TensorFlow).
* ``SyntheticLanguage``: generated token ids with a known entropy rate.
* ``SourceView`` / ``split_holdout``: a contiguous range of another source,
  e.g. to hold out validation documents when there is no validation file.
"""

from __future__ import annotations

from lowrank_jax.data.errors import DataError
from lowrank_jax.data.random_access import checked_index
from lowrank_jax.data.synthetic import SyntheticLanguage, SyntheticTokenizer
from lowrank_jax.data.text_files import JsonlSource, TextSource
from lowrank_jax.data.tfds_source import TfdsSource

__all__ = [
    "DataError", "JsonlSource", "SourceView", "SyntheticLanguage",
    "SyntheticTokenizer", "TextSource", "TfdsSource", "split_holdout",
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
