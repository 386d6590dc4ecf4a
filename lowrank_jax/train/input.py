"""The run's data settings -> tokenizer, training iterator and the fixed validation batches."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

from lowrank_jax import data as data_lib
from lowrank_jax import models
from lowrank_jax.train import hub
from lowrank_jax.train.settings import DataSettings, RunConfig
from lowrank_jax.train.errors import ConfigError


@dataclasses.dataclass
class Input:
  tokenizer: Any
  train_iter: Any  # grain DatasetIterator with get_state / set_state
  eval_batches: list[dict]  # the same fixed batches at every evaluation
  entropy_floor: float | None  # nats/token: the synthetic language's entropy rate, else None
  description: str
  skipped: Any = None  # with data.on_bad_record=skip: the training source's `SkipBadRecords`

  def skipped_records(self) -> int:
    """Unreadable training records skipped so far in this launch."""
    return self.skipped.skipped if self.skipped is not None else 0


def _readable(cfg: DataSettings, source):
  """`source` as data.on_bad_record wants it: as it is (error), or reading unreadable records as
  filtered out (skip)."""
  return data_lib.SkipBadRecords(source) if cfg.on_bad_record == "skip" else source


# The data library names the argument at fault (`DataError.argument`); these are its config keys.
_ARGUMENT_KEYS = {"text_key": "data.text_key"}


def _synthetic(cfg: DataSettings, seed: int):
  s = cfg.synthetic
  make = lambda doc_seed: data_lib.SyntheticLanguage(  # noqa: E731
      vocab_size=s.vocab_size, branching=s.branching, stop_prob=s.stop_prob, seed=seed, doc_seed=doc_seed)
  train = make(0)
  return train, make(1), train.tokenizer, train.entropy_rate(), (
      f"synthetic Markov language (V={s.vocab_size}, branching {s.branching})")


def _file_source(cfg: DataSettings, paths: list[str], key: str):
  """JSON-lines or text files (data.source), Parquet files among them read by column data.text_key."""
  try:
    return data_lib.file_source(paths, kind=cfg.source, text_key=cfg.text_key)
  except (FileNotFoundError, ValueError, ImportError) as e:  # ImportError: Parquet without pyarrow
    raise ConfigError(_ARGUMENT_KEYS.get(getattr(e, "argument", None), key), str(e)) from None


def _files(cfg: DataSettings):
  train = _file_source(cfg, cfg.paths, "data.path")
  if len(train) == 0:  # (before the holdout, which would otherwise take the blame)
    raise ConfigError("data.path", f"{cfg.path} holds no documents (empty, or only blank lines)")
  if cfg.eval_path:
    return train, _file_source(cfg, cfg.eval_paths, "data.eval_path")
  if len(train) < 2:
    raise ConfigError("data.eval_holdout", f"{cfg.path} holds {len(train)} document(s): too few to hold some out "
                      "for validation; set data.eval_path")
  return data_lib.split_holdout(train, cfg.eval_holdout)


def _tfds(cfg: DataSettings, split: str, split_key: str):
  """A TFDS split; a bad split, text field or dataset is blamed on its own key."""
  keys = {**_ARGUMENT_KEYS, "split": split_key}
  try:
    data_dir = os.path.expanduser(cfg.data_dir) if cfg.data_dir else None
    return data_lib.TfdsSource(cfg.tfds_name, split=split, data_dir=data_dir, text_key=cfg.text_key)
  except (FileNotFoundError, ValueError, ImportError) as e:
    raise ConfigError(keys.get(getattr(e, "argument", None), "data.tfds_name"), str(e)) from None


@dataclasses.dataclass(frozen=True)
class ImageClasses:
  """What a classification run has in place of a tokenizer: its classes (`vocab_size`: their count)."""
  vocab_size: int


@functools.lru_cache(maxsize=8)
def _image_sources(cfg: DataSettings):
  """(train source, eval source, description) of image data; a bad file or split names its key."""
  images = data_lib.images
  key = "data.path"
  try:
    if cfg.source == "tfds_images":
      data_dir = os.path.expanduser(cfg.data_dir) if cfg.data_dir else None
      make = lambda split: images.TfdsImageSource(cfg.tfds_name, split, data_dir,  # noqa: E731
                                                  cfg.image.image_key, cfg.image.label_key)
      key = "data.tfds_name"
      return make(cfg.train_split), make(cfg.eval_split), f"tfds {cfg.tfds_name}"
    if cfg.source == "image_folder":
      if not cfg.eval_path:
        raise ConfigError("data.eval_path", "image_folder needs a validation folder of the same classes")
      channels = cfg.image.channels or None
      train = images.ImageFolderSource(os.path.expanduser(cfg.path), channels)
      key = "data.eval_path"
      evals = images.ImageFolderSource(os.path.expanduser(cfg.eval_path), channels)
      if evals.classes != train.classes:
        raise ConfigError("data.eval_path", f"classes {evals.classes} differ from data.path's {train.classes}")
      return train, evals, f"image folders {cfg.path} / {cfg.eval_path}"
    path = (data_lib.images.offline_npz(cfg.source) if cfg.source in images.OFFLINE_DATASETS
            else os.path.expanduser(cfg.path))
    key = "data.train_split"
    train = images.NpzImageSource(path, cfg.train_split)
    key = "data.eval_split"
    evals = images.NpzImageSource(os.path.expanduser(cfg.eval_path) if cfg.eval_path else path, cfg.eval_split)
    return train, evals, f"{cfg.source} {path}"
  except (FileNotFoundError, ValueError, ImportError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(key, str(e)) from None


def model_image_shape(run: RunConfig) -> tuple[int, int]:
  """(side, channels) of the images the model takes: `data.image.size` / `.channels` where set, else
  the pretrained checkpoint's (`model.init_from`: the data is resized to it), else the first
  training image's."""
  img = run.data.image
  if img.size and img.channels:
    return img.size, img.channels
  if run.model.init_from:
    config = models.pretrained_config(run.model.init_from, num_classes=2)  # (its image geometry only)
    return img.size or config.image_size, img.channels or config.num_channels
  image = _image_sources(run.data)[0][0]["image"]
  if image.shape[0] != image.shape[1] and not img.size:
    raise ConfigError("data.image.size", f"the images are {image.shape[0]} x {image.shape[1]}; the ViT takes "
                      "squares: set the side to resize to")
  return img.size or image.shape[0], img.channels or image.shape[2]


