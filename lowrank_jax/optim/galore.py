"""GaLore: Gradient Low-Rank Projection as Optax transforms.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", ICML 2024, https://arxiv.org/abs/2403.03507.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim import _subspace as sub
from lowrank_jax.optim import projection as proj_lib

MOMENT_MODES = ('keep', 'reset', 'rotate')
REFRESH_MODES = ('svd', 'randomized')


class GaLoreState(NamedTuple):
  """State of :func:`scale_by_galore`.

  Attributes:
    count: number of updates taken (int32 scalar).
    projector: pytree with the structure of the params: at a projected leaf a
      dict ``{'in': P}`` / ``{'out': Q}`` / both (see
      :mod:`lowrank_jax.optim.projection` for the sides), with shapes
      ``batch + (n_in, r)`` / ``batch + (n_out, r)``; a float32 scalar
      placeholder at other leaves.
    lowrank_state: state of the base transform on the low-rank gradients
      (placeholders at unprojected leaves).
    dense_state: state of the base transform on the unprojected gradients
      (placeholders at projected leaves).
  """

  count: jax.Array
  projector: Any
  lowrank_state: optax.OptState
  dense_state: optax.OptState


def _refresh_spec(refresh):
  if isinstance(refresh, proj_lib.RandomizedRefresh):
    return refresh
  if refresh == 'randomized':
    return proj_lib.RandomizedRefresh()
  if refresh == 'svd':
    return 'svd'
  raise ValueError(
      "`refresh` must be 'svd', 'randomized' or a RandomizedRefresh, got "
      f'{refresh!r}'
  )


def scale_by_galore(
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = 'std',
    refresh: Union[str, proj_lib.RandomizedRefresh] = 'svd',
    base: Optional[optax.GradientTransformation] = None,
    moments: str = 'keep',
    mask: Any = None,
    projector_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``base`` on low-rank projections of the gradients (GaLore).

  For every projected leaf with canonical gradient matrix ``G`` (see
  :mod:`lowrank_jax.optim.projection` for the matrix view and the sides):

  1. every ``update_proj_gap`` steps (steps ``0, gap, 2 gap, ...``), the
     projector ``P`` is recomputed from the current gradient: the top-``r``
     singular vectors by exact float32 SVD (``refresh='svd'``, the paper), or
     by a randomized subspace iteration warm-started from the previous ``P``
     (``refresh='randomized'``); inside ``jax.jit`` via ``lax.cond`` on the
     step count, so there is no host sync and no recompilation;
  2. ``R = P^T G`` (or ``G Q``, or ``P^T G Q``) goes through ``base``;
  3. the result ``N`` is mapped back, ``scale * P N``, in the leaf's layout.

  Unprojected leaves go through ``base`` unchanged. ``base`` must be
  gradient-only (``scale_by_adam``, ``scale_by_lion``,
  ``scale_by_factored_rms``, ``trace``, ``identity``, ...). It runs as two
  instances, one on the low-rank leaves and one on the rest (so a global
  operation inside ``base``, like a clip by global norm, sees each group
  separately: put it before this transform instead). When ``update`` gets
  ``params``, the dense instance gets the real params of its leaves and the
  low-rank instance gets ``jax.ShapeDtypeStruct`` shape carriers (enough for
  ``scale_by_factored_rms``, which reads only shapes; a transform reading
  param values fails loudly; use ``galore``'s ``weight_decay`` instead of a
  decay inside ``base``).

  ``moments`` says what happens to the low-rank base state when ``P`` is
  refreshed (the dense instance is never touched):

  * ``'keep'`` (the paper): the moments are used as they are, though they
    were accumulated in the old basis.
  * ``'reset'``: the low-rank instance is re-initialised with
    ``base.init`` (moments zero and its step count zero, so Adam's bias
    correction restarts as for a fresh optimizer).
  * ``'rotate'``: with ``R = P_new^T P_old`` (per projected side), first
    moments (any state leaf with the leaf's low-rank shape, e.g. Adam's
    ``mu``, Lion's ``mu``, a momentum ``trace``) become ``R m``, i.e. the
    projection onto the new subspace of the old full-space momentum
    ``P_old m``. Second moments (state fields named ``nu``, ``nu_max``,
    ``sum_of_squares``, ``v``, ...) are elementwise and cannot be rotated
    exactly; they become ``(R * R) v``, the diagonal of ``R diag(v) R^T``
    (nonnegative, exact when the new basis is a permutation/sign change of
    the old one). Other state leaves (counts, factored row/column
    statistics) are kept.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lowrank_jax.optim import galore
    >>> params = {'layers': {'0': {'mlp': {'up': {'kernel': jnp.ones((64, 128))}}}},
    ...           'final_norm': {'scale': jnp.ones((64,))}}
    >>> opt = galore(learning_rate=1e-2, rank=16, update_proj_gap=50, scale=0.25)
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(opt.update)(grads, state, params)

  Args:
    rank: rank of the projection; a leaf uses ``min(rank, n_in, n_out)``.
      Must be a static int (with ``optax.inject_hyperparams``, list it in
      ``static_args`` if ``init`` is jitted; the update reads the ranks from
      the state).
    update_proj_gap: steps between projector refreshes.
    scale: multiplies the projected-back updates (the paper's alpha; 0.25 in
      its LLaMA runs). Unprojected leaves are not scaled.
    proj_type: ``'std'`` (compress the smaller dim: moments ``r x max(m,
      n)``, the paper's default), ``'reverse_std'`` (compress the larger, as
      ``optax.contrib.galore``), ``'left'``, ``'right'``, ``'full'``.
    refresh: ``'svd'``, ``'randomized'`` or a
      :class:`~lowrank_jax.optim.projection.RandomizedRefresh`.
    base: the transform run in the subspace; default ``optax.scale_by_adam()``.
    moments: ``'keep'``, ``'reset'`` or ``'rotate'`` (see above).
    mask: which leaves are projected: None for
      :func:`~lowrank_jax.optim.projection.default_projection_mask` with
      ``rank=rank``; else a pytree (or a callable ``params -> pytree``) with
      leaves ``True``/``False``/``None`` or a
      :class:`~lowrank_jax.optim.projection.MatrixAxes` (projected, with that
      matrix view; ``True`` means ``MatrixAxes(-2, -1)``). A callable is
      called on the params at init and on the updates at every step, so it
      must depend only on paths and shapes. With
      ``optax.inject_hyperparams`` put a callable mask in ``static_args``.
    projector_dtype: dtype of the stored projectors, default float32. The
      low-rank gradients (and so the base moments) have the promoted dtype of
      the gradient and the projector. Prefer a string (``'bfloat16'``) with
      ``optax.inject_hyperparams``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra args are passed to
    ``base``.
  """
  sub.check_choice('proj_type', proj_type, proj_lib.PROJ_TYPES)
  sub.check_choice('moments', moments, MOMENT_MODES)
  refresh_spec = _refresh_spec(refresh)
  base = optax.scale_by_adam() if base is None else base
  base = optax.with_extra_args_support(base)
  pdtype = jnp.dtype('float32' if projector_dtype is None else projector_dtype)

  def init_fn(params):
    r = sub.static_int(rank, 'rank')
    if r <= 0:
      raise ValueError(f'`rank` must be positive, got {r}')
    leaves, treedef = jax.tree.flatten(params)
    plans = sub.init_plans(params, mask, r, proj_type)
    projs = sub.zero_projectors(plans, pdtype)
    low, dense = sub.split_init_trees(leaves, plans, pdtype)
    return GaLoreState(
        count=jnp.zeros([], jnp.int32),
        projector=treedef.unflatten(projs),
        lowrank_state=base.init(treedef.unflatten(low)),
        dense_state=base.init(treedef.unflatten(dense)),
    )

  def update_fn(updates, state, params=None, **extra_args):
    treedef, leaves, old_projs, plans = sub.plans_from_state(
        updates, state.projector, mask
    )
    mats = sub.canonical_mats(leaves, plans)
    count = state.count
    do_refresh = (count % update_proj_gap) == 0
    paths = sub.param_paths(updates)

    def refreshed(operand):
      projs, low_state = operand
      new = sub.compute_projectors(
          mats, plans, projs, refresh_spec, pdtype, count, count == 0
      )
      if moments == 'reset':
        low0, _ = sub.split_init_trees(leaves, plans, pdtype)
        fresh = base.init(treedef.unflatten(low0))
        low_state = sub.cast_like(fresh, low_state)
      elif moments == 'rotate':
        low_state = sub.rotate_state(low_state, paths, plans, projs, new)
      return sub.cast_like(new, projs), low_state

    if moments == 'keep':  # the base state does not go through the cond
      projs = jax.lax.cond(
          do_refresh,
          lambda p: refreshed((p, None))[0],
          lambda p: p,
          old_projs,
      )
      low_state = state.lowrank_state
    else:
      projs, low_state = jax.lax.cond(
          do_refresh,
          refreshed,
          lambda operand: operand,
          (old_projs, state.lowrank_state),
      )

    low, dense = sub.split_updates(leaves, mats, projs, plans)
    low_upd, dense_upd, low_state, dense_state = sub.run_base(
        base, treedef, low, dense, plans, low_state, state.dense_state, params,
        extra_args,
    )
    out = sub.merge_updates(
        leaves,
        low_upd,
        dense_upd,
        projs,
        plans,
        scale,
    )
    new_state = GaLoreState(
        count=sub.safe_increment(count),
        projector=treedef.unflatten(projs),
        lowrank_state=low_state,
        dense_state=dense_state,
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = 'std',
    refresh: Union[str, proj_lib.RandomizedRefresh] = 'svd',
    base: Optional[optax.GradientTransformation] = None,
    moments: str = 'keep',
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    mask: Any = None,
    projector_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""GaLore optimizer: :func:`scale_by_galore`, decoupled weight decay, learning rate.

  ``chain(scale_by_galore(...), add_decayed_weights(weight_decay,
  weight_decay_mask), scale_by_learning_rate(learning_rate))``. With the
  default Adam base this is the paper's GaLore-AdamW: the weight decay acts
  on the full parameters, not in the subspace.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lowrank_jax.optim import galore
    >>> schedule = optax.warmup_cosine_decay_schedule(0., 1e-2, 100, 1000)
    >>> opt = optax.chain(
    ...     optax.clip_by_global_norm(1.0),
    ...     galore(schedule, rank=128, update_proj_gap=200, scale=0.25,
    ...            weight_decay=0.0))

  Args:
    learning_rate: float or optax schedule.
    rank, update_proj_gap, scale, proj_type, refresh, base, moments, mask,
      projector_dtype: see :func:`scale_by_galore` (``mask`` selects the
      *projected* leaves).
    weight_decay: decoupled weight decay coefficient.
    weight_decay_mask: pytree or callable selecting the leaves that decay
      (as ``optax.add_decayed_weights``'s ``mask``); None decays all.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return optax.chain(
      scale_by_galore(
          rank=rank,
          update_proj_gap=update_proj_gap,
          scale=scale,
          proj_type=proj_type,
          refresh=refresh,
          base=base,
          moments=moments,
          mask=mask,
          projector_dtype=projector_dtype,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
