"""Validation of a training config: every bad value gets one clear error, before compilation.

`validate(config)` checks what can be checked from the config and the file system
alone (choices, sizes, divisibility, files). Problems that only show once data is
read (a corpus too small for one batch) are raised by the input builder, still
before anything is compiled, as the same `ConfigError`.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import ml_collections

from lowrank_jax import models
from lowrank_jax.train import methods, parallel
from lowrank_jax.train.errors import ConfigError

SOURCES = ("synthetic", "jsonl", "text", "tfds")
FAMILIES = tuple(models.FAMILIES)
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "constant")


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node: Any = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError):
      raise ConfigError(key, "missing (configs should start from configs/base.py)") from None
  return node


def _choice(config, key: str, choices) -> None:
  value = _get(config, key)
  if value not in choices:
    raise ConfigError(key, f"unknown value {value!r}", choices)


def _positive(config, key: str, kind=int) -> None:
  value = _get(config, key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
    raise ConfigError(key, f"must be a positive {'integer' if kind is int else 'number'}, got {value!r}")
  if value <= 0:
    raise ConfigError(key, f"must be > 0, got {value!r}")


def _non_negative(config, key: str) -> None:
  value = _get(config, key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
    raise ConfigError(key, f"must be a number >= 0, got {value!r}")


def _in_range(config, key: str, lo: float, hi: float, hi_inclusive: bool = False) -> None:
  value = _get(config, key)
  ok = isinstance(value, (int, float)) and lo <= value and (value <= hi if hi_inclusive else value < hi)
  if not ok:
    bracket = "]" if hi_inclusive else ")"
    raise ConfigError(key, f"must be in [{lo}, {hi}{bracket}, got {value!r}")


def split_paths(spec: str) -> list[str]:
  """A comma-separated list of files or glob patterns."""
  return [p.strip() for p in spec.split(",") if p.strip()]


def _check_files(key: str, spec: str) -> None:
  patterns = split_paths(spec)
  if not patterns:
    raise ConfigError(key, "is empty: give one or more files or glob patterns (comma separated)")
  for pattern in patterns:
    if not glob.glob(os.path.expanduser(pattern)):
      raise ConfigError(key, f"no file matches {pattern!r} (working directory: {os.getcwd()})")


VELORA_LAYERS = ("q", "k", "v", "o", "gate", "up", "down")
V_INITS = ("batch_average_once", "batch_average", "random")


def _linear_kind(config: ml_collections.ConfigDict, name: str) -> str:
  """The kind a layer is built as: `model.linear` over the method's needs over 'dense'."""
  method = methods.get_method(config.optimizer.name)
  kinds = dict(method.linear_kinds(config) if method.linear_kinds else {})
  kinds.update(dict(config.model.linear))
  return kinds.get(name, "dense")


def _validate_velora(config: ml_collections.ConfigDict) -> None:
  from lowrank_jax.train.model import linear_in_features, velora_layers

  _choice(config, "model.velora.v_init", V_INITS)
  _positive(config, "model.velora.sub_token_size")
  _positive(config, "model.velora.scale", kind=float)
  try:
    layers = velora_layers(config)
  except ValueError:
    raise ConfigError("model.velora.layers", f"expected 'layer[:sub_token_size],...' such as 'v:8,down:16', "
                      f"got {config.model.velora.layers!r}") from None
  for name, size in layers.items():
    valid = [n for n in VELORA_LAYERS if not (n == "gate" and config.model.family == "gpt2")]
    if name not in valid:
      raise ConfigError("model.velora.layers", f"unknown layer name {name!r} for {config.model.family}", valid)
    kind = _linear_kind(config, name)
    if kind not in ("dense", "lora"):
      raise ConfigError("model.velora.layers", f"layer {name!r} is a {kind!r} linear; "
                        "VeLoRA applies to dense and lora linears")
    width = linear_in_features(config, name)
    if size <= 0 or width % size:
      raise ConfigError("model.velora.layers", f"sub-token size {size} of layer {name!r} must divide its input "
                        f"width {width}", [d for d in range(1, min(width, 256) + 1) if width % d == 0])


