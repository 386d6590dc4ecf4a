"""Full-rank AdamW: the baseline every method is compared against."""

from __future__ import annotations

import dataclasses

import optax

from lowrank_jax.train.settings import OptimizerSettings
from lowrank_jax.train.methods.base import Method, build_adamw, register


@register
@dataclasses.dataclass(frozen=True)
class AdamW(Method):
  NAME = "adamw"
  DESCRIPTION = "full-rank AdamW (decoupled weight decay on matrices): the baseline"

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    return build_adamw(opt, schedule)
