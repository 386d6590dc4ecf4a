"""The registry of training methods: a name in `config.optimizer.name` -> an optimizer.

A method is what a config selects to train with. Most are pure Optax (AdamW,
GaLore, OSD); some also change the model (LoRA swaps linear kinds in through the
model's linear factory). Each method registers itself here once; the trainer
never branches on method names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections
import optax

from lowrank_jax.train.errors import ConfigError

# build(optimizer_config, learning_rate_schedule) -> the method's transform. Clipping is
# chained in front by the trainer, so a method builds only its own update rule.
OptimizerBuilder = Callable[[ml_collections.ConfigDict, optax.Schedule], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  build_optimizer: OptimizerBuilder
  description: str = ""
  # Optional: layer name -> linear kind the method needs in the model (e.g. LoRA).
  linear_kinds: Callable[[ml_collections.ConfigDict], Mapping[str, str]] | None = None
  # Optional: check the method's own config keys; raise ConfigError.
  validate: Callable[[ml_collections.ConfigDict], None] | None = None


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
  import jax

  return jax.tree.map(lambda p: p.ndim >= 2, params)


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
