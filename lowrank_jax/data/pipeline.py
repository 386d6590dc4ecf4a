"""Source -> tokens -> packed rows -> batches: the loaders the trainer uses.

Train stream (``make_train_iterator``)::

    MapDataset.source(source)[process_index::process_count]  # disjoint shares
      .shuffle(seed)            # global, index-based; reseeded every epoch
      .repeat()                 # forever
      .map(tokenize)            # str -> tokenizer.encode; arrays pass through
      .to_iter_dataset(...)     # optional ordered reader threads
    -> PackedIterDataset        # EOS-joined stream cut into seq_len rows
      .batch(batch_size)        # {'tokens': int32 [batch_size, seq_len]}

Every stage before packing is index-based, so its state is one integer
(``next_index``) and the reader threads of ``to_iter_dataset`` never make
the stream depend on timing (there are none by default, see
``num_threads``). Packing adds one integer (see ``packing``), and
batching adds nothing: the whole iterator state is a small JSON dict,
``{"parent": {"next_index": n}, "consumed": k}``, and
``set_state(get_state())`` continues the exact same stream. Nothing is
prefetched after packing: packing and stacking are cheap, and the expensive
part, reading and tokenizing documents, is what the optional reader threads
(``num_threads``) overlap.
"""

from __future__ import annotations

import logging

import grain
import numpy as np

from lowrank_jax.data.errors import DataError
from lowrank_jax.data.packing import PackedIterDataset

__all__ = ["make_train_iterator", "make_eval_batches"]

_log = logging.getLogger(__name__)


class _Tokenize:
  """Document -> 1-D int32 ids, range-checked against the vocabulary.

  The check matters because an out-of-range id is not an error in JAX: an
  embedding gather silently clamps it.
  """

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self._vocab_size = int(tokenizer.vocab_size)

  def __call__(self, document) -> np.ndarray:
    if isinstance(document, str):
      ids = self._tokenizer.encode(document)
    elif isinstance(document, bytes):
      ids = self._tokenizer.encode(document.decode("utf-8"))
    elif isinstance(document, np.ndarray):
      ids = document
    else:
      raise TypeError(f"A document must be str or an int array, got "
                      f"{type(document).__name__}.")
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
      raise TypeError(f"Token ids must be a 1-D integer array, got "
                      f"{ids.dtype} with shape {ids.shape}.")
    if ids.size and (ids.min() < 0 or ids.max() >= self._vocab_size):
      raise ValueError(
          f"Token id out of range [0, {self._vocab_size}) (min {ids.min()}, "
          f"max {ids.max()}): the tokenizer does not match the data.")
    return ids.astype(np.int32, copy=False)


def _stack_rows(rows) -> dict[str, np.ndarray]:
  return {"tokens": np.stack(rows).astype(np.int32, copy=False)}


def _first_batches(rows, batch_size: int, num_batches: int, stack):
  """Up to ``num_batches`` batches of ``batch_size`` rows, stacked with ``stack``, from the
  start of the iterator ``rows``; and the rows read after the last full batch (fewer than
  ``batch_size``; none when ``num_batches`` batches were formed)."""
  batches, current = [], []
  for row in rows:
    current.append(row)
    if len(current) == batch_size:
      batches.append(stack(current))
      current = []
      if len(batches) == num_batches:
        break
  return batches, current


def _check_args(seq_len, batch_size, process_index, process_count):
  for name, value in (("seq_len", seq_len), ("batch_size", batch_size),
                      ("process_count", process_count)):
    if int(value) != value or value <= 0:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count="
                     f"{process_count}), got {process_index}")


def _process_share(source, process_index, process_count):
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise DataError(
        f"Process {process_index} of {process_count} gets no documents: the "
        f"source has only {len(source)}.")
  return ds


