"""Image classification data: sources -> transform (resize, crop, flip, normalise) -> grain batches.

A source is random access (``len``, ``[i]``) to examples ``{'image': uint8 [H, W, C],
'label': int}``, as the text sources are to documents, so the same grain stream gives
global shuffling, disjoint per-process shares and exact resume from one integer:

* :class:`NpzImageSource`: MedMNIST's ``.npz`` layout (``train_images``,
  ``train_labels``, ``val_*``, ``test_*``); uncompressed members are memory-mapped.
* :class:`ImageFolderSource`: ``root/<class name>/<image file>`` (needs pillow).
* :class:`TfdsImageSource`: a split of a TFDS-prepared image dataset under a data_dir.
* :func:`offline_npz`: Debian's ``dataset-fashion-mnist`` or scikit-learn's digits
  written once in the MedMNIST layout (real images that install without a download).

Train stream (:func:`make_image_train_iterator`)::

    MapDataset.source(source)[process_index::process_count]
      .shuffle(seed).repeat()
      .random_map(ImageTransform)   # per-example rng from (seed, position): resumable
      .batch(batch_size)            # {'images': float32 [B, S, S, C], 'labels': int32 [B]}

The augmentation's randomness is a function of the seed and the example's position in
the stream, not of a stateful generator, so ``set_state(get_state())`` replays exactly
the same crops and flips.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import zipfile
from typing import Any, Sequence

import grain
import numpy as np

from lowrank_jax.data.errors import DataError, DataFileError
from lowrank_jax.data.tfds_source import TfdsSource

__all__ = [
    "ImageFolderSource", "ImageTransform", "NpzImageSource", "TfdsImageSource",
    "IMAGE_EXTENSIONS", "MEDMNIST_SPLITS", "OFFLINE_DATASETS", "make_image_eval_batches",
    "make_image_train_iterator", "offline_npz", "write_medmnist_npz",
]

MEDMNIST_SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif",
                    ".tiff")


def _as_hwc(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3:
    raise DataError(f"an image must be [H, W] or [H, W, C], got shape {image.shape}")
  return image


def _check_classes(num_classes: int, where: str) -> int:
  if num_classes < 2:
    raise DataError(f"{where}: found {num_classes} class(es); classification needs at least 2")
  return num_classes


# --- MedMNIST .npz -------------------------------------------------------------------------


def _npz_member(path: str, name: str) -> np.ndarray:
  """``name`` of the npz at ``path``: memory-mapped when stored uncompressed, else read."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(name + ".npy")
    if info.compress_type == zipfile.ZIP_STORED:
      with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the local file header; its name/extra lengths are at 26 / 28
        start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(
            local[28:30], "little")
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if not fortran and not dtype.hasobject:
          return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape)
    with zf.open(name + ".npy") as f:
      return np.lib.format.read_array(f, allow_pickle=False)


class NpzImageSource:
  """One split of a MedMNIST-layout ``.npz``: ``{split}_images`` and ``{split}_labels``.

  Images are uint8 ``[N, H, W]`` (grey) or ``[N, H, W, C]``; labels ``[N]`` or ``[N, 1]``
  class ids (MedMNIST's multi-label sets, ``[N, K > 1]``, are not a single-label task
  and are refused). ``num_classes`` is one more than the largest label of any split
  present, so every split of a file agrees.
  """

  def __init__(self, path: str | os.PathLike, split: str = "train"):
    self.path = os.fspath(path)
    self.split = split
    self._open()

  def _open(self) -> None:
    if not os.path.isfile(self.path):
      raise FileNotFoundError(
          f"{self.path}: no such .npz file (expected the MedMNIST layout: "
          f"{', '.join(s + '_images/' + s + '_labels' for s in MEDMNIST_SPLITS)})")
    try:
      with zipfile.ZipFile(self.path) as zf:
        members = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except zipfile.BadZipFile:
      raise DataError(f"{self.path}: not an .npz (zip) file") from None
    splits = [s for s in MEDMNIST_SPLITS if f"{s}_images" in members and f"{s}_labels" in members]
    if self.split not in splits:
      raise DataError(f"{self.path}: no split {self.split!r} ({self.split}_images and "
                      f"{self.split}_labels); splits present: {splits}; arrays: {sorted(members)}")
    self._images = _npz_member(self.path, f"{self.split}_images")
    labels = np.asarray(_npz_member(self.path, f"{self.split}_labels"))
    if labels.ndim == 2 and labels.shape[1] == 1:
      labels = labels[:, 0]
    if labels.ndim != 1:
      raise DataError(f"{self.path}: {self.split}_labels has shape {labels.shape}; a single-label "
                      "task needs [N] or [N, 1] (multi-label MedMNIST sets are not supported)")
    if len(labels) != len(self._images) or self._images.ndim not in (3, 4):
      raise DataError(f"{self.path}: {self.split}_images {self._images.shape} and "
                      f"{self.split}_labels {labels.shape} do not describe N images")
    if labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
      raise DataError(f"{self.path}: {self.split}_labels must be non-negative integers")
    self._labels = labels.astype(np.int64)
    top = max(int(np.max(_npz_member(self.path, f"{s}_labels"))) for s in splits
              if _npz_member(self.path, f"{s}_labels").size)
    self.num_classes = _check_classes(top + 1, self.path)

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": _as_hwc(self._images[index]), "label": int(self._labels[index])}

  def __getstate__(self):
    return {"path": self.path, "split": self.split}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __repr__(self) -> str:
    return f"NpzImageSource({self.path!r}, {self.split!r}, {len(self)} images)"


