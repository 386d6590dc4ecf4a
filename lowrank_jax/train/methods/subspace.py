"""The subspace methods: GaLore, Online Subspace Descent, APOLLO, APOLLO-Mini and Fira.

All run Adam on gradients projected to rank-r subspaces (`lowrank_jax.optim.subspace`). The
trainer builds those whose projector refresh is a decomposition (GaLore, OSD, Fira) with
`split_refresh=True`: the refresh runs as its own program, only at refresh steps.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

from lowrank_jax.models import DTYPES
from lowrank_jax.optim import apollo, apollo_mini, fira, galore, osd
from lowrank_jax.optim.apollo import MINI_SCALE, PROJECTORS, SCALINGS
from lowrank_jax.optim.galore import MOMENT_MODES, REFRESH_MODES
from lowrank_jax.optim.projection import PROJ_TYPES
from lowrank_jax.train.settings import (OptimizerSettings, non_negative, non_negative_int, one_of, positive,
                                      positive_int, setting)
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.methods.base import Method, adam_moments, decay_mask, register


@register
@dataclasses.dataclass(frozen=True)
class GaLore(Method):
  NAME = "galore"
  SECTION = "optimizer.galore"
  DESCRIPTION = ("GaLore: Adam on gradients projected to a rank-r subspace refreshed every update_proj_gap "
                 "steps (SVD or randomized)")
  rank: int = setting(128, positive_int)  # subspace rank; kernels with a side smaller than it get plain Adam
  update_proj_gap: int = setting(200, positive_int)  # steps between projector refreshes
  scale: float = setting(0.25, positive)  # alpha: the projected-back update is scaled by it
  proj_type: str = setting("std", one_of(PROJ_TYPES))  # std, reverse_std, left, right, full
  refresh: str = setting("svd", one_of(REFRESH_MODES))  # svd (exact, the paper) or randomized (warm-started)
  moments: str = setting("keep", one_of(MOMENT_MODES))  # at a refresh: keep (the paper), reset or rotate
  # Projector (and so low-rank moment) dtype: float32, or bfloat16 as the official code in bf16
  # training (which casts the projector to the weights' dtype).
  projector_dtype: str = setting("float32", one_of(DTYPES))

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    return galore(schedule, rank=self.rank, update_proj_gap=self.update_proj_gap, scale=float(self.scale),
                  proj_type=self.proj_type, refresh=self.refresh, moments=self.moments, base_optimizer=adam_moments(opt),
                  weight_decay=opt.weight_decay, weight_decay_mask=decay_mask,
                  projector_dtype=jnp.dtype(self.projector_dtype), split_refresh=True)


@register
@dataclasses.dataclass(frozen=True)
class OSD(Method):
  NAME = "osd"
  SECTION = "optimizer.osd"
  DESCRIPTION = ("Online Subspace Descent: as GaLore, the projector updated every step by online PCA "
                 "(no SVD after the first step)")
  rank: int = setting(128, positive_int)  # rank of the projector P, as galore.rank
  proj_type: str = setting("std", one_of(PROJ_TYPES))  # the side compressed (std: the smaller dimension; full: both)
  scale: float = setting(0.25, positive)  # alpha: the projected-back update is scaled by it
  projector_lr_ratio: float = setting(0.5, positive)  # projector LR = ratio x the weight LR schedule
  orthogonality: float = setting(0.0, non_negative)  # lambda of ||P^T P - I||^2 (the paper's; 0 as the code)
  projector_dtype: str = setting("float32", one_of(DTYPES))  # P (and its optimizer's updates): float32 or bfloat16

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    return osd(schedule, rank=self.rank, proj_type=self.proj_type, projector_lr_ratio=float(self.projector_lr_ratio),
               orthogonality=float(self.orthogonality), base_optimizer=adam_moments(opt), scale=float(self.scale),
               weight_decay=opt.weight_decay, weight_decay_mask=decay_mask,
               projector_dtype=jnp.dtype(self.projector_dtype), split_refresh=True)


def _limit(key, value):
  """The norm-growth limiter's gamma: >= 1, or 0 for no limiter."""
  value = non_negative(key, value)
  if 0 < value < 1:
    raise ConfigError(key, f"must be >= 1 (the allowed growth of the update norm per step) or 0 (off), got {value!r}")
  return value


def _gamma(value: float) -> float | None:
  return float(value) if value else None


