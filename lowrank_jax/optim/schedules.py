"""Learning-rate schedules (Optax schedules: ``step -> value``, jit-able)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

__all__ = ['jagged_cosine_schedule']


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or int(value) != value or value < minimum:
    raise ValueError(f'jagged_cosine_schedule: {name} must be an integer >= {minimum}, '
                     f'got {value!r}')
  return int(value)


def jagged_cosine_schedule(
    peak_value: float,
    total_steps: int,
    warmup_steps: int,
    restart_every: int,
    restart_warmup_steps: int,
    min_ratio: float = 0.1,
) -> optax.Schedule:
  """ReLoRA's "jagged" cosine schedule (cosine with restart warmups).

  With ``w = warmup_steps``, ``T = total_steps``, ``R = restart_every``,
  ``r = restart_warmup_steps`` and the global cosine

  ``cos(t) = peak * (min_ratio + (1 - min_ratio) * (1 + cos(pi * p)) / 2)``,
  ``p = clip((t - w) / (T - w), 0, 1)``,

  the value at step ``t`` is:

  * ``peak * t / w`` for ``t < w`` (linear warmup from 0);
  * ``cos(t) * (t - k R) / r`` for ``k R <= t < k R + r``, ``k >= 1`` (a drop to
    0 at each restart and a linear ramp back to the global cosine);
  * ``cos(t)`` otherwise (it reaches ``min_ratio * peak`` at ``T`` and stays
    there after).

  Restarts are counted from step 0, as in the official ReLoRA code
  (``get_cosine_schedule_with_multiple_warmups``): they are at ``R, 2R, ...``
  whatever ``w``; a restart inside the initial warmup is ignored (the warmup
  wins). With ``relora(merge_every=R)`` the merges happen on updates ``R, 2R,
  ...`` (counts ``R-1, 2R-1, ...`` before the update), so the first update
  after each merge uses the value at ``k R``, i.e. 0, and the following ones
  ramp up. Unlike the official code, which ramps to the cosine value at the
  restart step, the ramp here multiplies the cosine at the current step (the
  two differ by less than the cosine's change over ``r`` steps).

  Args:
    peak_value: the peak learning rate (>= 0).
    total_steps: ``T`` (>= 1), where the cosine reaches its minimum.
    warmup_steps: ``w`` in ``[0, T)``.
    restart_every: ``R`` (>= 1).
    restart_warmup_steps: ``r`` in ``[0, R]``; 0 disables the ramps.
    min_ratio: final value as a fraction of ``peak_value``, in ``[0, 1]``.

  Returns:
    ``schedule(step) -> float32 scalar``; ``step`` may be a traced integer.
  """
  if isinstance(peak_value, bool) or not math.isfinite(peak_value) or peak_value < 0:
    raise ValueError(f'jagged_cosine_schedule: peak_value must be >= 0, got {peak_value!r}')
  total_steps = _check_int('total_steps', total_steps, 1)
  warmup_steps = _check_int('warmup_steps', warmup_steps, 0)
  restart_every = _check_int('restart_every', restart_every, 1)
  restart_warmup_steps = _check_int('restart_warmup_steps', restart_warmup_steps, 0)
  if warmup_steps >= total_steps:
    raise ValueError(f'jagged_cosine_schedule: warmup_steps ({warmup_steps}) must be < '
                     f'total_steps ({total_steps})')
  if restart_warmup_steps > restart_every:
    raise ValueError(
        f'jagged_cosine_schedule: restart_warmup_steps ({restart_warmup_steps}) must be <= '
        f'restart_every ({restart_every})')
  if not 0.0 <= min_ratio <= 1.0:
    raise ValueError(f'jagged_cosine_schedule: min_ratio must be in [0, 1], got {min_ratio!r}')
  peak = float(peak_value)
  min_ratio = float(min_ratio)
  decay_steps = total_steps - warmup_steps

  def schedule(step):
    step_i = jnp.asarray(step).astype(jnp.int32)
    t = step_i.astype(jnp.float32)
    progress = jnp.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)
    cosine = peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))
    warmup = peak * t / max(1, warmup_steps)
    since_restart = step_i % restart_every
    in_ramp = (step_i >= restart_every) & (since_restart < restart_warmup_steps)
    ramp = cosine * since_restart.astype(jnp.float32) / max(1, restart_warmup_steps)
    value = jnp.where(in_ramp, ramp, cosine)
    return jnp.where(step_i < warmup_steps, warmup, value).astype(jnp.float32)

  return schedule
