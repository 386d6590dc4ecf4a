"""The registry of training methods: a name in `config.optimizer.name` -> an optimizer.

A method is what a config selects to train with. Most are pure Optax (AdamW,
GaLore, OSD); some also change the model (LoRA swaps linear kinds in through the
model's linear factory). Each method registers itself here once; the trainer
never branches on method names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lowrank_jax.train.errors import ConfigError

# build(optimizer_config, learning_rate_schedule) -> the method's transform. Clipping is
# chained in front by the trainer, so a method builds only its own update rule.
OptimizerBuilder = Callable[[ml_collections.ConfigDict, optax.Schedule], optax.GradientTransformation]
ConfigFn = Callable[[ml_collections.ConfigDict], Any]  # of the whole config


@dataclasses.dataclass(frozen=True)
class SplitHeads:
  """How a method trains with its heads spread over devices (`parallel.shard_heads`).

  The trainer then runs a per-device program (`shard_map` or `pmap`) over a `heads`
  axis: the leaves `head_mask` marks, and their optimizer state, are split along
  their heads axis (ndim - 3); every other leaf is replicated and all-reduced.
  """
  # Config key of the head count, and the count (a multiple of the device count).
  num_heads_key: str
  num_heads: ConfigFn
  # (optimizer config, schedule, axis name) -> the method's transform in that program.
  build_optimizer: Callable[[ml_collections.ConfigDict, optax.Schedule, str], optax.GradientTransformation]
  # params -> tree of bools: the leaves split over the axis.
  head_mask: Callable[[Any], Any]
  # Optional: raise ConfigError when this config cannot split its heads.
  validate: ConfigFn | None = None


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  build_optimizer: OptimizerBuilder
  description: str = ""
  # Optional: layer name -> linear kind the method needs in the model (e.g. LoRA).
  linear_kinds: ConfigFn | None = None
  # Optional: linear kind -> builder options (e.g. {'lora': {'rank': 128, 'alpha': 32}}).
  linear_options: ConfigFn | None = None
  # Optional: the learning-rate schedule, when the method needs its own (ReLoRA's jagged cosine).
  make_schedule: ConfigFn | None = None
  # Optional: steps of full-rank AdamW training (dense linears) before the method takes over.
  warm_start_steps: ConfigFn | None = None
  # Optional: check the method's own config keys; raise ConfigError.
  validate: ConfigFn | None = None
  # Optional: heads that can live on separate devices (LTE), for parallel.shard_heads.
  split_heads: SplitHeads | None = None


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
  if method.name in _METHODS:
    raise ValueError(f"method {method.name!r} is already registered")
  _METHODS[method.name] = method
  return method


def method_names() -> list[str]:
  return sorted(_METHODS)


def get_method(name: str) -> Method:
  if name not in _METHODS:
    raise ConfigError("optimizer.name", f"unknown method {name!r}", method_names())
  return _METHODS[name]


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: norms' scales (1-D) are not decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _check_positive_int(key: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ConfigError(key, f"must be a positive integer, got {value!r}")


def _check_choice(key: str, value: Any, choices) -> None:
  if value not in choices:
    raise ConfigError(key, f"unknown value {value!r}", choices)


def _layer_names(spec: str) -> list[str]:
  """A comma-separated list of layer names, e.g. "q,k,v,o"."""
  return [name.strip() for name in spec.split(",") if name.strip()]


def _check_layer_names(key: str, spec: str) -> None:
  from lowrank_jax import models  # the trainer may import models; methods stay light otherwise

  names = _layer_names(spec)
  if not names:
    raise ConfigError(key, "names no layer", models.LAYER_NAMES)
  for name in names:
    if name not in models.LAYER_NAMES:
      raise ConfigError(key, f"unknown layer name {name!r}", models.LAYER_NAMES)


def _build_adamw(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.adamw(
      learning_rate=schedule,
      b1=cfg.b1,
      b2=cfg.b2,
      eps=cfg.eps,
      weight_decay=cfg.weight_decay,
      mask=decay_mask,
  )


register_method(
    Method(
        name="adamw",
        build_optimizer=_build_adamw,
        description="full-rank AdamW (decoupled weight decay on matrices): the baseline",
    )
)


# --- LoRA and ReLoRA ---------------------------------------------------------------------------

def _lora_kinds(config: ml_collections.ConfigDict) -> dict[str, str]:
  return {name: "lora" for name in _layer_names(config.optimizer.lora.layers)}


def _lora_options(config: ml_collections.ConfigDict) -> dict[str, dict]:
  lora = config.optimizer.lora
  return {"lora": {"rank": lora.rank, "alpha": float(lora.alpha), "dropout": float(lora.dropout)}}


def _validate_lora(config: ml_collections.ConfigDict) -> None:
  lora = config.optimizer.lora
  _check_layer_names("optimizer.lora.layers", lora.layers)
  _check_positive_int("optimizer.lora.rank", lora.rank)
  if not isinstance(lora.alpha, (int, float)) or lora.alpha <= 0:
    raise ConfigError("optimizer.lora.alpha", f"must be > 0, got {lora.alpha!r}")
  if not isinstance(lora.dropout, (int, float)) or not 0 <= lora.dropout < 1:
    raise ConfigError("optimizer.lora.dropout", f"must be in [0, 1), got {lora.dropout!r}")
  if lora.dropout > 0:
    raise ConfigError("optimizer.lora.dropout", "> 0 is not supported by the trainer yet (the layer "
                      "supports it: lowrank_jax.nn.LoRALinear(dropout=...)); use 0")


def _build_lora(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  from lowrank_jax.optim.relora import freeze_adapted_kernels

  return freeze_adapted_kernels(_build_adamw(cfg, schedule))


register_method(
    Method(
        name="lora",
        build_optimizer=_build_lora,
        description="LoRA: frozen kernels, AdamW on the adapters and on the non-adapted leaves",
        linear_kinds=_lora_kinds,
        linear_options=_lora_options,
        validate=_validate_lora,
    )
)


def _relora_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Warmup + global cosine; restarts (drop to 0, linear ramp) at every merge, from the switch on."""
  from lowrank_jax.optim.schedules import jagged_cosine_schedule

  opt, relora = config.optimizer, config.optimizer.relora
  total = config.train.steps
  warmup = int(round(opt.warmup * total))
  jagged = jagged_cosine_schedule(
      peak_value=opt.lr, total_steps=total, warmup_steps=warmup, restart_every=relora.merge_every,
      restart_warmup_steps=relora.restart_warmup_steps, min_ratio=opt.min_lr_ratio)
  w = relora.warm_start_steps
  if w == 0:
    return jagged
  # During the full-rank warm start there are no merges, hence no restarts. warm_start_steps is a
  # multiple of merge_every, so the switch itself is a restart and so is every merge after it.
  smooth = jagged_cosine_schedule(
      peak_value=opt.lr, total_steps=total, warmup_steps=warmup, restart_every=total + 1,
      restart_warmup_steps=1, min_ratio=opt.min_lr_ratio)
  return lambda step: jnp.where(step < w, smooth(step), jagged(step))


