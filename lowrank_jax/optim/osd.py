"""Online Subspace Descent as Optax transforms.

Liang, Liu, Chen & Liu, "Memory-Efficient LLM Training with Online Subspace
Descent", 2024, https://arxiv.org/abs/2408.12857; official code
https://github.com/kyleliang919/Online-Subspace-Descent.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim import _subspace as sub
from lowrank_jax.optim import projection as proj_lib

#: The official code's projector learning rate, ``1 / update_proj_gap`` with
#: its default gap of 200.
DEFAULT_PROJECTOR_LR = 1.0 / 200


class OSDState(NamedTuple):
  """State of :func:`scale_by_osd`.

  Attributes:
    count: number of updates taken (int32 scalar).
    projector: as :class:`~lowrank_jax.optim.GaLoreState.projector` (at a
      projected leaf ``{'in': P}``/``{'out': Q}``/both, else a placeholder).
      After the first step the projectors are not exactly orthonormal.
    projector_state: state of ``projector_optimizer`` on the projector tree.
    lowrank_state: state of the base transform on the low-rank gradients.
    dense_state: state of the base transform on the unprojected gradients.
  """

  count: jax.Array
  projector: Any
  projector_state: optax.OptState
  lowrank_state: optax.OptState
  dense_state: optax.OptState


def scale_by_osd(
    rank: int = 128,
    proj_type: str = 'std',
    projector_optimizer: Optional[optax.GradientTransformation] = None,
    projector_lr: optax.ScalarOrSchedule = DEFAULT_PROJECTOR_LR,
    orthogonality: float = 0.0,
    base: Optional[optax.GradientTransformation] = None,
    scale: float = 1.0,
    mask: Any = None,
    projector_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Online Subspace Descent: GaLore with the projector learned by online PCA.

  At step 0 the projector is the top-``r`` SVD subspace of the first gradient
  (inside a ``lax.cond`` on the step count). At every later step ``t`` the
  update uses the current ``P_t`` exactly as :func:`scale_by_galore` (project,
  ``base``, project back, ``scale``), and then ``P`` takes one step of
  ``projector_optimizer`` on the online-PCA loss of this step's gradient
  (:func:`~lowrank_jax.optim.projection.online_pca_loss`)

  .. math::
    \| \tilde G - P P^\top \tilde G \|_F^2
    + \lambda \| P^\top P - I \|_F^2, \qquad \tilde G = G / \|G\|_F,

  written for the projected side (``\tilde G^\top`` for the ``'out'`` side,
  both losses for ``'full'``):
  ``P_{t+1} = P_t - \eta_t \, \mathrm{opt}(\nabla_P)``. The gradient is
  computed in closed form (:func:`~lowrank_jax.optim.projection.online_pca_grad`)
  reusing the low-rank gradient ``P^T G``, so a projector step costs one
  extra product with ``G`` (plus ``r x r`` work) over a GaLore step. There is no SVD
  after step 0 and no re-orthonormalisation (as in the paper and the
  official code; ``orthogonality`` = the paper's ``\lambda`` keeps ``P``
  near the Stiefel manifold, the official code uses none). As in the
  official code, no projector step is taken at step 0.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lowrank_jax.optim import osd
    >>> params = {'layers': {'0': {'attn': {'q': {'kernel': jnp.ones((64, 64))}}}}}
    >>> schedule = optax.linear_schedule(1e-2, 0.0, 1000)
    >>> opt = osd(learning_rate=schedule, rank=16, projector_lr_ratio=0.5)
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(opt.update)(grads, state, params)

  Args:
    rank: projection rank (static int; ``min(rank, n_in, n_out)`` per leaf).
    proj_type: as in :func:`scale_by_galore`.
    projector_optimizer: gradient transformation for ``P`` *without* learning
      rate (the direction; ``P -= projector_lr * direction``). Default
      ``optax.scale_by_adam()``, as the official code's AdamW.
    projector_lr: float or schedule ``count -> lr`` evaluated at this
      transform's step count (0 at the first update). Default ``1/200``, the
      official code's ``1 / update_proj_gap``. To follow the weight schedule
      as in the paper use :func:`osd`'s ``projector_lr_ratio``.
    orthogonality: ``lambda`` of the penalty ``||P^T P - I||^2``.
    base: transform run in the subspace, default ``optax.scale_by_adam()``.
    scale: multiplies the projected-back updates.
    mask: which leaves are projected, as in :func:`scale_by_galore`.
    projector_dtype: dtype of ``P`` and so of the projector optimizer's
      updates; float32 by default.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  sub.check_choice('proj_type', proj_type, proj_lib.PROJ_TYPES)
  base = optax.scale_by_adam() if base is None else base
  base = optax.with_extra_args_support(base)
  popt = optax.scale_by_adam() if projector_optimizer is None else projector_optimizer
  lr_fn = sub.as_schedule(projector_lr)
  pdtype = jnp.dtype('float32' if projector_dtype is None else projector_dtype)

  def init_fn(params):
    r = sub.static_int(rank, 'rank')
    if r <= 0:
      raise ValueError(f'`rank` must be positive, got {r}')
    leaves, treedef = jax.tree.flatten(params)
    plans = sub.init_plans(params, mask, r, proj_type)
    projs = treedef.unflatten(sub.zero_projectors(plans, pdtype))
    low, dense = sub.split_init_trees(leaves, plans, pdtype)
    return OSDState(
        count=jnp.zeros([], jnp.int32),
        projector=projs,
        projector_state=popt.init(projs),
        lowrank_state=base.init(treedef.unflatten(low)),
        dense_state=base.init(treedef.unflatten(dense)),
    )

  def update_fn(updates, state, params=None, **extra_args):
    treedef, leaves, old_projs, plans = sub.plans_from_state(
        updates, state.projector, mask
    )
    mats = sub.canonical_mats(leaves, plans)
    count = state.count

    def first(projs):
      new = sub.compute_projectors(mats, plans, projs, 'svd', pdtype, count, True)
      return sub.cast_like(new, projs)

    projs = jax.lax.cond(count == 0, first, lambda p: p, old_projs)

    low, dense = sub.split_updates(leaves, mats, projs, plans)
    low_upd, dense_upd, low_state, dense_state = sub.run_base(
        base, treedef, low, dense, plans, state.lowrank_state, state.dense_state, params,
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

    def projector_step(operand):
      projs, pstate = operand
      grads = []
      for m, y, p, plan in zip(mats, low, projs, plans):
        if plan is None:
          grads.append(jnp.zeros_like(p))
          continue
        g = {}
        for s in plan.sides:
          # Reuse the low-rank gradient as P^T A when it is one (one side).
          pa = None
          if len(plan.sides) == 1:
            pa = y if s == 'in' else jnp.swapaxes(y, -1, -2)
          g[s] = proj_lib.online_pca_grad(p[s], m, s, orthogonality, pa)
          g[s] = g[s].astype(p[s].dtype)
        grads.append(g)
      ptree = treedef.unflatten(projs)
      direction, pstate = popt.update(treedef.unflatten(grads), pstate, ptree)
      lr = lr_fn(count)
      new_ptree = jax.tree.map(
          lambda p, d: (p - lr * d).astype(p.dtype), ptree, direction
      )
      # Placeholders stay zero.
      new = treedef.flatten_up_to(new_ptree)
      new = [q if plan is not None else p for q, p, plan in zip(new, projs, plans)]
      return new, sub.cast_like(pstate, operand[1])

    new_projs, pstate = jax.lax.cond(
        count > 0,
        projector_step,
        lambda operand: operand,
        (projs, state.projector_state),
    )

    new_state = OSDState(
        count=sub.safe_increment(count),
        projector=treedef.unflatten(new_projs),
        projector_state=pstate,
        lowrank_state=low_state,
        dense_state=dense_state,
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def osd(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    proj_type: str = 'std',
    projector_optimizer: Optional[optax.GradientTransformation] = None,
    projector_lr: Optional[optax.ScalarOrSchedule] = None,
    projector_lr_ratio: Optional[float] = None,
    orthogonality: float = 0.0,
    base: Optional[optax.GradientTransformation] = None,
    scale: float = 1.0,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    mask: Any = None,
    projector_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Online Subspace Descent optimizer: :func:`scale_by_osd`, weight decay, learning rate.

  The projector learning rate is, in order of precedence:
  ``projector_lr_ratio * learning_rate`` (the paper's ``alpha`` times the
  weight learning rate; follows ``learning_rate`` if it is a schedule, or the
  injected value under ``optax.inject_hyperparams``), else ``projector_lr``
  (float or schedule), else ``1/200`` (the official code's peak value).

  Example:
    >>> import optax
    >>> from lowrank_jax.optim import osd
    >>> schedule = optax.warmup_cosine_decay_schedule(0., 1e-2, 100, 1000)
    >>> opt = osd(schedule, rank=128, scale=0.25, projector_lr_ratio=0.5)

  Args:
    learning_rate: float or schedule for the weights.
    projector_lr, projector_lr_ratio: see above (give at most one).
    weight_decay, weight_decay_mask: decoupled weight decay, as in
      :func:`~lowrank_jax.optim.galore`.
    rank, proj_type, projector_optimizer, orthogonality, base, scale, mask,
      projector_dtype: see :func:`scale_by_osd`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  if projector_lr is not None and projector_lr_ratio is not None:
    raise ValueError('give at most one of projector_lr and projector_lr_ratio')
  if projector_lr_ratio is not None:
    ratio = projector_lr_ratio
    if callable(learning_rate):
      plr = lambda count: ratio * learning_rate(count)
    else:
      plr = ratio * learning_rate
  elif projector_lr is not None:
    plr = projector_lr
  else:
    plr = DEFAULT_PROJECTOR_LR
  return optax.chain(
      scale_by_osd(
          rank=rank,
          proj_type=proj_type,
          projector_optimizer=projector_optimizer,
          projector_lr=plr,
          orthogonality=orthogonality,
          base=base,
          scale=scale,
          mask=mask,
          projector_dtype=projector_dtype,
      ),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
