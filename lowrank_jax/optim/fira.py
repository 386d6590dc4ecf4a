"""Fira: full-rank updates under GaLore's low-rank optimizer state, as Optax transforms.

Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank
Constraint?", 2024, https://arxiv.org/abs/2410.01623.
"""

from __future__ import annotations

from typing import Optional, Union

import optax

from lowrank_jax.optim import _factory
from lowrank_jax.optim import projection as proj_lib
from lowrank_jax.optim import subspace


@_factory.method()
def scale_by_fira(
    rank: int = 128,
    *,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    scaling: str = 'channel',
    norm_growth_limit: Optional[float] = 1.01,
    refresh: Union[str, proj_lib.RandomizedRefresh] = 'svd',
    **core,
) -> optax.GradientTransformationExtraArgs:
  r"""Fira's update direction: GaLore's plus the out-of-subspace gradient, norm-scaled.

  With GaLore's projector ``P`` (refreshed every ``T`` steps), ``R = P^T G``
  and ``N = \mathrm{Adam}(R)``:

  .. math::
    \phi_j = \|N[:, j]\| / \|R[:, j]\| \text{ (channel)}, \quad
    \phi = \|N\| / \|R\| \text{ (tensor)}; \qquad
    S_t = (G_t - P R_t)\,\mathrm{diag}(\phi);

    S_t \leftarrow S_t \cdot \gamma \|S_{t-1}\| / \|S_t\|
    \text{ if } \|S_t\| > \gamma \|S_{t-1}\| \text{ (norm-growth limiter)};
    \qquad \text{update} = \alpha P N_t + S_t .

  The residual ``G - P R`` is the gradient outside the subspace, which GaLore
  drops; it has no optimizer state, and takes Adam's scaling effect measured
  in the subspace. State: GaLore's (projector and low-rank moments) plus one
  norm per matrix.

  Args:
    scale: ``alpha`` of the low-rank term (0.25, as GaLore's LLaMA runs).
    scaling: ``'channel'`` (the paper's column-wise factor) or ``'tensor'``.
    norm_growth_limit: ``gamma`` (1.01); None disables the limiter.
    rank, update_proj_gap, refresh, proj_type, base_optimizer, moments,
      projection_mask, projector_dtype, split_refresh: as
      :func:`~lowrank_jax.optim.scale_by_galore`.

  Only ``rank`` may be passed by position.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  return subspace.scale_by_subspace(
      subspace.DecompositionRefresh(update_proj_gap, refresh),
      subspace.ProjectBackPlusResidual(scale, scaling, norm_growth_limit), rank=rank, **core)


@_factory.optimizer(scale_by_fira)
def fira(learning_rate: optax.ScalarOrSchedule, **kwargs) -> dict:
  r"""Fira: :func:`scale_by_fira`, decoupled weight decay, learning rate.

  The paper's LLaMA recipe is GaLore's: ranks 128/256/256/512 for
  60M/130M/350M/1B, ``T = 200``, ``alpha = 0.25``, learning rate 0.01,
  ``gamma = 1.01``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lowrank_jax.optim import fira
    >>> params = {'layers': {'0': {'mlp': {'up': {'kernel': jnp.ones((64, 128))}}}}}
    >>> opt = fira(optax.cosine_decay_schedule(1e-2, 1000), rank=16)
    >>> state = opt.init(params)
    >>> updates, state = jax.jit(opt.update)(jax.tree.map(jnp.ones_like, params), state, params)

  Args:
    learning_rate: float or optax schedule.
    weight_decay, weight_decay_mask: as :func:`~lowrank_jax.optim.galore`.
    rank, update_proj_gap, scale, scaling, norm_growth_limit, refresh,
      proj_type, base_optimizer, moments, projection_mask, projector_dtype,
      split_refresh: see :func:`scale_by_fira`.

  ``learning_rate`` and ``rank`` may be passed by position; the rest are
  keyword-only.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  References:
    Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under
    Low-rank Constraint?", 2024, https://arxiv.org/abs/2410.01623.
  """
  return kwargs  # scale_by_fira's arguments, unchanged (_factory.optimizer chains the rest)
