"""The run's configuration, resolved once: a command line's ConfigDict -> a checked `RunConfig`.

`resolve(config)` reads an `ml_collections.ConfigDict` (a `configs/*.py` file plus
`--config.KEY=VALUE` overrides) into a `RunConfig` (`settings.py`): every section's fields
checked on the way in, the chosen method's own settings (`lowrank_jax.train.methods`), and the
checks across sections (data against model, VeLoRA and ranks against the model's layer shapes,
the batch against the devices). A bad value is one `ConfigError` naming its dotted key and the
valid choices, before anything is compiled. Everything below takes the `RunConfig`, never the
ConfigDict.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from lowrank_jax import models
from lowrank_jax.train import methods
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.model import linear_kinds, linear_shapes, model_config, pissa_init
from lowrank_jax.train.settings import (DataSettings, ModelSettings, OptimizerSettings, ParallelSettings, RunConfig,
                                        TrainSettings, _node, defaults, non_negative_int, read)
from lowrank_jax.train.task import TASKS, task_for

def default_config() -> ml_collections.ConfigDict:
  """Every key with its default: the settings' sections and each registered method's settings."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # model init, data order and every other random draw
  for cls in (ModelSettings, DataSettings, TrainSettings, ParallelSettings, OptimizerSettings):
    config[cls.SECTION] = defaults(cls)
  for cls in methods.registered():
    if cls.SECTION and cls.SECTION not in config.optimizer:
      config.optimizer[cls.SECTION.split(".")[-1]] = defaults(cls)
  return config