def image_input(run: RunConfig, *, process_index: int, process_count: int) -> Input:
  """Image classification data: augmented training batches and fixed, padded validation batches."""
  cfg, img = run.data, run.data.image
  train, evals, description = _image_sources(cfg)
  size, channels = model_image_shape(run)
  try:
    transform = data_lib.ImageTransform(size, channels, img.means, img.stds, img.crop_padding, img.flip)
  except ValueError as e:
    raise ConfigError("data.image.mean", str(e)) from None
  plain = dataclasses.replace(transform, crop_padding=0, flip=False)
  local_batch, eval_batch = _batch_sizes(run, process_count)
  eval_batches = data_lib.make_image_eval_batches(
      evals, plain, batch_size=eval_batch, max_examples=run.train.eval_batches * eval_batch,
      process_index=process_index, process_count=process_count)
  readable = _readable(cfg, train)
  train_iter = data_lib.make_image_train_iterator(
      readable, transform, batch_size=local_batch, seed=run.seed, shuffle=cfg.shuffle,
      process_index=process_index, process_count=process_count)
  return Input(ImageClasses(train.num_classes), train_iter, eval_batches, None,
               f"{description}: {train.num_classes} classes, {len(train)} training images, {size}x{size}x{channels}",
               skipped=readable if readable is not train else None)


def image_classes(run: RunConfig) -> ImageClasses:
  """The classes of the training images (what a classification run has for a vocabulary)."""
  return ImageClasses(_image_sources(run.data)[0].num_classes)


def make_tokenizer(run: RunConfig):
  """`data.tokenizer`; when empty, `model.init_from`'s own tokenizer, else bytes."""
  spec = run.data.tokenizer or run.model.init_from or "byte"
  try:
    tokenizer = data_lib.make_tokenizer(os.path.expanduser(spec))
  except (FileNotFoundError, ValueError, ImportError) as e:  # missing, or not a tokenizer file
    raise ConfigError("data.tokenizer", str(e)) from None
  if run.model.init_from:
    embedding = models.pretrained_config(run.model.init_from).vocab_size
    if tokenizer.vocab_size > embedding:
      raise ConfigError("data.tokenizer", f"has {tokenizer.vocab_size} tokens, more than the {embedding} of "
                        f"{run.model.init_from}'s embedding")
  return tokenizer


