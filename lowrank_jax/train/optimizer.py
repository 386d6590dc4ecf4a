"""config.optimizer -> learning-rate schedule and the full Optax transform."""

from __future__ import annotations

import ml_collections
import optax

from lowrank_jax.optim import clipping
from lowrank_jax.train import methods, parallel


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay to `min_lr_ratio * lr` (the GaLore recipe), or constant."""
  if opt.schedule == "constant":
    return optax.constant_schedule(opt.lr)
  warmup_steps = int(round(opt.warmup * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt.lr,
      warmup_steps=warmup_steps,
      # optax counts decay_steps from step 0, warmup included.
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=opt.lr * opt.min_lr_ratio,
  )


WARM_START, MAIN = "warm_start", "main"


def split_heads(config: ml_collections.ConfigDict, phase: str = MAIN) -> methods.SplitHeads | None:
  """The method's heads-over-devices recipe when this run spreads heads over devices, else None."""
  if phase != MAIN or not config.parallel.shard_heads:
    return None
  return methods.get_method(config.optimizer.name).split_heads


def build_optimizer(config: ml_collections.ConfigDict, phase: str = MAIN
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Gradient clipping (if any) chained in front of the registered method's transform.

  In a method's full-rank warm-start phase the transform is AdamW, on the same
  schedule as the method (one schedule over the whole run). With heads spread over
  devices (`parallel.shard_heads`) both are their per-device versions over the
  `heads` axis: the clipping norm and the merges sum over every device's heads.
  """
  opt = config.optimizer
  method = methods.get_method(opt.name)
  schedule = method.make_schedule(config) if method.make_schedule else make_schedule(opt, config.train.steps)
  split = split_heads(config, phase)
  if split is not None:
    tx = split.build_optimizer(opt, schedule, parallel.HEADS_AXIS)
    if opt.grad_clip > 0:
      clip = clipping.clip_by_global_norm(opt.grad_clip, axis_name=parallel.HEADS_AXIS, split=split.head_mask)
      tx = optax.chain(clip, tx)
    return tx, schedule
  builder = methods.get_method("adamw") if phase == WARM_START else method
  tx = builder.build_optimizer(opt, schedule)
  if opt.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx, schedule