def with_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with each dotted key ('train.grad_accum') set to its value."""
  config = ml_collections.ConfigDict(config.to_dict())  # (a copy; ConfigDict's copy() keeps its locks)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def resolve(config: ml_collections.ConfigDict | RunConfig, *, num_devices: int | None = None,
            process_count: int | None = None, platform: str | None = None) -> RunConfig:
  """Check `config` and return it as a `RunConfig` (a `RunConfig` is returned as it is, re-checked
  against the device count and platform). Raises `ConfigError` for the first value that cannot work.

  `platform` ('cpu', 'gpu', 'tpu'): what the run compiles for (a memory target's); default: this
  host's backend. It decides `model.attention=auto` and which kernels can run.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  run = config if isinstance(config, RunConfig) else _read_run(config)
  _check_devices(run, num_devices, process_count)
  kernel = attention_kernel(run, platform or jax.default_backend(), num_devices)
  return run if kernel == run.attention else run.replace(attention=kernel)


CUDNN_HEAD_DIMS = range(8, 129, 8)  # the head widths `auto` hands to cuDNN's fused attention


def attention_kernel(run: RunConfig, platform: str, num_devices: int) -> str:
  """`model.attention` for `platform`: the kernel the model is built with, or a `ConfigError` naming
  what the chosen kernel needs."""
  choice, m = run.model.attention, run.model
  if choice == "xla" or (choice == "auto" and platform != "gpu"):
    return "xla"
  config = model_config(run, m.vocab_multiple)  # (any vocabulary: the head width and dtype are asked)
  if choice == "auto":
    # Packed rows with segment ids (instruction data) reach cuDNN as a [T, T] bias: not yet checked on a
    # GPU (tests/test_attention.py's cuDNN test), so `auto` leaves them on XLA; `cudnn` takes them.
    example = run.task.example(run)
    packed = isinstance(example, dict) and "segment_ids" in example
    fused = config.dtype == "bfloat16" and config.head_dim in CUDNN_HEAD_DIMS and not packed
    return "cudnn" if fused else "xla"
  needs = {"cudnn": "gpu", "splash": "tpu"}[choice]
  if platform != needs:
    raise ConfigError("model.attention", f"{choice} needs a {needs.upper()}: this run compiles for {platform}",
                      ["auto", "xla"] + (["cudnn"] if platform == "gpu" else ["splash"] if platform == "tpu" else []))
  if choice == "cudnn" and config.dtype != "bfloat16":
    raise ConfigError("model.attention", f"cudnn computes in bfloat16: set model.dtype=bfloat16 (it is "
                      f"{config.dtype}), or use xla or auto", ["auto", "xla"])
  if choice == "splash":
    if run.task.model_task != "language_model":
      raise ConfigError("model.attention", f"splash is built for the causal language models; "
                        f"{m.resolved_family} takes xla or auto", ["auto", "xla"])
    if run.data.seq_len % models.SPLASH_BLOCK:
      raise ConfigError("model.attention", f"splash tiles the sequence in blocks of "
                        f"{models.SPLASH_BLOCK} tokens: data.seq_len={run.data.seq_len} is not a "
                        "multiple", ["auto", "xla"])
    if num_devices > 1 and run.parallel.mode != "pmap":
      raise ConfigError("model.attention", f"splash runs on each device's own rows: over {num_devices} devices "
                        "it needs parallel.mode=pmap (the mesh program would gather the batch for it)",
                        ["auto", "xla"])
  return choice


def _read_run(config: ml_collections.ConfigDict) -> RunConfig:
  """Every section read and checked, then the checks across sections (in the order a user meets them)."""
  seed = non_negative_int("seed", _node(config, "seed"))
  if seed >= 2**31 - 1:  # JAX keys and grain take 32-bit seeds (and the model uses seed + 1)
    raise ConfigError("seed", f"must be an integer in [0, {2**31 - 2}], got {seed}")
  model, parallel, train = (read(cls, config) for cls in (ModelSettings, ParallelSettings, TrainSettings))
  name = _node(config, "optimizer.name")  # (the registry is above the settings: checked here, first of its section)
  if name not in methods.method_names():
    raise ConfigError("optimizer.name", f"unknown method {name!r}", methods.method_names())
  optimizer, data = read(OptimizerSettings, config), read(DataSettings, config)
  run = RunConfig(seed, model, data, train, parallel, optimizer, read(methods.get_method(optimizer.name), config),
                  task_for(data.source))
  run.method.check_run(run)
  _check_task(run)
  _check_adapters(run)
  run = run.replace(linear_shapes=_linear_shapes_if_needed(run))
  _check_velora(run)
  _check_rank(run)
  return run


def _linear_shapes_if_needed(run: RunConfig) -> dict[str, tuple[int, int]] | None:
  """The model's linear shapes, built once here when a check needs them (VeLoRA's layers, a rank)."""
  return linear_shapes(run) if run.model.velora.sizes or _rank_owner(run) is not None else None


def validate(config: ml_collections.ConfigDict | RunConfig, *, num_devices: int = 1,
             process_count: int = 1) -> None:
  """Raise `ConfigError` for the first value of `config` that cannot work."""
  resolve(config, num_devices=num_devices, process_count=process_count)


def _check_task(run: RunConfig) -> None:
  """The model family learns the data's task (the ViT images, the decoders tokens)."""
  family = run.model.resolved_family
  learns = models.get_family(family).task
  if learns != run.task.model_task:
    model = f"model.init_from={run.model.init_from!r} (a {family} checkpoint)" if run.model.init_from else \
        f"model.family={family!r}"
    raise ConfigError("data.source", f"{run.data.source!r} is data for {run.task.name}; {model} learns {learns}",
                      [s for t in TASKS if t.model_task == learns for s in t.sources])


def _check_adapters(run: RunConfig) -> None:
  """The settings that act on the LoRA adapters and their frozen base need a method that has them."""
  m = run.model
  lora_layers = [name for name, kind in linear_kinds(run).items() if kind == "lora"]
  if m.base_bits != 16:
    if m.weight_bits != 16:
      raise ConfigError("model.base_bits", f"{m.base_bits} cannot be combined with model.weight_bits="
                        f"{m.weight_bits}: base_bits stores the frozen kernels under LoRA adapters, weight_bits the "
                        "trained ones; choose one")
    if run.optimizer.name != "lora" or not lora_layers:
      raise ConfigError("model.base_bits", f"{m.base_bits} quantizes the frozen base kernels under LoRA adapters, "
                        f"which optimizer.name={run.optimizer.name!r} does not have" +
                        (" (it merges into them)" if run.optimizer.name in ("relora", "mhlora") else "") +
                        "; use optimizer.name='lora', or model.weight_bits=8 to store trained weights in int8")
  for key in ("export_adapter_to", "init_adapter_from"):
    if getattr(m, key) and (run.optimizer.name != "lora" or not lora_layers):
      raise ConfigError(f"model.{key}", "needs LoRA adapters over a fixed base (optimizer.name='lora'); "
                        f"optimizer.name={run.optimizer.name!r} " +
                        ("merges them into the kernels: export the merged model with model.export_to"
                         if run.optimizer.name in ("relora", "mhlora") else "has none"))
  pissa = pissa_init(run)
  if m.init_adapter_from and pissa:
    raise ConfigError("model.init_adapter_from", "is an adapter to continue from; optimizer.lora.init='pissa' "
                      "would re-initialise it: use optimizer.lora.init='kaiming'")
  if m.export_adapter_to and pissa:
    raise ConfigError("model.export_adapter_to", "PiSSA (optimizer.lora.init='pissa') trains adapters over the "
                      "residual it leaves of each kernel, not over the checkpoint's weights, so its adapter does not "
                      "apply to the base model; export the merged model with model.export_to")


def _check_velora(run: RunConfig) -> None:
  sizes = run.model.velora.sizes
  if not sizes:
    return
  widths = {name: shape[0] for name, shape in run.linear_shapes.items()}
  kinds = linear_kinds(run)
  for name, size in sizes.items():
    if name not in widths or name == "head":
      raise ConfigError("model.velora.layers", f"unknown layer name {name!r} for {run.model.resolved_family}",
                        [n for n in widths if n != "head"])
    if kinds.get(name, "dense") not in ("dense", "lora"):
      raise ConfigError("model.velora.layers", f"layer {name!r} is a {kinds[name]!r} linear; "
                        "VeLoRA applies to dense and lora linears")
    width = widths[name]
    if size <= 0 or width % size:
      raise ConfigError("model.velora.layers", f"sub-token size {size} of layer {name!r} must divide its input "
                        f"width {width}", [d for d in range(1, min(width, 256) + 1) if width % d == 0])


def _rank_owner(run: RunConfig) -> Any:
  """The settings holding the method's rank (the method's own, or ReLoRA's LoRA), or None."""
  method = run.method
  owner = method if hasattr(method, "rank") else getattr(method, "lora", None)
  rank = getattr(owner, "rank", None)
  if owner is None or isinstance(rank, bool) or not isinstance(rank, int) or not owner.SECTION:
    return None
  return owner


def rank_sides(run: RunConfig) -> tuple[str, int, dict[str, int], bool] | None:
  """What a method's rank applies to: (its config key, the rank, {layer: the matrix's smaller side},
  whether the method adapts the model's layers (LoRA kinds) rather than projecting gradients).

  None for a method without a rank. Head and embeddings are left out: no method applies its
  rank to them. The shapes are the ones `resolve` read from the model.
  """
  owner = _rank_owner(run)
  if owner is None or run.linear_shapes is None:
    return None
  linears = run.method.linears()
  names = list(linears.kinds) if linears.kinds else None  # model-side: the adapted layers
  sides = {name: min(shape) for name, shape in run.linear_shapes.items()
           if name != "head" and (names is None or name in names)}
  return f"{owner.SECTION}.rank", owner.rank, sides, names is not None


def _check_rank(run: RunConfig) -> None:
  """A method's rank against the matrices it applies to: larger than the smaller side of every one
  of them, the method is full rank (LoRA's adapters outgrow the matrices, GaLore projects none)."""
  found = rank_sides(run)
  if found is None:
    return
  key, rank, sides, _ = found
  if sides and rank > max(sides.values()):
    widest = max(sides, key=sides.get)
    raise ConfigError(key, f"{rank} is larger than every matrix it applies to (the largest smaller side is "
                      f"{sides[widest]}, layer {widest!r} of {run.model.name}); use a rank in 1..{sides[widest]}")


def full_rank_layers(run: RunConfig) -> str | None:
  """A warning naming the layers where the rank exceeds the matrix's smaller side, or None.

  Some but not all (every one is an error, `_check_rank`): those layers run full rank. The
  subspace methods (GaLore, OSD, APOLLO, Fira) do not project such a matrix (the default
  projection mask): it gets plain Adam with a full-size state. LoRA's adapters there have
  rank > the smaller side: no constraint on the update, more parameters than a low rank needs.
  """
  found = rank_sides(run)
  if found is None:
    return None
  key, rank, sides, adapted = found
  over = {name: side for name, side in sides.items() if side < rank}
  if not over:
    return None
  layers = ", ".join(f"{name} ({side})" for name, side in over.items())
  effect = ("their adapters are not low rank (rank above the smaller side: more parameters, no rank constraint)"
            if adapted else "they are not projected: plain Adam on the full matrix, with a full-size optimizer state")
  return (f"{key}={rank} is larger than the smaller side of layer(s) {layers} of {run.model.name}, in every "
          f"block: {effect}; the other {len(sides) - len(over)} layer kind(s) use rank {rank}; use a rank <= "
          f"{min(over.values())} for all of them")


def _check_devices(run: RunConfig, num_devices: int, process_count: int) -> None:
  batch = run.train.batch_size
  if batch % process_count:
    raise ConfigError("train.batch_size", f"must be divisible by the number of processes ({process_count}), got {batch}")
  micro = run.train.micro_batch
  if micro % num_devices:
    raise ConfigError("train.batch_size", f"the micro-batch train.batch_size / train.grad_accum = {micro} must be "
                      f"divisible by the number of devices ({num_devices}) for data parallelism")
  if not run.parallel.shard_heads:
    return
  heads = run.method.heads()
  if heads is None:
    raise ConfigError("parallel.shard_heads", f"method {run.optimizer.name!r} has no heads to spread over devices",
                      [m.NAME for m in methods.registered() if m().heads() is not None])
  if run.parallel.mode == "pmap" and process_count > 1:
    raise ConfigError("parallel.mode", "parallel.shard_heads under 'pmap' runs on one host; use 'mesh' "
                      "(jit + shard_map) for several hosts")
  if heads.count % num_devices:
    raise ConfigError(heads.count_key, f"with parallel.shard_heads every device holds the same number of "
                      f"heads, so {heads.count} must be a multiple of the device count ({num_devices})")
