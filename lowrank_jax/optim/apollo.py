"""APOLLO and APOLLO-Mini: AdamW-level updates with SGD-level state, as Optax transforms.

Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025,
https://arxiv.org/abs/2412.05270. Written from the paper (the reference code's
licence is non-commercial; nothing here comes from it).
"""

from __future__ import annotations

from typing import Optional

import optax

from lowrank_jax.optim import _factory
from lowrank_jax.optim import _subspace as sub
from lowrank_jax.optim import subspace

#: Projector rules: ``random`` (the paper: Gaussian, re-drawn, nothing stored),
#: or GaLore's ``svd`` / ``randomized`` refresh (the paper's SVD ablation).
PROJECTORS = ('random', 'svd', 'randomized')
#: Granularity of the gradient scaling: ``channel`` (APOLLO), ``tensor`` (APOLLO-Mini).
SCALINGS = subspace.SCALINGS
#: The paper's APOLLO-Mini gradient scale: sqrt(128) (the reference code's ``scale=128``).
MINI_SCALE = 128 ** 0.5


@_factory.method()
def scale_by_apollo(
    rank: int = 256,
    *,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scaling: str = 'channel',
    norm_growth_limit: Optional[float] = 1.01,
    projector: str = 'random',
    seed: int = 0,
    **core,
) -> optax.GradientTransformationExtraArgs:
  r"""APOLLO's update direction: the raw gradient scaled by Adam's effect in a random subspace.

  For every projected leaf with canonical gradient matrix ``G`` (``m x n``,
  the compressed side chosen by ``proj_type`` as in GaLore):

  .. math::
    R_t = P_t^\top G_t, \quad (P_t)_{ij} \sim \mathcal N(0, 1/r) \text{ re-drawn every } T
    \text{ steps}; \qquad
    \tilde R_t = \mathrm{Adam}(R_t) = \hat M_t / (\sqrt{\hat V_t} + \epsilon);

    s_j = \|\tilde R_t[:, j]\| / \|R_t[:, j]\| \text{ (channel)}, \quad
    s = \|\tilde R_t\| / \|R_t\| \text{ (tensor)}; \qquad
    \tilde G_t = G_t \,\mathrm{diag}(s);

    \tilde G_t \leftarrow \tilde G_t \cdot \gamma \|\tilde G_{t-1}\| / \|\tilde G_t\|
    \text{ if } \|\tilde G_t\| > \gamma \|\tilde G_{t-1}\| \text{ (norm-growth limiter)};
    \qquad \text{update} = \alpha \tilde G_t .

  Channels are the columns of the low-rank gradient, i.e. the uncompressed
  side. Only the low-rank moments (``r x max(m, n)`` with ``std``) and a
  PRNG key are stored: the projector is drawn again from the key at every
  step. Unprojected leaves get plain ``base_optimizer`` (Adam).

  Args:
    rank: rank of the auxiliary space (static int; also at update time: with
      ``optax.inject_hyperparams`` list it in ``static_args``).
    update_proj_gap: ``T``, steps between re-draws (the paper: 200).
    scale: ``alpha``, the gradient scale: 1 for APOLLO; ``sqrt(128)`` for
      APOLLO-Mini (:data:`MINI_SCALE`), compensating the rank-1 space's
      smaller ratio (about ``sqrt(r/n)``).
    scaling: ``'channel'`` (APOLLO) or ``'tensor'`` (APOLLO-Mini).
    norm_growth_limit: ``gamma`` of the limiter (1.01); None disables it.
    projector: ``'random'`` (the paper), ``'svd'`` or ``'randomized'``
      (GaLore's refresh; stores the projector).
    seed: seed of the Gaussian projectors (stored in the state as a key).
    proj_type: as :func:`~lowrank_jax.optim.scale_by_galore` (``std``:
      compress the smaller side). Channel scaling needs a one-sided type.
    base_optimizer: the low-rank optimizer, default ``optax.scale_by_adam()``.
    moments: at a re-draw, ``'keep'`` (default), ``'reset'`` or ``'rotate'``.
    projection_mask, projector_dtype: as
      :func:`~lowrank_jax.optim.scale_by_galore`.
    split_refresh: with ``projector='svd'`` or ``'randomized'``, as
      :func:`~lowrank_jax.optim.scale_by_galore` (a random projector has no
      refresh to split).

  Only ``rank`` may be passed by position.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`~lowrank_jax.optim.subspace.SubspaceState`.
  """
  sub.check_choice('projector', projector, PROJECTORS)
  sub.check_choice('scaling', scaling, SCALINGS)
  if projector == 'random':
    rule = subspace.GaussianRedraw(update_proj_gap, seed)
  else:
    rule = subspace.DecompositionRefresh(update_proj_gap, projector)
  return subspace.scale_by_subspace(
      rule, subspace.ScaleGradient(scale, scaling, norm_growth_limit), rank=rank, **core)


@_factory.optimizer(scale_by_apollo)
def apollo(learning_rate: optax.ScalarOrSchedule, **kwargs) -> dict:
  r"""APOLLO: :func:`scale_by_apollo`, decoupled weight decay, learning rate.

  The paper's LLaMA pre-training recipe: rank ``d/4`` of the model width,
  ``T = 200``, ``alpha = 1``, channel-wise scaling, ``gamma = 1.01``,
  learning rate 0.01 on the attention and MLP kernels (the embeddings, head
  and norms get Adam).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lowrank_jax.optim import apollo
    >>> params = {'layers': {'0': {'mlp': {'up': {'kernel': jnp.ones((64, 128))}}}}}
    >>> opt = apollo(optax.cosine_decay_schedule(1e-2, 1000), rank=16)
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(opt.update)(grads, state, params)

  Args:
    learning_rate: float or optax schedule.
    weight_decay, weight_decay_mask: as :func:`~lowrank_jax.optim.galore`.
    rank, update_proj_gap, scale, scaling, norm_growth_limit, projector,
      seed, proj_type, base_optimizer, moments, projection_mask,
      projector_dtype, split_refresh: see :func:`scale_by_apollo`.

  ``learning_rate`` and ``rank`` may be passed by position; the rest are
  keyword-only.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys
    2025, https://arxiv.org/abs/2412.05270.
  """
  return kwargs  # scale_by_apollo's arguments, unchanged (_factory.optimizer chains the rest)


@_factory.optimizer(scale_by_apollo, rank=1, scale=MINI_SCALE, scaling='tensor')
def apollo_mini(learning_rate: optax.ScalarOrSchedule, **kwargs) -> dict:
  r"""APOLLO-Mini: :func:`apollo` with a rank-1 space and one scale per tensor.

  The paper's settings, which are this function's defaults: ``rank=1``,
  ``scaling='tensor'``, ``scale = sqrt(128)`` (:data:`MINI_SCALE`), ``T =
  200``, ``gamma = 1.01``; learning rate 0.01. Its state is two ``1 x max(m,
  n)`` moment rows per matrix (about SGD's memory).

  Example:
    >>> import optax
    >>> from lowrank_jax.optim import apollo_mini
    >>> opt = apollo_mini(optax.cosine_decay_schedule(1e-2, 1000))

  Args and returns: as :func:`apollo`, with the defaults above. APOLLO-Mini
  is introduced in the same paper (https://arxiv.org/abs/2412.05270).
  """
  return kwargs  # scale_by_apollo's arguments, unchanged (_factory.optimizer chains the rest)
