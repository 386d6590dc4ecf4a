"""A split of a TFDS-prepared dataset directory as a random-access text source.

Most prepared TFDS datasets (C4 included) are stored as TFRecord shards, which
TFDS itself only reads through TensorFlow and only sequentially. TensorFlow
is a heavy dependency a JAX trainer should not need, and shuffled training
needs random access, so for TFRecord this source uses TFDS only for metadata
(``builder_from_directory``: split names, shard files and record counts) and
for decoding a record (``features.deserialize_example_np``), and reads the
records itself (``tfrecord.TFRecordShards``). Directories prepared as
``array_record`` or ``parquet`` already support random access in TFDS, so
those go through ``builder.as_data_source``.

``tensorflow_datasets`` is an optional extra and is imported only here.
"""

from __future__ import annotations

import os
import re

from lowrank_jax.data.errors import DataError
from lowrank_jax.data.tfrecord import TFRecordShards

__all__ = ["TfdsSource", "resolve_tfds_dir"]

_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "TfdsSource needs tensorflow-datasets (TensorFlow itself is not "
        "needed): pip install 'lowrank-jax[tfds]'") from e
  return tfds


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets")


def _version_key(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in v.split("."))


def resolve_tfds_dir(name: str, data_dir: str | os.PathLike | None) -> str:
  """``'c4/en:3.1.0'`` -> ``<data_dir>/c4/en/3.1.0`` (latest version if none).

  Raises ``FileNotFoundError`` explaining how to prepare the dataset.
  """
  data_dir = os.path.expanduser(os.fspath(data_dir or default_data_dir()))
  base, _, version = name.partition(":")
  base = base.strip("/")
  if not base or (version and not _VERSION.match(version)):
    raise ValueError(f"TFDS name {name!r} is not of the form "
                     "'dataset[/config][:X.Y.Z]', e.g. 'c4/en:3.1.0'.")
  parent = os.path.join(data_dir, *base.split("/"))
  if not version and os.path.isdir(parent):
    versions = [v for v in os.listdir(parent) if _VERSION.match(v)]
    if versions:
      version = max(versions, key=_version_key)
  path = os.path.join(parent, version) if version else parent
  if not os.path.isfile(os.path.join(path, "dataset_info.json")):
    spec = f"{base}:{version}" if version else base
    raise FileNotFoundError(
        f"No prepared TFDS dataset {name!r}: looked for {path!r} "
        f"(containing dataset_info.json) under data_dir={data_dir!r}.\n"
        "Prepare it with\n"
        f"  tfds build {spec} --data_dir {data_dir}\n"
        "or\n"
        "  python -m tensorflow_datasets.scripts.download_and_prepare "
        f"--datasets={spec} --data_dir={data_dir}\n"
        "(the full C4 cannot be downloaded directly: it needs the manual "
        "Common Crawl download and an Apache Beam pipeline, see the TFDS c4 "
        "catalog page). If it is already prepared elsewhere, pass that "
        "directory as data_dir (the config's data.data_dir) or set "
        "$TFDS_DATA_DIR.")
  return path


class TfdsSource:
  """Documents of one split of a prepared TFDS dataset; ``source[i]`` is text.

  Args:
    name: ``'dataset/config:version'`` such as ``'c4/en:3.1.0'``; the version
      may be omitted (the newest prepared one is used).
    split: a split name of the prepared dataset (``'train'``,
      ``'validation'``...).
    data_dir: the TFDS data_dir; default ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``.
    text_key: the feature holding the document text.

  Document order is the prepared order (shard by shard), so it matches what
  TFDS yields with ``shuffle_files=False``.
  """

  def __init__(self, name: str, split: str,
               data_dir: str | os.PathLike | None = None,
               text_key: str = "text"):
    self.name = name
    self.split = split
    self.text_key = text_key
    self.directory = resolve_tfds_dir(name, data_dir)
    self._open()

  def _open(self) -> None:
    tfds = _import_tfds()
    file_adapters = tfds.core.file_adapters
    builder = tfds.builder_from_directory(self.directory)
    info = builder.info
    if self.split not in info.splits:
      raise DataError(
          f"Split {self.split!r} not found in {self.directory!r}; available "
          f"splits: {sorted(info.splits.keys())}.", argument="split")
    features = info.features
    if self.text_key not in features.keys():
      raise DataError(
          f"{self.directory!r} has no feature {self.text_key!r} (features: "
          f"{sorted(features.keys())}); set text_key.", argument="text_key")
    split_info = info.splits[self.split]
    file_format = info.file_format
    if file_format == file_adapters.FileFormat.TFRECORD:
      self._records = TFRecordShards(
          [os.fspath(p) for p in split_info.filepaths],
          list(split_info.shard_lengths))
      self._decode = features.deserialize_example_np
      self._data_source = None
    elif file_format in file_adapters.FileFormat.with_random_access():
      self._records = None
      self._decode = None
      self._data_source = builder.as_data_source(self.split)
    else:
      raise ValueError(
          f"{self.directory!r} is stored as {file_format.value!r}; TfdsSource "
          "reads tfrecord, array_record and parquet.")
    self._length = int(split_info.num_examples)

  def __len__(self) -> int:
    return self._length

  def example(self, index: int) -> dict:
    """Every feature of example ``index``, decoded to numpy."""
    if self._records is not None:
      return self._decode(self._records[index])
    return self._data_source[index]

  def __getitem__(self, index: int) -> str:
    text = self.example(index)[self.text_key]
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    elif not isinstance(text, str):  # e.g. a 0-d numpy object array
      text = text.item()
      text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
    return text

  def __getstate__(self):
    return {"name": self.name, "split": self.split,
            "text_key": self.text_key, "directory": self.directory}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __repr__(self) -> str:
    return (f"TfdsSource({self.name!r}, {self.split!r}, "
            f"directory={self.directory!r}, {len(self)} documents)")
