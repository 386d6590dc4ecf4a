"""Hugging Face ``datasets`` as training data: a Hub dataset streamed, or local files read at random.

``open_builder`` finds the data: a Hub id (``'allenai/c4'`` with a config name such as ``'en'``),
a local folder laid out as a dataset repository (``data/train-*.parquet``, a README's configs), or
local Parquet / JSON / Arrow / CSV / text files. With downloads off (``HF_HUB_OFFLINE=1`` or
``HF_DATASETS_OFFLINE=1``) a Hub id is read from its snapshot in the local huggingface_hub cache.
Then one of two readers:

* :class:`DatasetSource` (random access: local files, or a Hub id with streaming off). The split
  is prepared once as Arrow files in ``datasets``' cache, and ``source[i]`` is row ``i``'s text,
  so it goes through the same grain pipeline as a JSON-lines file: a global shuffle, disjoint
  per-process shares, a resume by one index.
* :class:`TextStream` (streaming: a Hub id by default). There is no ``len`` and no ``[i]``, only
  the dataset's shards (its files) read in order. Each process takes the shards ``k`` with
  ``k % process_count == process_index`` (the "shards" strategy of
  ``datasets.distributed.split_dataset_by_node``, done here so that a process can reorder its
  shards; with fewer shards than processes, ``split_dataset_by_node`` gives each process every
  ``process_count``-th example instead). Where a process is in its share is exactly
  checkpointable: the epoch, the shard, and the position inside the shard as ``datasets`` itself
  records it (``IterableDataset.state_dict``, exact when no shuffle buffer is involved).

  Shuffling, with ``shuffle``: every epoch reads the process's shards in a new order (a
  permutation seeded by ``(seed, epoch)``), and documents are permuted in consecutive blocks of
  ``shuffle_buffer`` (the permutation seeded by ``(seed, epoch, block)``). ``datasets``' own
  ``IterableDataset.shuffle`` buffer is not used: a resume loses its contents (its documentation
  says so), so a resumed run would read other documents than the uninterrupted one. A block is
  exactly restorable from small state: the position where it began and how many of its
  documents were emitted; a resume reads the block again from that position. The mixing is
  local (a document moves at most ``shuffle_buffer - 1`` places), as with any buffer shuffle,
  and nothing moves across block boundaries; shard order does the long-range part.

Everything from ``datasets`` is imported when used, so ``lowrank_jax.data`` imports without it.
"""

from __future__ import annotations

import atexit
import copy
import glob
import logging
import os
import re
import weakref
from typing import Any

import grain
import numpy as np

from lowrank_jax.data.errors import DataError, DataFileError
from lowrank_jax.data.packing import PackedIterDataset
from lowrank_jax.data.pipeline import _check_args, _first_batches, _stack_rows, _Tokenize
from lowrank_jax.data.random_access import checked_index

__all__ = ["DatasetSource", "TextStream", "is_hub_id", "load_source", "locate", "make_stream_eval_batches",
           "make_stream_iterator", "offline", "open_stream"]

_log = logging.getLogger(__name__)

# 'allenai/c4', 'c4': what the Hub accepts as a dataset id.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# A local file's reader ("packaged module") by extension; a compression suffix is looked through.
_MODULES = {".parquet": "parquet", ".json": "json", ".jsonl": "json", ".arrow": "arrow", ".csv": "csv",
            ".txt": "text"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4")
_TRUE = {"1", "ON", "YES", "TRUE"}


def _datasets():
  try:
    import datasets
  except ImportError:
    raise ImportError("data.source=hf needs the datasets library: pip install 'lowrank-jax[hf]'") from None
  return datasets


def _module(path: str) -> str | None:
  """The reader of a data file by its extension (None: not a data file we know)."""
  name = path.lower()
  for suffix in _COMPRESSED:
    name = name.removesuffix(suffix)
  return _MODULES.get(os.path.splitext(name)[1])


def is_hub_id(spec: str) -> bool:
  """Whether ``spec`` names a Hub dataset rather than a local path: no such path exists here and
  it is spelled as an id (``owner/name``), not as a data file."""
  spec = spec.strip()
  return (not os.path.exists(os.path.expanduser(spec)) and bool(_HUB_ID.fullmatch(spec))
          and _module(spec) is None)


def locate(spec: str) -> tuple[str, Any]:
  """``('hub', id)``, ``('folder', path)`` or ``('files', [paths])`` for a ``path`` setting: a Hub id,
  a folder, or files / globs (comma separated). ``FileNotFoundError`` when it is none of these."""
  items = [item.strip() for item in spec.split(",") if item.strip()]
  if len(items) == 1 and is_hub_id(items[0]):
    return "hub", items[0]
  paths = [os.path.expanduser(item) for item in items]
  if len(paths) == 1 and os.path.isdir(paths[0]):
    return "folder", paths[0]
  files = []
  for path in paths:
    matches = sorted(glob.glob(path)) if glob.has_magic(path) else [path] if os.path.isfile(path) else []
    if not matches:
      raise FileNotFoundError(f"{path!r}: no such file or folder, and not a Hub dataset id such as 'allenai/c4'")
    files.extend(matches)
  if not files:
    raise FileNotFoundError("no data path given")
  return "files", files


def offline() -> bool:
  """Whether downloads are off: ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` as now set, or as the
  Hugging Face libraries read them when imported."""
  if any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
    return True
  from huggingface_hub import constants
  return bool(constants.HF_HUB_OFFLINE)


def _hf_home() -> str:
  return os.path.expanduser(os.environ.get("HF_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"))


def _hub_cache() -> str:
  """The huggingface_hub cache as the environment says now (the libraries read it once, at import)."""
  return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
                            or os.path.join(_hf_home(), "hub"))