def write_medmnist_npz(path: str | os.PathLike,
                       splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
  """Writes ``{split: (images uint8 [N, H, W(, C)], labels [N])}`` in MedMNIST's layout.

  Stored uncompressed, so :class:`NpzImageSource` memory-maps it. Labels are written
  ``[N, 1]`` as MedMNIST does. Written to a temporary name then renamed, so a reader
  never sees half a file.
  """
  path = os.fspath(path)
  arrays = {}
  for split, (images, labels) in splits.items():
    if split not in MEDMNIST_SPLITS:
      raise ValueError(f"unknown split {split!r}; MedMNIST splits: {list(MEDMNIST_SPLITS)}")
    arrays[f"{split}_images"] = np.asarray(images, np.uint8)
    arrays[f"{split}_labels"] = np.asarray(labels, np.int64).reshape(-1, 1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
  return path


# --- a folder of images per class ----------------------------------------------------------


def _import_pil():
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("reading or resizing images needs pillow: pip install "
                      "'lowrank-jax[vision]'") from e
  return Image


class ImageFolderSource:
  """``root/<class>/<image>``: classes are the sub-folders in sorted order, label = position.

  Files with an image extension (:data:`IMAGE_EXTENSIONS`) are listed once, sorted by
  class then file name; each is decoded when read. ``channels`` 1 or 3 converts every
  image to grey or RGB (so a folder mixing modes gives one shape); None keeps 3 for
  colour and 1 for grey images.
  """

  def __init__(self, root: str | os.PathLike, channels: int | None = 3):
    self.root = os.fspath(root)
    if channels not in (None, 1, 3):
      raise ValueError(f"channels must be 1, 3 or None, got {channels!r}")
    self.channels = channels
    if not os.path.isdir(self.root):
      raise FileNotFoundError(f"{self.root}: no such folder (expected <root>/<class>/<image>)")
    self.classes = sorted(d for d in os.listdir(self.root)
                          if os.path.isdir(os.path.join(self.root, d)))
    _check_classes(len(self.classes), f"{self.root} (one sub-folder per class)")
    self.num_classes = len(self.classes)
    self._files: list[tuple[str, int]] = []
    for label, name in enumerate(self.classes):
      folder = os.path.join(self.root, name)
      files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
      if not files:
        raise DataError(f"{folder}: class {name!r} holds no image files "
                        f"(extensions: {', '.join(IMAGE_EXTENSIONS)})")
      self._files.extend((os.path.join(name, f), label) for f in files)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    Image = _import_pil()
    rel, label = self._files[index]
    path = os.path.join(self.root, rel)
    try:
      with Image.open(path) as im:
        mode = {1: "L", 3: "RGB", None: "L" if im.mode in ("L", "I", "I;16", "1") else "RGB"}
        image = np.asarray(im.convert(mode[self.channels]))
    except OSError as e:  # truncated, not an image, unreadable: PIL's errors are OSErrors
      raise DataFileError(path, None, f"cannot read the image ({e})") from None
    return {"image": _as_hwc(image), "label": label}

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.root!r}, {self.num_classes} classes, {len(self)} images)"


# --- TFDS ------------------------------------------------------------------------------------


