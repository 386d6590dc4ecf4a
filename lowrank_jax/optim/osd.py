"""Online Subspace Descent as Optax transforms.

Liang, Liu, Chen & Liu, "Memory-Efficient LLM Training with Online Subspace
Descent", 2024, https://arxiv.org/abs/2408.12857; official code
https://github.com/kyleliang919/Online-Subspace-Descent.
"""

from __future__ import annotations

from typing import Optional

import optax

from lowrank_jax.optim import _factory
from lowrank_jax.optim import _subspace as sub
from lowrank_jax.optim import subspace

#: The official code's projector learning rate, ``1 / update_proj_gap`` with
#: its default gap of 200.
DEFAULT_PROJECTOR_LR = 1.0 / 200


#: OSD's state is the subspace core's (``projector_state`` holds the projector
#: optimizer's state; after the first step the projectors are not exactly
#: orthonormal).
OSDState = subspace.SubspaceState


@_factory.method(exclude=('moments',))  # the subspace moves every step, by online PCA, not by refreshes
def scale_by_osd(
    rank: int = 128,
    *,
    scale: float = 1.0,
    projector_optimizer: Optional[optax.GradientTransformation] = None,
    projector_lr: optax.ScalarOrSchedule = DEFAULT_PROJECTOR_LR,
    orthogonality: float = 0.0,
    **core,
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
    scale: multiplies the projected-back updates.
    projector_optimizer: gradient transformation for ``P`` *without* learning
      rate (the direction; ``P -= projector_lr * direction``). Default
      ``optax.scale_by_adam()``, as the official code's AdamW.
    projector_lr: float or schedule ``count -> lr`` evaluated at this
      transform's step count (0 at the first update). Default ``1/200``, the
      official code's ``1 / update_proj_gap``. To follow the weight schedule
      as in the paper use :func:`osd`'s ``projector_lr_ratio``.
    orthogonality: ``lambda`` of the penalty ``||P^T P - I||^2``.
    proj_type: as in :func:`scale_by_galore`.
    base_optimizer: transform run in the subspace, default ``optax.scale_by_adam()``.
    projection_mask: which leaves are projected, as in :func:`scale_by_galore`.
    projector_dtype: dtype of ``P`` and so of the projector optimizer's
      updates; float32 by default.
    split_refresh: compute the step-0 SVD only in
      :func:`~lowrank_jax.optim.refresh_projectors` (see
      :func:`scale_by_galore`); the update then holds no decomposition.

  Only ``rank`` may be passed by position.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  popt = optax.scale_by_adam() if projector_optimizer is None else projector_optimizer
  return subspace.scale_by_subspace(
      subspace.OnlinePCA(popt, sub.as_schedule(projector_lr), orthogonality), subspace.ProjectBack(scale),
      rank=rank, **core)


@_factory.optimizer(scale_by_osd)
def osd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    projector_lr: Optional[optax.ScalarOrSchedule] = None,
    projector_lr_ratio: Optional[float] = None,
    **kwargs,
) -> dict:
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
    rank, scale, projector_optimizer, orthogonality, proj_type,
      base_optimizer, projection_mask, projector_dtype, split_refresh: see
      :func:`scale_by_osd`.

  ``learning_rate`` and ``rank`` may be passed by position; the rest are
  keyword-only.

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
  return dict(kwargs, projector_lr=plr)  # scale_by_osd's arguments (_factory.optimizer chains the rest)