def _validate_relora(config: ml_collections.ConfigDict) -> None:
  _validate_lora(config)
  r, steps = config.optimizer.relora, config.train.steps
  for key in ("merge_every", "restart_warmup_steps"):
    _check_positive_int(f"optimizer.relora.{key}", r[key])
  _check_choice("optimizer.relora.prune", r.prune, ("magnitude", "random", "reset"))
  if not isinstance(r.prune_ratio, (int, float)) or not 0 <= r.prune_ratio <= 1:
    raise ConfigError("optimizer.relora.prune_ratio", f"must be in [0, 1], got {r.prune_ratio!r}")
  if r.restart_warmup_steps >= r.merge_every:
    raise ConfigError("optimizer.relora.restart_warmup_steps",
                      f"must be < optimizer.relora.merge_every={r.merge_every}, got {r.restart_warmup_steps}")
  w = r.warm_start_steps
  if isinstance(w, bool) or not isinstance(w, int) or w < 0 or w >= steps:
    raise ConfigError("optimizer.relora.warm_start_steps", f"must be an integer in [0, train.steps={steps}), "
                      f"got {w!r}")
  if w % r.merge_every:
    raise ConfigError("optimizer.relora.warm_start_steps",
                      f"must be a multiple of optimizer.relora.merge_every={r.merge_every} (so restarts "
                      f"line up with merges), got {w}")
  if w and r.warm_start_from:
    raise ConfigError("optimizer.relora.warm_start_from", "give either warm_start_steps or warm_start_from")