def _datasets_cache() -> str:
  return os.path.expanduser(os.environ.get("HF_DATASETS_CACHE") or os.path.join(_hf_home(), "datasets"))


def cached_snapshot(repo_id: str, revision: str = "") -> str:
  """The folder of a Hub dataset's snapshot in the local cache, reading nothing from the network.

  The whole snapshot is asked for: which files a config and split need is only known from the
  repository's README, read after. A snapshot known to miss files (huggingface_hub keeps the
  repository's file list) is used with a warning; the splits then hold the files present.
  """
  from huggingface_hub import errors, snapshot_download

  incomplete = getattr(errors, "IncompleteSnapshotError", ())  # (recent huggingface_hub only)

  cache = _hub_cache()
  try:
    return snapshot_download(repo_id, repo_type="dataset", revision=revision or None, cache_dir=cache,
                             local_files_only=True)
  except incomplete as e:
    _log.warning("%s Using the files that are there.", e)
    return e.snapshot_path
  except errors.LocalEntryNotFoundError:
    which = [f"{name}={os.environ[name]}" for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
             if os.environ.get(name, "").upper() in _TRUE] or ["HF_HUB_OFFLINE (as set when imported)"]
    raise DataError(
        f"the Hub dataset {repo_id!r}{f' at revision {revision!r}' if revision else ''} is not in the local "
        f"cache {cache}, and downloads are off ({', '.join(which)}): download it once with network access "
        f"(hf download --repo-type dataset {repo_id}) or turn downloads on", argument="path") from None


def open_builder(path: str, *, name: str = "", revision: str = ""):
  """The ``datasets`` builder of ``path`` (see the module docstring); errors name the argument at fault."""
  datasets = _datasets()
  kind, where = locate(path)
  options = {"cache_dir": _datasets_cache()}
  if kind == "files":
    modules = {_module(f) for f in where}
    if None in modules or len(modules) > 1:
      raise DataError(f"{path}: give files of one format: .parquet, .json / .jsonl, .arrow, .csv or .txt "
                      f"(possibly compressed), got {', '.join(sorted({os.path.basename(f) for f in where})[:4])}",
                      argument="path")
    if name:
      raise DataError(f"{name!r}: local files have no dataset configs (name one for a Hub id or a dataset "
                      "folder, or leave it empty)", argument="name")
    where, options["data_files"] = modules.pop(), where
  elif kind == "hub" and offline():
    where = cached_snapshot(where, revision)
  elif kind == "hub" and revision:
    options["revision"] = revision
  try:
    return datasets.load_dataset_builder(where, name or None, **options)
  except ValueError as e:
    if "BuilderConfig" in str(e):  # "BuilderConfig 'fr' not found. Available: ['en']"
      raise DataError(f"{path}: {e}", argument="name") from None
    raise DataError(f"{path}: {e}", argument="path") from None
  except (FileNotFoundError, ConnectionError, OSError) as e:
    raise DataError(f"{path}: {e}", argument="path") from None


def split_names(builder) -> list[str]:
  """The splits a builder can give, as far as its data files or its info say (else empty)."""
  files = getattr(builder.config, "data_files", None)
  return list(files or builder.info.splits or ())


