"""Concatenate-and-chunk packing as a checkpointable grain ``IterDataset``.

Documents (1-D int token arrays) are joined into one stream with ``eos_id``
after each document, and the stream is cut into consecutive rows of
``seq_len`` tokens. There is no padding and no segment ids: as in GaLore's
and nanodo's C4 pipelines, a row may span document boundaries and attention
runs across them; EOS tells the model where a document ended. Every token of
every document is trained on (except the tail that does not fill a last row
of a finite stream).

Checkpoint state
----------------
A row can end in the middle of a document, so the state must say how much of
the current document was already emitted. Storing the leftover tokens would
make the state as large as a document; instead the state is::

    {"parent": <parent state just before the current document>,
     "consumed": <tokens of that document (+ its EOS) already emitted>}

and ``set_state`` restores the parent, reads that document again and skips
the consumed prefix. With a deterministic parent (grain's index-based
``MapDataset`` iterators are) the continued stream is identical to the
uninterrupted one. When no document is partly consumed, ``parent`` is the
parent's current state and ``consumed`` is 0. The state is as small and
JSON-serialisable as the parent's (for ``to_iter_dataset`` parents it is
``{"next_index": int}``).
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np

__all__ = ["PackedIterDataset"]


class _PackedIterator(grain.DatasetIterator):
  """Emits ``[seq_len]`` int32 rows; see the module docstring for the state."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, eos_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._eos = np.asarray([eos_id], dtype=np.int32)
    self._doc = None  # current document + EOS, or None when fully consumed
    self._pos = 0  # tokens of self._doc already emitted
    self._doc_state = None  # parent state just before self._doc was read

  def _read_document(self) -> None:
    self._doc_state = copy.deepcopy(self._parent.get_state())
    tokens = np.asarray(next(self._parent))
    if tokens.ndim != 1:
      raise ValueError(f"A document must be a 1-D token array, got shape "
                       f"{tokens.shape}.")
    self._doc = np.concatenate([tokens.astype(np.int32, copy=False),
                                self._eos])
    self._pos = 0

  def __next__(self) -> np.ndarray:
    pieces, need = [], self._seq_len
    while need:
      if self._doc is None:
        self._read_document()  # StopIteration drops an unfinished row.
      take = min(need, len(self._doc) - self._pos)
      pieces.append(self._doc[self._pos:self._pos + take])
      self._pos += take
      need -= take
      if self._pos == len(self._doc):
        self._doc = None
    return pieces[0].copy() if len(pieces) == 1 else np.concatenate(pieces)

  def get_state(self) -> dict[str, Any]:
    if self._doc is None:
      return {"parent": self._parent.get_state(), "consumed": 0}
    return {"parent": copy.deepcopy(self._doc_state), "consumed": self._pos}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc = None
    consumed = int(state["consumed"])
    if consumed:
      self._read_document()
      if consumed >= len(self._doc):
        raise ValueError(
            f"Packing state says {consumed} tokens of the current document "
            f"were emitted, but it has only {len(self._doc)} (with EOS): the "
            "data or tokenizer changed since the checkpoint.")
      self._pos = consumed

  def __str__(self) -> str:
    return f"PackedIterator(seq_len={self._seq_len})"


class PackedIterDataset(grain.IterDataset):
  """Rows of ``seq_len`` tokens cut from the EOS-joined document stream.

  Args:
    parent: an ``IterDataset`` of 1-D integer token arrays (one per document,
      without EOS). Its iterator must be deterministic under
      ``set_state`` for exact resumption.
    seq_len: tokens per row.
    eos_id: id appended after every document.
  """

  def __init__(self, parent: grain.IterDataset, seq_len: int, eos_id: int):
    if int(seq_len) <= 0:
      raise ValueError(f"seq_len must be positive, got {seq_len}")
    super().__init__(parent)
    self._seq_len = int(seq_len)
    self._eos_id = int(eos_id)

  def __iter__(self) -> _PackedIterator:
    return _PackedIterator(self._parent.__iter__(), self._seq_len,
                           self._eos_id)

  def __str__(self) -> str:
    return f"PackedIterDataset(seq_len={self._seq_len}, eos_id={self._eos_id})"
