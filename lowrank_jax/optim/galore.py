"""GaLore: Gradient Low-Rank Projection as Optax transforms.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", ICML 2024, https://arxiv.org/abs/2403.03507.
"""

from __future__ import annotations

from typing import Union

import optax

from lowrank_jax.optim import _factory
from lowrank_jax.optim import projection as proj_lib
from lowrank_jax.optim import subspace

#: Moment policies at a refresh (the trainer's choice list).
MOMENT_MODES = subspace.MOMENT_POLICIES
#: Refresh algorithms (the trainer's choice list).
REFRESH_MODES = subspace.REFRESH_ALGORITHMS

#: GaLore's state is the subspace core's (fields ``count``, ``projector``,
#: ``lowrank_state``, ``dense_state``; ``projector_state``, ``lift_state`` empty,
#: ``next_refresh`` set with ``split_refresh``).
GaLoreState = subspace.SubspaceState


@_factory.method()
def scale_by_galore(
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    refresh: Union[str, proj_lib.RandomizedRefresh] = 'svd',
    **core,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``base_optimizer`` on low-rank projections of the gradients (GaLore).

  For every projected leaf with canonical gradient matrix ``G`` (see
  :mod:`lowrank_jax.optim.projection` for the matrix view and the sides):

  1. every ``update_proj_gap`` steps (steps ``0, gap, 2 gap, ...``), the
     projector ``P`` is recomputed from the current gradient: the top-``r``
     singular vectors by exact float32 SVD (``refresh='svd'``, the paper), or
     by a randomized subspace iteration warm-started from the previous ``P``
     (``refresh='randomized'``); inside ``jax.jit`` via ``lax.cond`` on the
     step count, so there is no host sync and no recompilation (or, with
     ``split_refresh=True``, in a separate program:
     :func:`~lowrank_jax.optim.refresh_projectors`);
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
    refresh: ``'svd'``, ``'randomized'`` or a
      :class:`~lowrank_jax.optim.projection.RandomizedRefresh`.
    proj_type: ``'std'`` (compress the smaller dim: moments ``r x max(m,
      n)``, the paper's default), ``'reverse_std'`` (compress the larger, as
      ``optax.contrib.galore``), ``'left'``, ``'right'``, ``'full'``.
    base_optimizer: the transform run in the subspace; default
      ``optax.scale_by_adam()``.
    moments: ``'keep'``, ``'reset'`` or ``'rotate'`` (see above).
    projection_mask: which leaves are projected: None for
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
    split_refresh: refresh only in :func:`~lowrank_jax.optim.refresh_projectors`,
      run when :func:`~lowrank_jax.optim.refresh_due`; the update then holds
      no decomposition. Same parameters as the one-transform form.

  Only ``rank`` may be passed by position; the rest are keyword-only, in the
  order all the subspace methods share.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra args are passed to
    ``base``.
  """
  return subspace.scale_by_subspace(
      subspace.DecompositionRefresh(update_proj_gap, refresh), subspace.ProjectBack(scale), rank=rank, **core)


@_factory.optimizer(scale_by_galore)
def galore(learning_rate: optax.ScalarOrSchedule, **kwargs) -> dict:
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
    rank, update_proj_gap, scale, refresh, proj_type, base_optimizer, moments,
      projection_mask, projector_dtype, split_refresh: see
      :func:`scale_by_galore`.
    weight_decay: decoupled weight decay coefficient.
    weight_decay_mask: pytree or callable selecting the leaves that decay
      (as ``optax.add_decayed_weights``'s ``mask``); None decays all.

  ``learning_rate`` and ``rank`` may be passed by position; the rest are
  keyword-only.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return kwargs  # scale_by_galore's arguments, unchanged (_factory.optimizer chains the rest)