def check_split(builder, split: str, *, streaming: bool) -> None:
  """``split`` (``'train'``, ``'train[:95%]'``, ``'train+validation'``) names splits the builder has;
  else a ``DataError`` blaming the argument ``split``."""
  argument = "split"
  found = split_names(builder)
  for part in split.split("+"):
    base, _, slicing = part.strip().partition("[")
    if slicing and streaming:
      raise DataError(f"{split!r}: slices of a split need random access (streaming off)", argument=argument)
    if found and base not in found:
      raise DataError(f"the dataset has no split {base!r} (found: {', '.join(map(repr, found))}); slices such as "
                      "'train[:95%]' and 'train[95%:]' split one with streaming off", argument=argument)


def _check_column(column_names, features, text_field: str, description: str) -> None:
  if column_names is not None and text_field not in column_names:
    raise DataError(f"{description}: no column {text_field!r} (found: {', '.join(map(repr, column_names))})",
                    argument="text_field")
  feature = (features or {}).get(text_field)
  dtype = getattr(feature, "dtype", None)
  if feature is not None and dtype not in ("string", "large_string"):
    raise DataError(f"{description}: column {text_field!r} holds {dtype or feature}, not strings",
                    argument="text_field")


# --- random access -------------------------------------------------------------------------------

class DatasetSource:
  """A ``datasets.Dataset`` (Arrow files, memory-mapped) as a random-access source of its
  ``text_field``: ``source[i]`` is row ``i``'s text. A null raises ``DataFileError`` naming the row."""

  def __init__(self, dataset, text_field: str = "text", description: str = "dataset"):
    _check_column(dataset.column_names, dataset.features, text_field, description)
    # A row's text straight from the memory-mapped Arrow column: `dataset[i]` formats a one-row
    # table per call, 8x the cost (16 us against 2 us a document on this CPU).
    dataset = dataset.select_columns([text_field])
    if dataset._indices is not None:  # a shuffled or selected view: its rows are not the table's
      dataset = dataset.flatten_indices()
    self._dataset = dataset
    self.text_field, self.description = text_field, description
    self._column = None

  def __len__(self) -> int:
    return len(self._dataset)

  def __getstate__(self):
    return {**self.__dict__, "_column": None}  # rebuilt from the dataset, which pickles by file

  def __getitem__(self, index: int) -> str:
    index = checked_index(index, len(self))
    if self._column is None:
      self._column = self._dataset.data.column(self.text_field)
    text = self._column[index].as_py()
    if not isinstance(text, str):
      raise DataFileError(self.description, None, f"row {index}: {self.text_field!r} is {text!r}, not a string")
    return text

  def __repr__(self) -> str:
    return f"DatasetSource({self.description}, text_field={self.text_field!r}, {len(self)} documents)"


def load_source(path: str, *, name: str = "", split: str = "train", text_field: str = "text",
                revision: str = "") -> DatasetSource:
  """Split ``split`` of ``path`` prepared as Arrow files (downloaded first for a Hub id, unless
  offline) and read at random."""
  builder = open_builder(path, name=name, revision=revision)
  check_split(builder, split, streaming=False)
  try:
    builder.download_and_prepare()
    dataset = builder.as_dataset(split=split)
  except ValueError as e:  # e.g. a slice the split cannot give
    raise DataError(f"{path}: {e}", argument="split") from None
  return DatasetSource(dataset, text_field, f"{path}{f' ({name})' if name else ''} [{split}]")


# --- streaming -----------------------------------------------------------------------------------

def open_stream(path: str, *, name: str = "", split: str = "train", text_field: str = "text",
                revision: str = ""):
  """Split ``split`` of ``path`` as a ``datasets.IterableDataset`` (nothing is read yet)."""
  builder = open_builder(path, name=name, revision=revision)
  check_split(builder, split, streaming=True)
  try:
    stream = builder.as_streaming_dataset(split=split)
  except ValueError as e:
    raise DataError(f"{path}: {e}", argument="split") from None
  features = stream.features
  _check_column(list(features) if features else None, features, text_field, f"{path} [{split}]")
  # Known columns: only the text is decoded. (Unknown ones, e.g. of JSON files, are checked per record.)
  return stream.select_columns([text_field]) if features else stream


# Iterators whose shard generator is open. Closed at exit, while the modules they use are still
# there: a generator collected during interpreter shutdown prints an "Exception ignored" traceback.
_OPEN = weakref.WeakSet()
atexit.register(lambda: [it.close() for it in list(_OPEN)])


class _EpochEnd(Exception):
  """This process's shards of the current epoch are all read."""