def _validate_shard_heads(config: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  if not isinstance(_get(config, "parallel.shard_heads"), bool):
    raise ConfigError("parallel.shard_heads", f"must be True or False, got {config.parallel.shard_heads!r}")
  if not config.parallel.shard_heads:
    return
  name = _get(config, "optimizer.name")
  split = methods.get_method(name).split_heads
  if split is None:
    raise ConfigError("parallel.shard_heads", f"method {name!r} has no heads to spread over devices",
                      [m for m in methods.method_names() if methods.get_method(m).split_heads])
  if config.parallel.fsdp:
    raise ConfigError("parallel.fsdp", "cannot be combined with parallel.shard_heads (the heads are already "
                      "split over devices; the shared weights stay whole)")
  if config.parallel.mode == "pmap" and process_count > 1:
    raise ConfigError("parallel.mode", "parallel.shard_heads under 'pmap' runs on one host; use 'mesh' "
                      "(jit + shard_map) for several hosts")
  if split.validate is not None:
    split.validate(config)
  heads = split.num_heads(config)
  if heads % num_devices:
    raise ConfigError(split.num_heads_key, f"with parallel.shard_heads every device holds the same number of "
                      f"heads, so {heads} must be a multiple of the device count ({num_devices})")


def validate(config: ml_collections.ConfigDict, *, num_devices: int = 1, process_count: int = 1) -> None:
  """Raise `ConfigError` for the first value that cannot work."""
  # Model.
  _choice(config, "model.family", FAMILIES)
  _choice(config, "model.size", sorted(models.FAMILIES[config.model.family][0]))
  _choice(config, "model.dtype", DTYPES)
  _choice(config, "model.param_dtype", DTYPES)
  _positive(config, "model.vocab_multiple")
  for name, kind in _get(config, "model.linear").items():
    if name not in models.LAYER_NAMES:
      raise ConfigError(f"model.linear.{name}", "unknown layer name", models.LAYER_NAMES)
    if kind not in models.linear_kinds():
      raise ConfigError(f"model.linear.{name}", f"unknown linear kind {kind!r}", models.linear_kinds())

  _validate_velora(config)

  # Parallelism.
  _choice(config, "parallel.mode", parallel.MODES)
  if not isinstance(_get(config, "parallel.fsdp"), bool):
    raise ConfigError("parallel.fsdp", f"must be True or False, got {config.parallel.fsdp!r}")
  if config.parallel.fsdp and config.parallel.mode != "mesh":
    raise ConfigError("parallel.fsdp", "needs parallel.mode='mesh' (pmap keeps a full replica per device)")
  _validate_shard_heads(config, num_devices, process_count)

  # Training loop sizes.
  for key in ("train.steps", "train.batch_size", "train.grad_accum", "train.eval_batches",
              "train.keep_checkpoints", "train.log_every", "data.seq_len"):
    _positive(config, key)
  for key in ("train.eval_every", "train.checkpoint_every"):
    _non_negative(config, key)
  if _get(config, "data.seq_len") < 2:
    raise ConfigError("data.seq_len", "must be >= 2 (a sequence predicts its next tokens)")
  batch, accum = config.train.batch_size, config.train.grad_accum
  if batch % accum:
    raise ConfigError("train.grad_accum", f"must divide train.batch_size={batch}, got {accum}",
                      [d for d in range(1, batch + 1) if batch % d == 0])
  if batch % process_count:
    raise ConfigError("train.batch_size", f"must be divisible by the number of processes ({process_count}), got {batch}")
  micro = batch // accum
  if micro % num_devices:
    raise ConfigError(
        "train.batch_size",
        f"the micro-batch train.batch_size / train.grad_accum = {micro} must be divisible by the "
        f"number of devices ({num_devices}) for data parallelism")

  # Optimizer.
  method = methods.get_method(_get(config, "optimizer.name"))
  _choice(config, "optimizer.schedule", SCHEDULES)
  _positive(config, "optimizer.lr", kind=float)
  _in_range(config, "optimizer.warmup", 0.0, 1.0)
  _in_range(config, "optimizer.min_lr_ratio", 0.0, 1.0, hi_inclusive=True)
  for key in ("optimizer.weight_decay", "optimizer.grad_clip", "optimizer.eps"):
    _non_negative(config, key)
  for key in ("optimizer.b1", "optimizer.b2"):
    _in_range(config, key, 0.0, 1.0)
  if method.validate is not None:
    method.validate(config)

  # Data.
  _choice(config, "data.source", SOURCES)
  source = config.data.source
  if source == "synthetic":
    _positive(config, "data.synthetic.vocab_size")
    _positive(config, "data.synthetic.branching")
    if config.data.synthetic.branching > config.data.synthetic.vocab_size:
      raise ConfigError("data.synthetic.branching",
                        f"must be <= data.synthetic.vocab_size={config.data.synthetic.vocab_size}")
    _in_range(config, "data.synthetic.stop_prob", 0.0, 1.0)
    if config.data.synthetic.stop_prob <= 0:
      raise ConfigError("data.synthetic.stop_prob", "must be > 0 (documents must end)")
    return
  if source in ("jsonl", "text"):
    _check_files("data.path", config.data.path)
    if config.data.eval_path:
      _check_files("data.eval_path", config.data.eval_path)
    else:
      _in_range(config, "data.eval_holdout", 0.0, 1.0)
      if config.data.eval_holdout <= 0:
        raise ConfigError("data.eval_holdout", "must be > 0 when data.eval_path is empty (or set data.eval_path)")
  if source == "tfds":
    try:
      import tensorflow_datasets  # noqa: F401
    except ImportError:
      raise ConfigError("data.source", "'tfds' needs tensorflow-datasets: pip install 'lowrank-jax[tfds]'") from None
  tokenizer = config.data.tokenizer
  if tokenizer != "byte" and not os.path.isfile(os.path.expanduser(tokenizer)):
    raise ConfigError("data.tokenizer", f"file not found: {tokenizer!r}; give 'byte' or the path of a "
                      "SentencePiece .model (GaLore used the T5 C4 vocabulary)")