def make_train_iterator(source, tokenizer, *, seq_len: int, batch_size: int,
                        seed: int = 0, shuffle: bool = True,
                        process_index: int = 0, process_count: int = 1,
                        num_threads: int = 0,
                        prefetch_documents: int = 128,
                        ) -> grain.DatasetIterator:
  """Endless, exactly resumable stream of ``{'tokens': int32 [B, L]}``.

  Args:
    source: random-access documents (``len`` and ``[i]``): ``str`` documents
      are tokenized, ``np.ndarray`` documents are token ids.
    tokenizer: provides ``encode``, ``eos_id`` and ``vocab_size``.
    seq_len: tokens per row (the model's context length).
    batch_size: rows per batch on this process.
    seed: shuffle seed (0 .. 2**32-1); epoch ``e`` uses a seed derived from
      ``(seed, e)``, so every epoch has a new order.
    shuffle: when False, documents are read in source order, epoch after
      epoch.
    process_index, process_count: this process reads documents
      ``process_index, process_index + process_count, ...`` (before
      shuffling), a disjoint share.
    num_threads, prefetch_documents: grain reader threads (reading +
      tokenizing documents ahead) and how many documents they may read
      ahead. They never change the stream or its state. The default (0)
      reads in the calling thread: tokenizing is Python/GIL-bound work and
      extra threads measured slower on a loaded 2-core machine; JAX's
      asynchronous dispatch already overlaps host-side loading with the
      device step. Raise it for slow (network) storage.

  Returns:
    A grain ``DatasetIterator``; ``get_state()`` / ``set_state()`` checkpoint
    it exactly (state: a small JSON-serialisable dict).
  """
  _check_args(seq_len, batch_size, process_index, process_count)
  ds = _process_share(source, process_index, process_count)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  ds = ds.repeat(None).map(_Tokenize(tokenizer))
  if num_threads < 0 or prefetch_documents < 0:
    raise ValueError("num_threads and prefetch_documents must be >= 0")
  docs = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads,
      prefetch_buffer_size=prefetch_documents if num_threads else 0))
  rows = PackedIterDataset(docs, seq_len, tokenizer.eos_id)
  batches = rows.batch(batch_size, drop_remainder=True, batch_fn=_stack_rows)
  return iter(batches)


def make_eval_batches(source, tokenizer, *, seq_len: int, batch_size: int,
                      num_batches: int, process_index: int = 0,
                      process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first ``num_batches`` full batches of one ordered pass over the data.

  Same packing as training, but no shuffle and no repeat, so the list is
  identical on every call: evaluations at different steps and of different
  runs see the same tokens. If the source holds fewer than ``num_batches``
  batches, the full batches it can form are returned (logged as a warning);
  the trailing tokens that do not fill a batch are dropped. With several
  processes, each builds its batches from its own share, so the counts can
  differ between processes if the data is short: a multi-host caller should
  agree on the minimum.

  Raises:
    DataError: not even one batch (``batch_size * seq_len`` tokens,
      counting one EOS per document) can be formed.
  """
  _check_args(seq_len, batch_size, process_index, process_count)
  if int(num_batches) != num_batches or num_batches <= 0:
    raise ValueError(f"num_batches must be a positive integer, got "
                     f"{num_batches!r}")
  tokenize = _Tokenize(tokenizer)
  share = _process_share(source, process_index, process_count)
  docs = share.map(tokenize).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  rows = iter(PackedIterDataset(docs, seq_len, tokenizer.eos_id))
  batches, _ = _first_batches(rows, batch_size, num_batches, _stack_rows)
  if len(batches) == num_batches:
    return batches
  if not batches:
    available = sum(len(tokenize(share[i])) + 1 for i in range(len(share)))
    raise DataError(
        f"Too little evaluation data: {available} tokens (with one EOS per "
        f"document) in {len(share)} documents for process {process_index} of "
        f"{process_count}, but one batch needs batch_size * seq_len = "
        f"{batch_size} * {seq_len} = {batch_size * seq_len}.")
  _log.warning("Evaluation data holds only %d full batches of %d x %d tokens "
               "(%d requested); using those.", len(batches), batch_size,
               seq_len, num_batches)
  return batches
