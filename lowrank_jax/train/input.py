"""config.data -> tokenizer, training iterator and the fixed validation batches."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import ml_collections

from lowrank_jax import data as data_lib
from lowrank_jax.train.config import split_paths
from lowrank_jax.train.errors import ConfigError


@dataclasses.dataclass
class Input:
  tokenizer: Any
  train_iter: Any  # grain DatasetIterator with get_state / set_state
  eval_batches: list[dict]  # the same fixed batches at every evaluation
  entropy_floor: float | None  # nats/token: the synthetic language's entropy rate, else None
  description: str


def _file_source(kind: str, spec: str, text_key: str):
  paths: Sequence[str] = [os.path.expanduser(p) for p in split_paths(spec)]
  if kind == "jsonl":
    return data_lib.JsonlSource(paths, text_key=text_key)
  return data_lib.TextSource(paths)


def _sources(cfg: ml_collections.ConfigDict, seed: int):
  """(train source, eval source, tokenizer, entropy floor, description)."""
  if cfg.source == "synthetic":
    s = cfg.synthetic
    make = lambda doc_seed: data_lib.SyntheticLanguage(  # noqa: E731
        vocab_size=s.vocab_size, branching=s.branching, stop_prob=s.stop_prob, seed=seed, doc_seed=doc_seed)
    train = make(0)
    return train, make(1), train.tokenizer, train.entropy_rate(), (
        f"synthetic Markov language (V={s.vocab_size}, branching {s.branching})")
  try:
    tokenizer = data_lib.make_tokenizer(os.path.expanduser(cfg.tokenizer))
  except FileNotFoundError as e:
    raise ConfigError("data.tokenizer", str(e)) from None
  if cfg.source in ("jsonl", "text"):
    try:
      train = _file_source(cfg.source, cfg.path, cfg.text_key)
    except (FileNotFoundError, ValueError) as e:
      raise ConfigError("data.path", str(e)) from None
    if cfg.eval_path:
      try:
        evals = _file_source(cfg.source, cfg.eval_path, cfg.text_key)
      except (FileNotFoundError, ValueError) as e:
        raise ConfigError("data.eval_path", str(e)) from None
    else:
      if len(train) < 2:
        raise ConfigError("data.eval_holdout", f"{cfg.path} holds {len(train)} document(s): too few to hold "
                          "some out for validation; set data.eval_path")
      train, evals = data_lib.split_holdout(train, cfg.eval_holdout)
    return train, evals, tokenizer, None, f"{cfg.source} {cfg.path}"
  try:
    data_dir = os.path.expanduser(cfg.data_dir) if cfg.data_dir else None
    train = data_lib.TfdsSource(cfg.tfds_name, split=cfg.train_split, data_dir=data_dir, text_key=cfg.text_key)
    evals = data_lib.TfdsSource(cfg.tfds_name, split=cfg.eval_split, data_dir=data_dir, text_key=cfg.text_key)
  except (FileNotFoundError, ValueError, ImportError) as e:
    key = "data.eval_split" if "split" in str(e).lower() and cfg.eval_split in str(e) else "data.tfds_name"
    raise ConfigError(key, str(e)) from None
  return train, evals, tokenizer, None, f"tfds {cfg.tfds_name}"


def build_input(config: ml_collections.ConfigDict, *, process_index: int, process_count: int) -> Input:
  cfg = config.data
  train, evals, tokenizer, floor, description = _sources(cfg, config.seed)
  if len(train) == 0:
    raise ConfigError("data.path", "the training source holds no documents")
  local_batch = config.train.batch_size // process_count
  # Validation is evaluated on micro-batch sized pieces so it never needs more memory than a step.
  eval_batch = max(1, local_batch // config.train.grad_accum)
  try:
    eval_batches = data_lib.make_eval_batches(
        evals, tokenizer, seq_len=cfg.seq_len, batch_size=eval_batch, num_batches=config.train.eval_batches,
        process_index=process_index, process_count=process_count)
  except data_lib.DataError as e:
    raise ConfigError("data.seq_len", f"validation data cannot form one batch of {eval_batch} x {cfg.seq_len} "
                      f"tokens: {e}") from None
  train_iter = data_lib.make_train_iterator(
      train, tokenizer, seq_len=cfg.seq_len, batch_size=local_batch, seed=config.seed, shuffle=cfg.shuffle,
      process_index=process_index, process_count=process_count)
  return Input(tokenizer, train_iter, eval_batches, floor, description)