class _StreamIterator(grain.DatasetIterator):
  """Documents of this process's share, epoch after epoch; see the module docstring for the order.

  State (JSON)::

      {"epoch": e, "block": b,             # the block being emitted (numbered within the epoch)
       "start": {"shard": j,               # where it began: the j-th shard of epoch e's order...
                 "hf": <datasets state>},  # ...at this position in it (None: its beginning)
       "next": i}                          # documents of the block already emitted

  ``next`` 0 means no block is in progress: ``start`` is where the next one begins.
  """

  def __init__(self, stream: "TextStream"):
    super().__init__()
    self._s = stream
    self._skipped = 0
    self._enter_epoch(0)
    self._block: list[str] | None = None
    self._next = 0

  # Reading documents in order.

  def _enter_epoch(self, epoch: int) -> None:
    s = self._s
    self._epoch, self._block_no = epoch, 0
    count = len(s.shards)
    self._order = (np.random.default_rng([s.seed, epoch]).permutation(count) if s.shuffle and count > 1
                   else np.arange(count))
    self._at(0, None)

  def _at(self, j: int, hf_state) -> None:
    """Position: the j-th shard of the epoch's order, at datasets state `hf_state` (None: its start)."""
    self.close()
    self._j, self._piece_start, self._piece, self._docs_in_piece = j, hf_state, None, None

  def close(self) -> None:
    """Closes the open shard's generator (and the files it reads)."""
    generator, self._iter = getattr(self, "_iter", None), None
    if generator is not None:
      generator.close()

  def _shard(self) -> int:
    """The dataset's number of the shard being read."""
    return self._s.shards[int(self._order[self._j])]

  def _position(self) -> dict:
    live = self._piece is not None and self._docs_in_piece is not None
    return {"shard": self._j, "hf": self._piece.state_dict() if live else copy.deepcopy(self._piece_start)}

  def _next_text(self) -> str:
    s = self._s
    while True:
      if self._j >= len(self._order):
        raise _EpochEnd
      if self._piece is None:
        self._piece = s.piece(self._shard())
        if self._piece_start is not None:
          self._piece.load_state_dict(self._piece_start)
        self._iter = iter(self._piece)
        _OPEN.add(self)
      try:
        example = next(self._iter)
      except StopIteration:
        self._at(self._j + 1, None)
        continue
      # From now on the piece's own state_dict() tracks the position (before the first next() it
      # would not show a loaded state yet).
      self._docs_in_piece = (self._docs_in_piece or 0) + 1
      text = example.get(s.text_field) if isinstance(example, dict) else None
      if isinstance(text, str):
        return text
      if not isinstance(example, dict) or s.text_field not in example:
        found = ", ".join(map(repr, example)) if isinstance(example, dict) else type(example).__name__
        raise DataError(f"{s.description}: the records have no field {s.text_field!r} (found: {found})",
                        argument="text_field")
      # The record's number in its shard is known when the shard was read from its start.
      where = f", record {self._docs_in_piece}" if self._piece_start is None else ""
      error = DataFileError(s.description, None, f"shard {self._shard()}{where}: {s.text_field!r} "
                            f"is {text!r}, not a string")
      if not s.skip_bad_records:
        raise error
      self._skipped += 1
      s.skipped += 1
      if self._skipped <= 10:
        _log.warning("skipped a bad record: %s", error)

  def _fill_block(self) -> None:
    s = self._s
    empty_epochs = 0
    while True:
      start = self._position()
      docs = []
      try:
        while len(docs) < s.block_size:
          docs.append(self._next_text())
      except _EpochEnd:
        pass
      if docs:
        break
      empty_epochs += 1
      if empty_epochs > 1:
        raise DataError(f"{s.description}: process {s.process_index} of {s.process_count} reads no documents "
                        f"from its {len(s.shards)} shard(s)")
      if s.epochs is not None and self._epoch + 1 >= s.epochs:
        raise StopIteration
      self._enter_epoch(self._epoch + 1)
    if s.shuffle and len(docs) > 1:
      order = np.random.default_rng([s.seed, self._epoch, self._block_no]).permutation(len(docs))
      docs = [docs[k] for k in order]
    self._block, self._block_start, self._current_block = docs, start, self._block_no
    self._block_no += 1
    self._next = 0

  def __next__(self) -> str:
    if self._block is None or self._next == len(self._block):
      self._fill_block()
    self._next += 1
    return self._block[self._next - 1]

  # Checkpointing.

  def get_state(self) -> dict[str, Any]:
    if self._block is None or self._next == len(self._block):
      return {"epoch": self._epoch, "block": self._block_no, "start": self._position(), "next": 0}
    return {"epoch": self._epoch, "block": self._current_block, "start": copy.deepcopy(self._block_start),
            "next": self._next}

  def set_state(self, state: dict[str, Any]) -> None:
    self._enter_epoch(int(state["epoch"]))
    self._block_no = int(state["block"])
    self._at(int(state["start"]["shard"]), state["start"]["hf"])
    self._block, self._next = None, 0
    emitted = int(state["next"])
    if emitted:
      self._fill_block()
      if emitted >= len(self._block):
        raise ValueError(f"The stream's state says {emitted} documents of a block were emitted, but reading it "
                         f"again gives {len(self._block)}: the dataset changed since the checkpoint.")
      self._next = emitted

  def __str__(self) -> str:
    return f"TextStream({self._s.description})"


