"""Global-norm clipping for per-device programs whose leaves are partly split over devices.

Inside ``jax.shard_map`` or ``jax.pmap`` each device holds its own block of some
leaves (for example the LTE heads of :func:`lowrank_jax.optim.lte.lte_merge`
spread over a ``heads`` axis) and a full copy of the others. The global norm
of the whole gradient is then

  ``sqrt(sum_replicated ||g||^2 + psum_axis(sum_split ||g_local||^2))``

-- one scalar all-reduce. ``optax.clip_by_global_norm`` would see only the
local blocks, so every device would clip by a different factor and replicated
leaves would drift apart. :func:`clip_by_global_norm` computes the true norm
and otherwise behaves exactly as Optax's (same trigger, same formula), so with
``axis_name=None`` it *is* ``optax.clip_by_global_norm``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

__all__ = ['clip_by_global_norm', 'global_norm']

# A tree of bools (True: the leaf is split over the axis) shaped like the
# updates, or a function building it from the updates.
SplitMask = Any | Callable[[Any], Any]


def _mask_of(split: SplitMask, tree: Any) -> Any:
  if split is None:
    return jax.tree.map(lambda _: False, tree)
  return split(tree) if callable(split) else split


def global_norm(tree: Any, axis_name: str | None = None, split: SplitMask = None) -> jax.Array:
  """The L2 norm of every leaf of ``tree`` together, over all devices of ``axis_name``.

  Args:
    tree: the per-device tree (e.g. gradients).
    axis_name: the named axis (of ``shard_map`` / ``pmap``) the split leaves
      are split over; ``None`` outside such a program (plain ``optax.tree.norm``).
    split: which leaves hold only this device's block: a tree of bools like
      ``tree`` or a function ``tree -> tree of bools``. The others must be
      identical on every device (they are counted once).

  Returns:
    A float32 scalar, the same on every device.
  """
  if axis_name is None:
    return optax.tree.norm(tree)
  mask = _mask_of(split, tree)
  leaves = jax.tree.leaves(tree)
  flags = jax.tree.leaves(mask)
  if len(leaves) != len(flags):
    raise ValueError(f'global_norm: split mask has {len(flags)} leaves, the tree {len(leaves)}')
  sq = lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)))
  whole = sum((sq(x) for x, f in zip(leaves, flags) if not f), jnp.zeros((), jnp.float32))
  local = sum((sq(x) for x, f in zip(leaves, flags) if f), jnp.zeros((), jnp.float32))
  return jnp.sqrt(whole + jax.lax.psum(local, axis_name))


def clip_by_global_norm(max_norm: float, *, axis_name: str | None = None,
                        split: SplitMask = None) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` for leaves split over a named device axis.

  Updates whose global norm (:func:`global_norm`, over every device of
  ``axis_name``) is at least ``max_norm`` are scaled by ``max_norm / norm``,
  by the same factor on every device.

  Args:
    max_norm: the maximum global norm (> 0).
    axis_name: the ``shard_map`` / ``pmap`` axis the split leaves are split
      over; ``None`` gives Optax's transform.
    split: tree of bools or function ``updates -> tree of bools``: the leaves
      holding only this device's block.

  Example (LTE heads spread over a ``heads`` axis)::

    from lowrank_jax.optim import clip_by_global_norm, lte_head_mask, lte_merge

    tx = optax.chain(
        clip_by_global_norm(1.0, axis_name='heads', split=lte_head_mask),
        lte_merge(optax.adamw(1e-3), 10, scale=4.0, axis_name='heads'))
  """
  if not max_norm > 0:
    raise ValueError(f'clip_by_global_norm: max_norm must be > 0, got {max_norm!r}')
  if axis_name is None:
    return optax.clip_by_global_norm(max_norm)

  def update_fn(updates, state, params=None):
    del params
    norm = global_norm(updates, axis_name, split)
    trigger = norm < max_norm
    clip = lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)