@register
@dataclasses.dataclass(frozen=True)
class APOLLO(Method):
  NAME = "apollo"
  SECTION = "optimizer.apollo"
  DESCRIPTION = ("APOLLO: the raw gradient scaled per channel by Adam's norm ratio in a random rank-r space "
                 "re-drawn every update_proj_gap steps (no projector stored)")
  rank: int = setting(128, positive_int)  # the papers' d/4
  update_proj_gap: int = setting(200, positive_int)  # steps between re-draws of the random projector
  scale: float = setting(1.0, positive)  # alpha: the scaled gradient is multiplied by it
  scaling: str = setting("channel", one_of(SCALINGS))  # channel (APOLLO) or tensor (APOLLO-Mini)
  norm_growth_limit: float = setting(1.01, _limit)  # gamma: the update norm grows at most this much a step; 0: off
  proj_type: str = setting("std", one_of(PROJ_TYPES))  # side compressed (std: the smaller); channel scaling: not full
  projector: str = setting("random", one_of(PROJECTORS))  # random (the paper), or GaLore's svd / randomized
  seed: int = setting(0, non_negative_int)  # seed of the random projectors (kept in the optimizer state)

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    return apollo(schedule, rank=self.rank, update_proj_gap=self.update_proj_gap, scale=float(self.scale),
                  scaling=self.scaling, norm_growth_limit=_gamma(self.norm_growth_limit), proj_type=self.proj_type,
                  projector=self.projector, seed=self.seed, base_optimizer=adam_moments(opt),
                  weight_decay=opt.weight_decay, weight_decay_mask=decay_mask)


@register
@dataclasses.dataclass(frozen=True)
class APOLLOMini(Method):
  NAME = "apollo_mini"
  SECTION = "optimizer.apollo_mini"
  DESCRIPTION = "APOLLO-Mini: APOLLO with a rank-1 random space and one scale per tensor (about SGD's memory)"
  rank: int = setting(1, positive_int)  # rank of the random space (1: the paper's)
  update_proj_gap: int = setting(200, positive_int)  # steps between re-draws of the random projector
  scale: float = setting(MINI_SCALE, positive)  # alpha = sqrt(128), the paper's
  norm_growth_limit: float = setting(1.01, _limit)  # gamma: the update norm grows at most this much a step; 0: off
  seed: int = setting(0, non_negative_int)  # seed of the random projectors (kept in the optimizer state)

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    return apollo_mini(schedule, rank=self.rank, update_proj_gap=self.update_proj_gap, scale=float(self.scale),
                       norm_growth_limit=_gamma(self.norm_growth_limit), seed=self.seed,
                       base_optimizer=adam_moments(opt), weight_decay=opt.weight_decay, weight_decay_mask=decay_mask)


@register
@dataclasses.dataclass(frozen=True)
class Fira(Method):
  NAME = "fira"
  SECTION = "optimizer.fira"
  DESCRIPTION = ("Fira: GaLore's update plus the gradient outside the subspace, scaled by Adam's norm ratio, "
                 "with a norm-growth limiter")
  rank: int = setting(128, positive_int)  # subspace rank, as galore.rank
  update_proj_gap: int = setting(200, positive_int)  # steps between projector refreshes
  scale: float = setting(0.25, positive)  # alpha of the low-rank term, as GaLore's
  scaling: str = setting("channel", one_of(SCALINGS))  # the residual's factor: per channel (the paper) or tensor
  norm_growth_limit: float = setting(1.01, _limit)  # gamma: the residual's norm grows at most this much a step; 0: off
  proj_type: str = setting("std", one_of(PROJ_TYPES))  # side compressed (std: the smaller); channel scaling: not full
  refresh: str = setting("svd", one_of(REFRESH_MODES))  # svd (exact) or randomized (warm-started), as galore's
  projector_dtype: str = setting("float32", one_of(DTYPES))  # as galore.projector_dtype

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    return fira(schedule, rank=self.rank, update_proj_gap=self.update_proj_gap, scale=float(self.scale),
                scaling=self.scaling, norm_growth_limit=_gamma(self.norm_growth_limit), proj_type=self.proj_type,
                refresh=self.refresh, base_optimizer=adam_moments(opt), weight_decay=opt.weight_decay,
                weight_decay_mask=decay_mask, projector_dtype=jnp.dtype(self.projector_dtype), split_refresh=True)