def token_vocab_size(run: RunConfig) -> int:
  """The vocabulary a language model's embedding needs, without reading any data (a checkpoint
  with no tokenizer files beside it answers with its embedding's size)."""
  if run.data.source == "synthetic":
    return run.data.synthetic.vocab_size + 2  # + pad and eos
  if run.model.init_from and not run.data.tokenizer and not any(
      os.path.exists(os.path.join(os.path.expanduser(run.model.init_from), f))
      for f in ("tokenizer.json", "tokenizer.model", "spiece.model")):
    return models.pretrained_config(run.model.init_from).vocab_size
  return make_tokenizer(run).vocab_size


def _instructions(cfg: DataSettings, paths: list[str], key: str):
  ins = cfg.instructions
  try:
    return data_lib.InstructionSource(paths, format=ins.format, template=ins.template,
                                      response_key=ins.response_key)
  except (FileNotFoundError, ValueError, ImportError) as e:  # ImportError: Parquet without pyarrow
    raise ConfigError({"format": "data.instructions.format"}.get(getattr(e, "argument", None), key), str(e)) from None


def _batch_sizes(run: RunConfig, process_count: int) -> tuple[int, int]:
  """(this process's rows per step, its rows per validation batch): validation runs on micro-batch
  sized pieces, so it never needs more memory than a step."""
  local_batch = run.train.batch_size // process_count
  return local_batch, max(1, local_batch // run.train.grad_accum)


def instruction_input(run: RunConfig, *, process_index: int, process_count: int) -> Input:
  """Prompt/response examples as batches of tokens, segment_ids, positions and loss_mask."""
  cfg = run.data
  tokenizer = make_tokenizer(run)
  train = _instructions(cfg, cfg.paths, "data.path")
  if cfg.eval_path:
    evals = _instructions(cfg, cfg.eval_paths, "data.eval_path")
  else:
    train, evals = data_lib.split_holdout(train, cfg.eval_holdout)
  if len(train) == 0:
    raise ConfigError("data.path", "the training source holds no documents")
  train, evals = _readable(cfg, train), _readable(cfg, evals)
  local_batch, eval_batch = _batch_sizes(run, process_count)
  shared = dict(pack=cfg.instructions.pack, train_on_prompt=cfg.instructions.train_on_prompt,
                process_index=process_index, process_count=process_count)
  eval_batches = data_lib.make_instruction_eval_batches(
      evals, tokenizer, seq_len=cfg.seq_len, batch_size=eval_batch, num_batches=run.train.eval_batches, **shared)
  train_iter = data_lib.make_instruction_iterator(
      train, tokenizer, seq_len=cfg.seq_len, batch_size=local_batch, seed=run.seed, shuffle=cfg.shuffle, **shared)
  return Input(tokenizer, train_iter, eval_batches, None, f"instructions ({cfg.instructions.format}) {cfg.path}",
               skipped=train if cfg.on_bad_record == "skip" else None)


# data.hf's keys by the argument the data library blames (`DataError.argument`; "split" is the split at hand).
_HF_KEYS = {"path": "data.hf.path", "name": "data.hf.name", "text_field": "data.hf.text_field"}


def _hf(cfg: DataSettings, load, split: str, split_key: str):
  """`load` (hf_source.load_source: random access, or open_stream) of one split; an error names its key."""
  h = cfg.hf
  try:
    return load(h.path, name=h.name, split=split, text_field=h.text_field, revision=h.revision)
  except (FileNotFoundError, ValueError, ImportError) as e:
    key = {**_HF_KEYS, "split": split_key}.get(getattr(e, "argument", None), "data.hf.path")
    route = hub.DATA_WITHOUT_HUB if key == "data.hf.path" and data_lib.hf_source.is_hub_id(h.path) else ""
    raise ConfigError(key, f"{e}{route}") from None


def _hf_description(cfg: DataSettings) -> str:
  h = cfg.hf
  return f"hf {h.path}{f' ({h.name})' if h.name else ''} [{h.split}]{' streamed' if h.streams else ''}"


def _hf_sources(cfg: DataSettings):
  """(train, eval) random-access sources of data.source=hf with streaming off."""
  load = data_lib.hf_source.load_source
  train = _hf(cfg, load, cfg.hf.split, "data.hf.split")
  if len(train) == 0:
    raise ConfigError("data.hf.split", f"{cfg.hf.split!r} of {cfg.hf.path} holds no rows")
  return train, _hf(cfg, load, cfg.hf.eval_split, "data.hf.eval_split")


def _hf_stream_input(run: RunConfig, tokenizer, *, process_index: int, process_count: int) -> Input:
  """data.source=hf streamed: each process reads its own shards of the split, resumable exactly
  (lowrank_jax/data/hf_source.py)."""
  cfg, h, hf = run.data, run.data.hf, data_lib.hf_source
  local_batch, eval_batch = _batch_sizes(run, process_count)
  shared = dict(text_field=h.text_field, process_index=process_index, process_count=process_count)
  evals = hf.TextStream(_hf(cfg, hf.open_stream, h.eval_split, "data.hf.eval_split"), shuffle=False, epochs=1,
                        description=f"{h.path} [{h.eval_split}]", **shared)
  try:
    eval_batches = hf.make_stream_eval_batches(evals, tokenizer, seq_len=cfg.seq_len, batch_size=eval_batch,
                                               num_batches=run.train.eval_batches)
  except data_lib.DataError as e:
    if e.argument:
      raise ConfigError(_HF_KEYS.get(e.argument, "data.hf.path"), str(e)) from None
    raise ConfigError("data.seq_len", f"validation data cannot form one batch of {eval_batch} x {cfg.seq_len} "
                      f"tokens: {e}") from None
  except data_lib.DataFileError as e:  # a record whose text is not a string
    raise ConfigError("data.hf.eval_split", str(e)) from None
  skip = cfg.on_bad_record == "skip"
  train = hf.TextStream(_hf(cfg, hf.open_stream, h.split, "data.hf.split"), seed=run.seed, shuffle=cfg.shuffle,
                        shuffle_buffer=h.shuffle_buffer, skip_bad_records=skip,
                        description=f"{h.path} [{h.split}]", **shared)
  train_iter = hf.make_stream_iterator(train, tokenizer, seq_len=cfg.seq_len, batch_size=local_batch)
  return Input(tokenizer, train_iter, eval_batches, None, _hf_description(cfg), skipped=train if skip else None)


def _token_sources(cfg: DataSettings, seed: int, tokenizer):
  """(train source, eval source, tokenizer, entropy floor, description) of a language-model source."""
  if cfg.source == "synthetic":
    return _synthetic(cfg, seed)
  if cfg.source in ("jsonl", "text"):
    return (*_files(cfg), tokenizer, None, f"{cfg.source} {cfg.path}")
  if cfg.source == "hf":
    return (*_hf_sources(cfg), tokenizer, None, _hf_description(cfg))
  train = _tfds(cfg, cfg.train_split, "data.train_split")
  return train, _tfds(cfg, cfg.eval_split, "data.eval_split"), tokenizer, None, f"tfds {cfg.tfds_name}"


def token_input(run: RunConfig, *, process_index: int, process_count: int) -> Input:
  """Documents tokenized and packed into rows of `data.seq_len` tokens."""
  cfg = run.data
  tokenizer = None if cfg.source == "synthetic" else make_tokenizer(run)
  if cfg.source == "hf" and cfg.hf.streams:  # no random access: a stream of its own
    return _hf_stream_input(run, tokenizer, process_index=process_index, process_count=process_count)
  train, evals, tokenizer, floor, description = _token_sources(cfg, run.seed, tokenizer)
  if len(train) == 0:
    raise ConfigError("data.path", "the training source holds no documents")
  if cfg.source != "synthetic":
    train, evals = _readable(cfg, train), _readable(cfg, evals)
  local_batch, eval_batch = _batch_sizes(run, process_count)
  try:
    eval_batches = data_lib.make_eval_batches(
        evals, tokenizer, seq_len=cfg.seq_len, batch_size=eval_batch, num_batches=run.train.eval_batches,
        process_index=process_index, process_count=process_count)
  except data_lib.DataError as e:
    raise ConfigError("data.seq_len", f"validation data cannot form one batch of {eval_batch} x {cfg.seq_len} "
                      f"tokens: {e}") from None
  except data_lib.DataFileError as e:  # a malformed record, named by file and line
    raise ConfigError("data.hf.eval_split" if cfg.source == "hf" else "data.eval_path" if cfg.eval_path
                      else "data.path", str(e)) from None
  train_iter = data_lib.make_train_iterator(
      train, tokenizer, seq_len=cfg.seq_len, batch_size=local_batch, seed=run.seed, shuffle=cfg.shuffle,
      process_index=process_index, process_count=process_count)
  return Input(tokenizer, train_iter, eval_batches, floor, description,
               skipped=train if isinstance(train, data_lib.SkipBadRecords) else None)
