"""Gradient clipping that keeps the per-layer memory release, and over split device axes.

Three ways to bound a step (``CLIP_MODES``; :func:`clip_gradients` picks one):

* ``global``: :func:`clip_by_global_norm`. Scale every leaf by ``max_norm / ||g||``
  when the norm of the whole gradient ``||g||`` exceeds ``max_norm``. The factor
  depends on every leaf, so the compiled step must hold *all* gradients before it
  can update the first layer: its peak carries one full gradient.
* ``block``: :func:`clip_by_block_rms`. Each leaf is scaled on its own so that its
  RMS is at most the threshold (as ``optax.clip_by_block_rms``). No leaf waits for
  another, so an accelerator compiler frees each layer's gradient right after its
  update.
* ``previous``: :func:`clip_by_previous_norm`. Scale by the *previous* step's global
  norm, computed in the same pass as this step's update (a sum of per-leaf scalars
  that needs no gradient kept alive), carried in the state. Same threshold and
  trigger as ``global``, one step late; the first step is not clipped.

Split leaves. Inside ``jax.shard_map`` or ``jax.pmap`` each device may hold its own
block of some leaves (for example the LTE heads of :func:`lowrank_jax.optim.lte.lte_merge`
spread over a ``heads`` axis) and a full copy of the others. Every transform here
takes ``axis_name`` (that axis; ``None`` outside such a program) and ``split`` (the
leaves holding only this device's block: a tree of bools like the updates, or a
function ``updates -> tree of bools``), and then computes the norms of the whole
gradient: for the global norm

  ``sqrt(sum_replicated ||g||^2 + psum_axis(sum_split ||g_local||^2))``

-- one scalar all-reduce. ``optax.clip_by_global_norm`` would see only the local
blocks, so every device would clip by a different factor and replicated leaves would
drift apart. Without ``axis_name`` every transform is the plain Optax one (for
``global``, ``optax.clip_by_global_norm`` itself).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ['CLIP_MODES', 'ClipByPreviousNormState', 'clip_by_block_rms', 'clip_by_global_norm',
           'clip_by_previous_norm', 'clip_gradients', 'global_norm']

# The choices of :func:`clip_gradients` (the trainer's ``optimizer.clip_mode``).
CLIP_MODES = ('global', 'block', 'previous')

# Which leaves are split over the axis: a tree of bools like the updates, or a function building it.
SplitMask = Any | Callable[[Any], Any]


def _split_flags(split: SplitMask, axis_name: str | None, tree: Any) -> Any:
  """Bools over ``tree``: True where a leaf is split over ``axis_name`` (none without an axis)."""
  if axis_name is None or split is None:
    return jax.tree.map(lambda _: False, tree)
  return split(tree) if callable(split) else split


def _squares(x: jax.Array) -> jax.Array:
  return jnp.sum(jnp.square(x.astype(jnp.float32)))


def _positive(name: str, value: float) -> None:
  if not value > 0:
    raise ValueError(f'{name} must be > 0, got {value!r}')


def global_norm(tree: Any, axis_name: str | None = None, split: SplitMask = None) -> jax.Array:
  """The L2 norm of every leaf of ``tree`` together, over all devices of ``axis_name``.

  Args:
    tree: the per-device tree (e.g. gradients).
    axis_name: the named axis (of ``shard_map`` / ``pmap``) the split leaves are split
      over; ``None`` outside such a program (``optax.tree.norm``).
    split: the leaves holding only this device's block (see the module docstring). The
      others must be identical on every device (they are counted once).

  Returns:
    A float32 scalar, the same on every device.
  """
  if axis_name is None:
    return optax.tree.norm(tree)
  pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(_split_flags(split, axis_name, tree)), strict=True)
  whole, local = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
  for x, is_split in pairs:
    if is_split:
      local = local + _squares(x)
    else:
      whole = whole + _squares(x)
  return jnp.sqrt(whole + jax.lax.psum(local, axis_name))


def clip_by_global_norm(max_norm: float, *, axis_name: str | None = None,
                        split: SplitMask = None) -> optax.GradientTransformation:
  """``optax.clip_by_global_norm`` for leaves split over a named device axis.

  Updates whose global norm (:func:`global_norm`, over every device of ``axis_name``)
  is at least ``max_norm`` are scaled by ``max_norm / norm``, by the same factor on
  every device. Without ``axis_name`` it is ``optax.clip_by_global_norm(max_norm)``.

  Example (LTE heads spread over a ``heads`` axis)::

    from lowrank_jax.optim import clip_by_global_norm, lte_head_mask, lte_merge

    tx = optax.chain(
        clip_by_global_norm(1.0, axis_name='heads', split=lte_head_mask),
        lte_merge(optax.adamw(1e-3), 10, scale=4.0, axis_name='heads'))
  """
  _positive('clip_by_global_norm: max_norm', max_norm)
  if axis_name is None:
    return optax.clip_by_global_norm(max_norm)

  def clip(updates, params=None):
    del params
    norm = global_norm(updates, axis_name, split)
    trigger = norm < max_norm
    return jax.tree.map(lambda t: jax.lax.select(trigger, t, (t / norm.astype(t.dtype)) * max_norm), updates)

  return optax.stateless(clip)


def clip_by_block_rms(threshold: float, *, axis_name: str | None = None,
                      split: SplitMask = None) -> optax.GradientTransformation:
  """Scales each leaf so that its root-mean-square is at most ``threshold``.

  ``u <- u / max(1, rms(u) / threshold)`` with ``rms(u) = sqrt(mean(u^2))`` over the
  leaf's entries, computed in float32 (``optax.clip_by_block_rms`` computes it in the
  leaf's dtype; for float32 leaves the two agree). Each leaf depends only on itself, so
  a compiled step can update and free one layer's gradient before the next layer's is
  computed. A split leaf's RMS is taken over its blocks on every device (one scalar
  ``psum`` per split leaf).

  Args:
    threshold: the largest RMS a leaf keeps (> 0). It is an RMS, not a norm: a
      global-norm threshold of ``c`` over ``n`` entries is comparable to ``c / sqrt(n)``.
    axis_name, split: for leaves split over a device axis (see the module docstring).

  Example::

    tx = optax.chain(clip_by_block_rms(1e-3), optax.adamw(1e-3))
  """
  _positive('clip_by_block_rms: threshold', threshold)

  def leaf(u, is_split):
    sq, n = _squares(u), u.size
    if is_split:
      sq, n = jax.lax.psum(sq, axis_name), n * jax.lax.axis_size(axis_name)
    return u / jnp.maximum(1.0, jnp.sqrt(sq / n) / threshold).astype(u.dtype)

  return optax.stateless(lambda updates, params=None: jax.tree.map(
      leaf, updates, _split_flags(split, axis_name, updates)))


class ClipByPreviousNormState(NamedTuple):
  norm: jax.Array  # float32 scalar: the global norm of the last step's updates (0 before the first)


def clip_by_previous_norm(max_norm: float, *, axis_name: str | None = None,
                          split: SplitMask = None) -> optax.GradientTransformation:
  """Global-norm clipping by the previous step's norm, so no step holds every gradient.

  With ``n_{t-1}`` the global norm of step ``t-1``'s incoming updates (the raw
  gradients, before clipping), step ``t`` returns

    ``u_t`` if ``n_{t-1} < max_norm``, else ``u_t * max_norm / n_{t-1}``,

  and stores ``n_t = ||u_t||`` (:func:`global_norm`) for the next step. ``n_{-1} = 0``:
  the first step is not clipped (with a warmup schedule its learning rate is the
  smallest of the run). Computing ``n_t`` is a sum of one scalar per leaf taken as
  each gradient is produced; unlike ``optax.clip_by_global_norm``, no leaf's update
  waits for it, so an accelerator compiler frees each layer's gradient right after its
  update. Gradient norms change slowly from step to step, so the one-step-late factor
  bounds spikes of a run much as the global one does; a single outlier step is clipped
  one step later. Under ``optax.apply_if_finite`` a skipped (non-finite) step leaves
  the stored norm unchanged.

  Args:
    max_norm: the norm above which updates are scaled down (> 0).
    axis_name, split: for leaves split over a device axis (see the module docstring).

  Returns:
    An ``optax.GradientTransformation`` with state :class:`ClipByPreviousNormState`.

  Example::

    tx = optax.chain(clip_by_previous_norm(1.0), optax.adamw(1e-3))
  """
  _positive('clip_by_previous_norm: max_norm', max_norm)

  def update_fn(updates, state, params=None):
    del params
    trigger = state.norm < max_norm
    scale = jnp.where(trigger, 1.0, max_norm / jnp.where(trigger, 1.0, state.norm))
    clipped = jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)
    return clipped, ClipByPreviousNormState(global_norm(updates, axis_name, split).astype(jnp.float32))

  return optax.GradientTransformation(lambda _: ClipByPreviousNormState(jnp.zeros((), jnp.float32)), update_fn)


def clip_gradients(mode: str, threshold: float, *, axis_name: str | None = None,
                   split: SplitMask = None) -> optax.GradientTransformation:
  """The clipping transform named by ``mode`` (one of ``CLIP_MODES``): ``'global'``
  (:func:`clip_by_global_norm`), ``'block'`` (:func:`clip_by_block_rms`, ``threshold`` is a
  per-leaf RMS) or ``'previous'`` (:func:`clip_by_previous_norm`), bounded by ``threshold`` (> 0);
  ``axis_name`` and ``split`` for leaves split over a device axis (see the module docstring)."""
  builders = {'global': clip_by_global_norm, 'block': clip_by_block_rms, 'previous': clip_by_previous_norm}
  if mode not in builders:
    raise ValueError(f'clip mode must be one of {list(CLIP_MODES)}, got {mode!r}')
  return builders[mode](threshold, axis_name=axis_name, split=split)