def _build_relora(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  from lowrank_jax.optim.relora import relora

  return relora(
      _build_adamw(cfg, schedule),
      merge_every=cfg.relora.merge_every,
      scale=float(cfg.lora.alpha) / cfg.lora.rank,
      prune=cfg.relora.prune,
      prune_ratio=float(cfg.relora.prune_ratio),
      seed=int(cfg.relora.seed),
  )


register_method(
    Method(
        name="relora",
        build_optimizer=_build_relora,
        description="ReLoRA: LoRA merged into the kernels every merge_every steps, adapters re-drawn, "
                    "adapter moments pruned, jagged cosine schedule, optional full-rank warm start",
        linear_kinds=_lora_kinds,
        linear_options=_lora_options,
        make_schedule=_relora_schedule,
        warm_start_steps=lambda config: config.optimizer.relora.warm_start_steps,
        validate=_validate_relora,
    )
)


# --- GaLore and Online Subspace Descent -----------------------------------------------------

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


def _validate_galore(config: ml_collections.ConfigDict) -> None:
  g = config.optimizer.galore
  _check_positive_int("optimizer.galore.rank", g.rank)
  _check_positive_int("optimizer.galore.update_proj_gap", g.update_proj_gap)
  _check_choice("optimizer.galore.proj_type", g.proj_type, PROJ_TYPES)
  _check_choice("optimizer.galore.refresh", g.refresh, ("svd", "randomized"))
  _check_choice("optimizer.galore.moments", g.moments, ("keep", "reset", "rotate"))
  _check_choice("optimizer.galore.projector_dtype", g.projector_dtype, ("float32", "bfloat16"))
  if not isinstance(g.scale, (int, float)) or g.scale <= 0:
    raise ConfigError("optimizer.galore.scale", f"must be > 0, got {g.scale!r}")


def _adam(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)


def _build_galore(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  from lowrank_jax import optim

  g = cfg.galore
  return optim.galore(
      schedule, rank=g.rank, update_proj_gap=g.update_proj_gap, scale=float(g.scale), proj_type=g.proj_type,
      refresh=g.refresh, moments=g.moments, base=_adam(cfg), weight_decay=cfg.weight_decay,
      weight_decay_mask=decay_mask, projector_dtype=jnp.dtype(g.projector_dtype))


register_method(
    Method(
        name="galore",
        build_optimizer=_build_galore,
        description="GaLore: Adam on gradients projected to a rank-r subspace refreshed every "
                    "update_proj_gap steps (SVD or randomized)",
        validate=_validate_galore,
    )
)


def _validate_osd(config: ml_collections.ConfigDict) -> None:
  o = config.optimizer.osd
  _check_positive_int("optimizer.osd.rank", o.rank)
  _check_choice("optimizer.osd.proj_type", o.proj_type, PROJ_TYPES)
  _check_choice("optimizer.osd.projector_dtype", o.projector_dtype, ("float32", "bfloat16"))
  for key in ("scale", "projector_lr_ratio"):
    if not isinstance(o[key], (int, float)) or o[key] <= 0:
      raise ConfigError(f"optimizer.osd.{key}", f"must be > 0, got {o[key]!r}")
  if not isinstance(o.orthogonality, (int, float)) or o.orthogonality < 0:
    raise ConfigError("optimizer.osd.orthogonality", f"must be >= 0, got {o.orthogonality!r}")


def _build_osd(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
  from lowrank_jax import optim

  o = cfg.osd
  return optim.osd(
      schedule, rank=o.rank, proj_type=o.proj_type, projector_lr_ratio=float(o.projector_lr_ratio),
      orthogonality=float(o.orthogonality), base=_adam(cfg), scale=float(o.scale),
      weight_decay=cfg.weight_decay, weight_decay_mask=decay_mask, projector_dtype=jnp.dtype(o.projector_dtype))


register_method(
    Method(
        name="osd",
        build_optimizer=_build_osd,
        description="Online Subspace Descent: as GaLore, the projector updated every step by online PCA "
                    "(no SVD after the first step)",
        validate=_validate_osd,
    )
)


# --- LTE multi-head LoRA ----------------------------------------------------------------------

def _validate_mhlora(config: ml_collections.ConfigDict) -> None:
  m = config.optimizer.mhlora
  _check_layer_names("optimizer.mhlora.layers", m.layers)
  for key in ("num_heads", "rank", "merge_every"):
    _check_positive_int(f"optimizer.mhlora.{key}", m[key])
  if not isinstance(m.alpha, (int, float)) or m.alpha <= 0:
    raise ConfigError("optimizer.mhlora.alpha", f"must be > 0, got {m.alpha!r}")
  _check_choice("optimizer.mhlora.mode", m.mode, ("parallel", "mhlora"))
  micro = config.train.batch_size // config.train.grad_accum
  if m.mode == "parallel" and micro % m.num_heads:
    raise ConfigError("optimizer.mhlora.num_heads", f"parallel heads each train on their own share of the "
                      f"micro-batch, so it ({micro} sequences) must be divisible by num_heads={m.num_heads}")
  if m.mode == "parallel" and config.parallel.mode == "pmap" and not config.parallel.shard_heads:
    raise ConfigError("optimizer.mhlora.mode", "parallel heads under parallel.mode='pmap' would split each "
                      "device's share of the batch, not the global batch; set parallel.shard_heads=True "
                      "(each device trains its own heads), use parallel.mode='mesh', or mode 'mhlora'")


def _validate_mhlora_split(config: ml_collections.ConfigDict) -> None:
  if config.optimizer.mhlora.mode != "parallel":
    raise ConfigError("parallel.shard_heads", "needs optimizer.mhlora.mode='parallel' (sequential heads "
                      f"see every example, so they cannot live apart), got {config.optimizer.mhlora.mode!r}")


def _build_mhlora(cfg: ml_collections.ConfigDict, schedule: optax.Schedule,
                  axis_name: str | None = None) -> optax.GradientTransformation:
  from lowrank_jax.optim.lte import lte_merge

  m = cfg.mhlora
  return lte_merge(_build_adamw(cfg, schedule), merge_every=m.merge_every, scale=float(m.alpha) / m.rank,
                   axis_name=axis_name)


def _lte_head_mask(params: Any) -> Any:
  from lowrank_jax.optim.lte import lte_head_mask

  return lte_head_mask(params)


register_method(
    Method(
        name="mhlora",
        build_optimizer=_build_mhlora,
        description="LTE multi-head LoRA: N LoRA heads (each on its own share of the batch in parallel "
                    "mode) merged into the main weights every merge_every steps",
        linear_kinds=lambda config: {name: "mhlora" for name in _layer_names(config.optimizer.mhlora.layers)},
        linear_options=lambda config: {"mhlora": {
            "num_heads": config.optimizer.mhlora.num_heads, "rank": config.optimizer.mhlora.rank,
            "alpha": float(config.optimizer.mhlora.alpha), "mode": config.optimizer.mhlora.mode}},
        validate=_validate_mhlora,
        split_heads=SplitHeads(
            num_heads_key="optimizer.mhlora.num_heads",
            num_heads=lambda config: config.optimizer.mhlora.num_heads,
            build_optimizer=_build_mhlora,
            head_mask=_lte_head_mask,
            validate=_validate_mhlora_split,
        ),
    )
)