class TfdsImageSource(TfdsSource):
  """A split of a TFDS-prepared image dataset (e.g. ``'cifar10'``, ``'oxford_flowers102'``).

  Reads like :class:`~lowrank_jax.data.tfds_source.TfdsSource` (no TensorFlow needed)
  and returns ``{'image', 'label'}`` from the features ``image_key`` / ``label_key``;
  ``num_classes`` comes from the label feature's metadata.
  """

  def __init__(self, name: str, split: str, data_dir: str | os.PathLike | None = None,
               image_key: str = "image", label_key: str = "label"):
    self.label_key = label_key
    super().__init__(name, split, data_dir, text_key=image_key)

  def _open(self) -> None:
    super()._open()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    features = tfds.builder_from_directory(self.directory).info.features
    if self.label_key not in features.keys():
      raise ValueError(f"{self.directory!r} has no feature {self.label_key!r} (features: "
                       f"{sorted(features.keys())}); set the label key.")
    self.num_classes = _check_classes(int(getattr(features[self.label_key], "num_classes", 0) or 0),
                                      f"{self.directory} feature {self.label_key!r}")

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self.example(index)
    return {"image": _as_hwc(example[self.text_key]), "label": int(example[self.label_key])}

  def __getstate__(self):
    return {**super().__getstate__(), "label_key": self.label_key}


