"""The run's learning-rate schedule and full Optax transform: clipping, the method's update, the lr groups."""

from __future__ import annotations

import optax

from lowrank_jax.optim import clipping, groups, quantize
from lowrank_jax.train import parallel
from lowrank_jax.train.settings import RunConfig
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.methods import Heads, make_schedule

__all__ = ["build_optimizer", "heads_of", "make_schedule"]


def heads_of(run: RunConfig) -> Heads | None:
  """The method's heads when this run spreads them over devices (`parallel.shard_heads`), else None."""
  return run.method.heads() if run.parallel.shard_heads else None


def build_optimizer(run: RunConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Gradient clipping (if any, `optimizer.clip_mode`) chained in front of the method's transform,
  whose updates the parameter groups then scale (`optimizer.embed_lr_scale`, `other_lr_scale`),
  and the schedule.

  With heads spread over devices both are their per-device versions over the `heads`
  axis: the clipping norm and the merges sum over every device's heads.
  """
  opt = run.optimizer
  schedule = run.method.schedule(run)
  heads = heads_of(run)
  if heads is not None and opt.state_bits != 32:
    raise ConfigError("optimizer.state_bits", "8-bit states are not supported with parallel.shard_heads "
                      "(block scales are not split over the heads axis)", [32])
  if heads is None:
    tx = run.method.build(opt, schedule)
    clip = clipping.clip_gradients(opt.clip_mode, opt.grad_clip) if opt.grad_clip > 0 else None
  else:
    tx = heads.build(opt, schedule, parallel.HEADS_AXIS)
    clip = clipping.clip_gradients(opt.clip_mode, opt.grad_clip, axis_name=parallel.HEADS_AXIS,
                                   split=heads.mask) if opt.grad_clip > 0 else None
  if opt.state_bits != 32:
    tx = quantize.quantize_state(tx, bits=opt.state_bits)
  tx = groups.with_groups(tx, embed_lr_scale=opt.embed_lr_scale, other_lr_scale=opt.other_lr_scale)
  return (tx if clip is None else optax.chain(clip, tx)), schedule