class TextStream(grain.IterDataset):
  """The documents (``str``) of one process's share of a streamed dataset, exactly resumable.

  Args:
    dataset: a ``datasets.IterableDataset`` (e.g. from :func:`open_stream`).
    text_field: the field holding the text.
    seed, shuffle, shuffle_buffer: the order (module docstring); ``shuffle_buffer`` 0 or 1, or
      ``shuffle=False``: no block permutation (with ``shuffle=False`` the shards are also read
      in their own order).
    process_index, process_count: this process's share.
    epochs: passes over the share before ``StopIteration`` (None: endless).
    skip_bad_records: a record whose text is not a string is skipped (counted in ``skipped``)
      rather than raising ``DataFileError``.
    description: how errors name the dataset.
  """

  def __init__(self, dataset, *, text_field: str = "text", seed: int = 0, shuffle: bool = True,
               shuffle_buffer: int = 1000, process_index: int = 0, process_count: int = 1,
               epochs: int | None = None, skip_bad_records: bool = False, description: str = "dataset"):
    super().__init__()
    if shuffle_buffer < 0:
      raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    self.dataset, self.text_field, self.description = dataset, text_field, description
    self.seed, self.shuffle, self.epochs = int(seed), bool(shuffle), epochs
    self.block_size = max(1, int(shuffle_buffer)) if shuffle else 1
    self.process_index, self.process_count = process_index, process_count
    self.skip_bad_records, self.skipped = skip_bad_records, 0
    n = dataset.num_shards
    # Fewer shards than processes: every process reads them all, keeping every process_count-th example.
    self._by_example = n < process_count
    self.shards = [process_index] if self._by_example else list(range(process_index, n, process_count))

  def piece(self, k: int):
    """A fresh ``IterableDataset`` of shard ``k`` (or of this process's examples, see above)."""
    if self._by_example:
      from datasets.distributed import split_dataset_by_node
      return split_dataset_by_node(self.dataset, rank=self.process_index, world_size=self.process_count)
    return self.dataset.shard(num_shards=self.dataset.num_shards, index=k)

  def __iter__(self) -> _StreamIterator:
    return _StreamIterator(self)

  def __str__(self) -> str:
    return f"TextStream({self.description}, {len(self.shards)} shard(s) of process {self.process_index})"


def make_stream_iterator(stream: TextStream, tokenizer, *, seq_len: int, batch_size: int):
  """Endless ``{'tokens': int32 [batch_size, seq_len]}`` batches of a :class:`TextStream`, packed as
  ``make_train_iterator``'s; ``get_state()`` / ``set_state()`` checkpoint it exactly (a small JSON dict)."""
  _check_args(seq_len, batch_size, stream.process_index, stream.process_count)
  rows = PackedIterDataset(stream.map(_Tokenize(tokenizer)), seq_len, tokenizer.eos_id)
  return iter(rows.batch(batch_size, drop_remainder=True, batch_fn=_stack_rows))


def make_stream_eval_batches(stream: TextStream, tokenizer, *, seq_len: int, batch_size: int,
                             num_batches: int) -> list[dict[str, np.ndarray]]:
  """The first ``num_batches`` batches of one ordered pass over ``stream`` (built with
  ``shuffle=False, epochs=1``): the same at every evaluation. Fewer if the data is short (a
  warning); ``DataError`` if not even one."""
  _check_args(seq_len, batch_size, stream.process_index, stream.process_count)
  if stream.shuffle or stream.epochs != 1:
    raise ValueError("evaluation streams are read once, in order: build them with shuffle=False, epochs=1")
  rows = iter(PackedIterDataset(stream.map(_Tokenize(tokenizer)), seq_len, tokenizer.eos_id))
  batches, _ = _first_batches(rows, batch_size, num_batches, _stack_rows)
  if not batches:
    raise DataError(f"Too little evaluation data in {stream.description} for process {stream.process_index} of "
                    f"{stream.process_count}: one batch needs batch_size * seq_len = {batch_size * seq_len} tokens")
  if len(batches) < num_batches:
    _log.warning("Evaluation data holds only %d full batches of %d x %d tokens (%d requested); using those.",
                 len(batches), batch_size, seq_len, num_batches)
  return batches