# --- real images that install offline --------------------------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _read_idx(path: str) -> np.ndarray:
  """An IDX file (MNIST's format; gzipped or not) as a uint8 array."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8:
    raise DataError(f"{path}: not a uint8 IDX file")
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise DataError(f"{path}: header says {shape}, the file holds {body.size} values")
  return body.reshape(shape)


def fashion_mnist_splits(directory: str = FASHION_MNIST_DIR, val_size: int = 5000):
  """Fashion-MNIST from Debian's ``dataset-fashion-mnist``: train (the first 55,000 of the
  60,000), val (the last ``val_size``) and test (10,000); 28 x 28 grey, 10 classes."""
  def read(stem):
    for name in (stem + ".gz", stem):
      if os.path.isfile(os.path.join(directory, name)):
        return _read_idx(os.path.join(directory, name))
    raise FileNotFoundError(
        f"{os.path.join(directory, stem)}[.gz]: Fashion-MNIST is not installed; on Debian/Ubuntu "
        "`apt-get install dataset-fashion-mnist`, or use the 'digits' data (pip install scikit-learn)")
  x, y = read("train-images-idx3-ubyte"), read("train-labels-idx1-ubyte")
  n = len(x) - val_size
  return {"train": (x[:n], y[:n]), "val": (x[n:], y[n:]),
          "test": (read("t10k-images-idx3-ubyte"), read("t10k-labels-idx1-ubyte"))}


def digits_splits():
  """scikit-learn's digits (1,797 real 8 x 8 handwritten digits, 17 grey levels) scaled to
  uint8; a fixed 1,297 / 250 / 250 train / val / test split (order as shipped)."""
  try:
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the 'digits' data needs scikit-learn: pip install scikit-learn") from e
  d = load_digits()
  x = np.round(d.images * (255 / 16)).astype(np.uint8)
  y = d.target.astype(np.int64)
  return {"train": (x[:1297], y[:1297]), "val": (x[1297:1547], y[1297:1547]),
          "test": (x[1547:], y[1547:])}


OFFLINE_DATASETS = {"fashion_mnist": fashion_mnist_splits, "digits": digits_splits}


def default_cache_dir() -> str:
  return os.environ.get("LOWRANK_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "lowrank_jax")


def offline_npz(name: str, cache_dir: str | os.PathLike | None = None) -> str:
  """Path of ``<cache_dir>/<name>.npz``, writing it from the installed data the first time.

  ``name``: ``'fashion_mnist'`` (Debian's ``dataset-fashion-mnist``) or ``'digits'``
  (scikit-learn). The file is in MedMNIST's layout, read by :class:`NpzImageSource`.
  """
  if name not in OFFLINE_DATASETS:
    raise ValueError(f"unknown offline image dataset {name!r}; valid: {sorted(OFFLINE_DATASETS)}")
  path = os.path.join(os.fspath(cache_dir or default_cache_dir()), f"{name}.npz")
  if not os.path.isfile(path):
    write_medmnist_npz(path, OFFLINE_DATASETS[name]())
  return path


# --- transform and batches ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """uint8 example -> float32 ``[size, size, channels]`` image and int32 label.

  Resize (bilinear, pillow) when the image is not ``size`` x ``size``; grey <-> RGB to
  ``channels``; when augmenting, pad ``crop_padding`` pixels (edge-replicated) and crop a
  random ``size`` window, and flip left-right with probability 1/2 when ``flip``; then
  ``(x / 255 - mean) / std`` per channel (Hugging Face ViT: mean = std = 0.5).
  """
  size: int
  channels: int
  mean: tuple[float, ...] = (0.5,)
  std: tuple[float, ...] = (0.5,)
  crop_padding: int = 0
  flip: bool = False

  def __post_init__(self):
    if int(self.size) != self.size or self.size <= 0:
      raise ValueError(f"image size must be a positive integer, got {self.size!r}")
    if self.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
    for name in ("mean", "std"):
      value = tuple(getattr(self, name))
      if len(value) not in (1, self.channels):
        raise ValueError(f"{name} needs 1 or {self.channels} values, got {value}")
      object.__setattr__(self, name, value)
    if any(s <= 0 for s in self.std):
      raise ValueError(f"std must be positive, got {self.std}")
    if int(self.crop_padding) != self.crop_padding or self.crop_padding < 0:
      raise ValueError(f"crop_padding must be a non-negative integer, got {self.crop_padding!r}")

  @property
  def augments(self) -> bool:
    return self.crop_padding > 0 or self.flip

  def _base(self, image: np.ndarray) -> np.ndarray:
    image = _as_hwc(image)
    if image.shape[2] != self.channels:
      if image.shape[2] == 1:
        image = np.repeat(image, self.channels, axis=2)
      elif image.shape[2] == 3 and self.channels == 1:  # ITU-R 601 luma, as pillow's 'L'
        image = np.round(image.astype(np.float32) @ np.float32([0.299, 0.587, 0.114]))[..., None]
      else:
        raise DataError(f"cannot convert an image with {image.shape[2]} channels to {self.channels}")
    if image.shape[:2] != (self.size, self.size):
      Image = _import_pil()
      resized = [np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c]).astype(np.uint8))
                            .resize((self.size, self.size), Image.BILINEAR))
                 for c in range(image.shape[2])]
      image = np.stack(resized, axis=2)
    return image

  def _normalise(self, image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float32) / 255.0
    return (x - np.float32(self.mean)) / np.float32(self.std)

  def __call__(self, example: dict[str, Any], rng: np.random.Generator | None = None):
    image = self._base(example["image"])
    if rng is not None and self.augments:
      p = self.crop_padding
      if p:
        padded = np.pad(image, ((p, p), (p, p), (0, 0)), mode="edge")
        top, left = rng.integers(0, 2 * p + 1, size=2)
        image = padded[top:top + self.size, left:left + self.size]
      if self.flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return {"image": self._normalise(image), "label": np.int32(example["label"])}


def _stack(examples: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  return {"images": np.stack([e["image"] for e in examples]),
          "labels": np.asarray([e["label"] for e in examples], np.int32)}


def _share(source, process_index: int, process_count: int):
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise DataError(f"process {process_index} of {process_count} gets no images: the source "
                    f"has only {len(source)}")
  return ds


def make_image_train_iterator(source, transform: ImageTransform, *, batch_size: int,
                              seed: int = 0, shuffle: bool = True, process_index: int = 0,
                              process_count: int = 1) -> grain.DatasetIterator:
  """Endless, exactly resumable stream of ``{'images': float32 [B, S, S, C], 'labels': int32 [B]}``.

  Every epoch is reshuffled (seed derived from ``(seed, epoch)``); augmentation draws
  from a generator seeded by ``(seed, position in the stream)``, so the same seed gives
  the same batches and ``set_state(get_state())`` resumes them exactly.
  """
  if int(batch_size) != batch_size or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  ds = _share(source, process_index, process_count)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  ds = ds.repeat(None).random_map(transform, seed=int(seed) + 1)
  batches = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  return iter(batches.batch(int(batch_size), drop_remainder=True, batch_fn=_stack))


def make_image_eval_batches(source, transform: ImageTransform, *, batch_size: int,
                            max_examples: int | None = None, process_index: int = 0,
                            process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """Every example of this process's share (or the first ``max_examples``) once, in order,
  without augmentation, as full batches; the last batch is padded and carries
  ``'mask'`` (float32 [B], 0 on padding) so accuracy counts each example exactly once."""
  ds = _share(source, process_index, process_count)
  n = len(ds) if not max_examples else min(len(ds), int(max_examples))
  batches = []
  for start in range(0, n, batch_size):
    examples = [transform(ds[i]) for i in range(start, min(start + batch_size, n))]
    real = len(examples)
    examples += [examples[-1]] * (batch_size - real)
    batch = _stack(examples)
    batch["mask"] = (np.arange(batch_size) < real).astype(np.float32)
    batches.append(batch)
  return batches
