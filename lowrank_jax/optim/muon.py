"""Muon: orthogonalised momentum for the linears' kernels, AdamW for every other leaf.

Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024,
https://kellerjordan.github.io/posts/muon/; Liu et al., "Muon is Scalable for LLM
Training", 2025, https://arxiv.org/abs/2502.16982.

The orthogonalisation is optax's (:func:`optax.contrib.scale_by_muon`). What this alias
adds to :func:`optax.contrib.muon`: the leaves that get Muon are the ones every method here
treats as matrices (:func:`~lowrank_jax.optim.projection.default_projection_mask`: the
linears' kernels, not the embeddings or the head, as the reference Muon keeps those on
AdamW, while optax's default takes every 2-D leaf); the rest get plain AdamW (optax's alias
gives them Nesterov momentum whenever Muon has it); one weight-decay mask for both.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from lowrank_jax.optim import _subspace as sub
from lowrank_jax.optim import projection as proj_lib


def _matrix_axes(tree: Any, matrix_mask: Optional[Callable[[Any], Any]] = None) -> list:
  """Per leaf of ``tree`` (flattened): the :class:`~lowrank_jax.optim.projection.MatrixAxes`
  Muon orthogonalises over, or None for a leaf AdamW updates."""
  values = sub.resolve_mask(proj_lib.default_projection_mask if matrix_mask is None else matrix_mask, tree)
  return [v if isinstance(v, proj_lib.MatrixAxes) else proj_lib.MatrixAxes() if v else None for v in values]


def _fans(x: jax.Array, axes: proj_lib.MatrixAxes) -> tuple[int, int]:
  view = proj_lib.matrix_view(x.shape, axes)
  return view.n_in, view.n_out


def _shape_scale(axes_of: Callable[[Any], list], consistent_rms: Optional[float]) -> optax.GradientTransformation:
  """Muon's per-matrix factor: ``sqrt(max(1, fan_out / fan_in))`` (the reference's), or
  ``consistent_rms * sqrt(max(fan_in, fan_out))`` (Liu et al.'s, an update RMS of about
  ``consistent_rms`` whatever the shape)."""

  def factor(fan_in, fan_out):
    if consistent_rms is None:
      return math.sqrt(max(1.0, fan_out / fan_in))
    return consistent_rms * math.sqrt(max(fan_in, fan_out))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    out = [u * jnp.asarray(factor(*_fans(u, a)), u.dtype) for u, a in zip(leaves, axes_of(updates))]
    return treedef.unflatten(out), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.95,
    ns_steps: int = 5,
    nesterov: bool = True,
    consistent_rms: Optional[float] = 0.2,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    matrix_mask: Optional[Callable[[Any], Any]] = None,
    mu_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""Muon on the kernels of the linears, AdamW on every other leaf.

  For a matrix leaf with gradient ``G_t`` (step ``t = 1, 2, ...``), as
  :func:`optax.contrib.scale_by_muon`:

  .. math::

    M_t = \beta M_{t-1} + (1 - \beta) G_t, \qquad
    \hat M_t = \begin{cases}
      \beta \frac{M_t}{1 - \beta^{t+1}} + (1 - \beta) \frac{G_t}{1 - \beta^t} & \text{Nesterov} \\
      \frac{M_t}{1 - \beta^t} & \text{else}
    \end{cases}

  then ``O_t = NS_5(\hat M_t)``: ``X = \hat M / (||\hat M||_F + 10^{-8})`` (transposed when it
  has more rows than columns) and ``ns_steps`` times ``X <- a X + (b A + c A^2) X`` with
  ``A = X X^T``, ``(a, b, c) = (3.4445, -4.7750, 2.0315)``; an approximate ``U V^T`` of the
  SVD ``U S V^T``. The update is ``-lr (k O_t + wd W)`` with the shape factor ``k``:

  * ``consistent_rms = r`` (default 0.2, Liu et al.): ``k = r sqrt(max(fan_in, fan_out))``,
    so the update's RMS is about ``r``, AdamW's typical RMS: the matrices then take the
    learning rate and weight decay tuned for AdamW, and **one** learning rate serves both
    Muon and the AdamW leaves.
  * ``consistent_rms = None`` (the reference Muon and optax's default):
    ``k = sqrt(max(1, fan_out / fan_in))``; Muon's learning rate is then about 0.02 and the
    AdamW leaves want a much smaller one (the reference: 3e-4), e.g. through
    :func:`~lowrank_jax.optim.with_groups`.

  The bias correction is optax's; the reference Muon has none (the two differ only in the
  first ``~1 / (1 - beta)`` steps, and only in how ``G_t`` and ``M_t`` are mixed, since
  ``NS`` normalises the scale). Every other leaf (embeddings, head, norms, biases) gets
  ``optax.adamw(learning_rate, b1, b2, eps, weight_decay=weight_decay, mask=weight_decay_mask)``.
  The state's momentum field is ``mu``, so :func:`~lowrank_jax.optim.quantize_state` keeps it
  in 8 bits like Adam's.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from lowrank_jax.optim import muon
    >>> params = {'layers': {'0': {'mlp': {'up': {'kernel': jnp.ones((64, 128))}}}},
    ...           'embed': {'embedding': jnp.ones((100, 64))}, 'final_norm': {'scale': jnp.ones((64,))}}
    >>> opt = muon(1e-3, weight_decay=0.1)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(opt.update)(grads, opt.init(params), params)

  Args:
    learning_rate: float or optax schedule, for both kinds of leaves.
    beta: momentum decay.
    ns_steps: Newton-Schulz iterations.
    nesterov: Nesterov momentum (the reference's default).
    consistent_rms: the shape factor (see above); None for the reference's.
    b1, b2, eps: AdamW's, for the other leaves.
    weight_decay: decoupled weight decay coefficient (multiplied by the learning rate, as
      ``optax.adamw``'s), for both kinds of leaves.
    weight_decay_mask: callable ``params -> pytree of bools`` selecting the leaves that decay
      (called on each kind's masked params, as in :func:`optax.contrib.muon`); None decays all.
    matrix_mask: callable ``params -> pytree`` of bools or
      :class:`~lowrank_jax.optim.projection.MatrixAxes` (the axes of a leaf stored with more
      than two dims; the others are batch axes) choosing the Muon leaves, from names and shapes
      only (it is called on the params and on masked updates); None for
      :func:`~lowrank_jax.optim.projection.default_projection_mask`.
    mu_dtype: dtype of both momenta (default: the parameters').

  Returns:
    An ``optax.GradientTransformation``.

  References:
    Jordan et al., Muon, 2024, https://kellerjordan.github.io/posts/muon/

    Liu et al., Muon is Scalable for LLM Training, 2025, https://arxiv.org/abs/2502.16982
  """
  if matrix_mask is not None and not callable(matrix_mask):
    raise TypeError('`matrix_mask` must be a callable params -> pytree (it is also called on the '
                    f'masked updates of the Muon leaves), got {type(matrix_mask).__name__}')
  axes_of = lambda tree: _matrix_axes(tree, matrix_mask)  # noqa: E731

  def labels(params):
    return jax.tree.structure(params).unflatten(['muon' if a is not None else 'adam' for a in axes_of(params)])

  def dimension_numbers(updates):  # the Muon branch's (masked) updates: every leaf is a matrix
    dims = [contrib.MuonDimensionNumbers(a.in_axes, a.out_axes) for a in axes_of(updates)]
    return jax.tree.structure(updates).unflatten(dims)

  return optax.partition(
      {
          'muon': optax.chain(
              contrib.scale_by_muon(ns_steps=ns_steps, beta=beta, mu_dtype=mu_dtype, nesterov=nesterov,
                                    weight_dimension_numbers=dimension_numbers),
              _shape_scale(axes_of, consistent_rms),
              optax.add_decayed_weights(weight_decay, weight_decay_mask),
              optax.scale_by_learning_rate(learning_rate),
          ),
          'adam': optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                              mask=weight_decay_mask, mu_dtype=mu_dtype),
      },
      labels,
  )
