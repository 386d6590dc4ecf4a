"""config.optimizer -> learning-rate schedule and the full Optax transform."""

from __future__ import annotations

import ml_collections
import optax

from lowrank_jax.train import methods


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


def build_optimizer(config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Gradient clipping (if any) chained in front of the registered method's transform."""
  opt = config.optimizer
  schedule = make_schedule(opt, config.train.steps)
  method = methods.get_method(opt.name)
  tx = method.build_optimizer(opt, schedule)
  if opt.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx, schedule
