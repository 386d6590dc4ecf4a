"""SGD with (optionally Nesterov) momentum: the full-rank memory floor.

One momentum buffer per parameter (none at `momentum = 0`), against AdamW's two: the
least optimizer state a full-rank method can keep, the floor the low-rank methods'
savings are measured against. Weight decay is decoupled and on matrices only, as
AdamW's; the schedule and clipping are the shared ones.
"""

from __future__ import annotations

import dataclasses

import optax

from lowrank_jax.train.settings import OptimizerSettings, boolean, in_range, setting
from lowrank_jax.train.methods.base import Method, decay_mask, register


@register
@dataclasses.dataclass(frozen=True)
class SGD(Method):
  NAME = "sgd"
  SECTION = "optimizer.sgd"
  DESCRIPTION = "SGD with momentum (decoupled weight decay on matrices): the full-rank memory floor"
  momentum: float = setting(0.9, in_range(0.0, 1.0))  # 0: plain SGD, no optimizer state at all
  nesterov: bool = setting(False, boolean)  # Nesterov momentum (no effect at momentum 0)

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    momentum = [optax.trace(decay=self.momentum, nesterov=self.nesterov)] if self.momentum > 0 else []
    return optax.chain(*momentum, optax.add_decayed_weights(opt.weight_decay, decay_mask),
                       optax.scale_by_learning_rate(schedule))
