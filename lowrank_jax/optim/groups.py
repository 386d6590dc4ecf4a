"""Parameter groups: a learning-rate multiplier per kind of parameter, for any transform.

Every leaf of a transformer's parameters is one of three kinds (:func:`param_groups`):

* ``'embed'``: the token (and position) embeddings and the output head, biases included;
* ``'other'``: the remaining leaves with fewer than two dimensions (norm scales, biases);
* ``'matrix'``: the remaining leaves (the linears' kernels, LoRA factors, stacked kernels).

:func:`scale_by_group` multiplies each leaf's update by its kind's factor. Chained after an
optimizer, whose last transform is ``scale_by_learning_rate``, that is the optimizer with a
learning rate per kind (PyTorch's parameter groups with their own ``lr``): one code path for
every method, whatever its update rule.

The kinds are roles, not what a method does with a leaf: a kernel too small for GaLore's rank
gets plain Adam from GaLore but stays a ``'matrix'`` (factor 1), as Muon's AdamW leaves that are
matrices would. With LoRA the adapters are matrices; the factors act on the embeddings, head and
norms where those train (ReLoRA-style pre-training), and on nothing where only the adapters
train (their updates are zero).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim import projection as proj_lib

#: The kinds :func:`param_groups` assigns.
GROUPS = ('matrix', 'embed', 'other')


def _names_embed_or_head(name: str) -> bool:
  # The projection's exclusions ('head', 'lm_head', 'embed*', 'wte', 'wpe') name exactly the
  # leaves no method treats as a matrix; 'embed' anywhere adds position embeddings (pos_embed).
  return proj_lib._excluded(name, proj_lib.DEFAULT_EXCLUDED_KEYS) or 'embed' in name


def param_groups(params: Any) -> Any:
  """The kind of every leaf of ``params``: ``'embed'``, ``'other'`` or ``'matrix'`` (module docstring).

  Decided from key names and shapes only, so it also labels ``jax.ShapeDtypeStruct`` trees
  and gradient trees. For the LLaMA models: ``embed/embedding`` and ``head/kernel`` are
  ``'embed'``; the norms' ``scale`` are ``'other'``; every ``layers/*/attn|mlp/*/kernel``
  (and a LoRA layer's ``lora_a``, ``lora_b``) is ``'matrix'``.

  Example:
    >>> import jax.numpy as jnp
    >>> from lowrank_jax.optim import param_groups
    >>> param_groups({'embed': {'embedding': jnp.zeros((8, 4))}, 'norm': {'scale': jnp.ones(4)},
    ...               'up': {'kernel': jnp.zeros((4, 16))}})
    {'embed': {'embedding': 'embed'}, 'norm': {'scale': 'other'}, 'up': {'kernel': 'matrix'}}
  """

  def kind(path, x):
    if any(_names_embed_or_head(n) for n in proj_lib.path_key_names(path)):
      return 'embed'
    return 'matrix' if len(getattr(x, 'shape', ())) >= 2 else 'other'

  return jax.tree_util.tree_map_with_path(kind, params)


def scale_by_group(
    scales: Mapping[str, float],
    labels: Union[Any, Callable[[Any], Any]] = param_groups,
) -> optax.GradientTransformation:
  r"""Multiplies each leaf's update by the factor of its group.

  Chained after an optimizer ``chain(..., add_decayed_weights(wd), scale_by_learning_rate(lr))``
  (every optimizer here and optax's AdamW have that shape), a leaf of group ``g`` moves by
  ``s_g * lr * (u + wd * p)``: exactly the optimizer with learning rate ``s_g * lr`` for that
  leaf, schedule included, and so **the decoupled weight decay scales with the group's rate**
  (the decay per step is ``s_g * lr * wd``, as PyTorch's AdamW with a group ``lr``; the
  coefficient ``wd`` stays the same). What happens inside the update is unchanged: ReLoRA's and
  LTE's merges act on matrices (factor 1), OSD's projector learns at its own rate.

  Stateless; but chaining it wraps the optimizer's state in a tuple, so a checkpoint written
  without it does not restore into an optimizer with it (:func:`with_groups` adds it only when
  a factor differs from 1).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from lowrank_jax.optim import scale_by_group
    >>> opt = optax.chain(optax.adamw(1e-3), scale_by_group({'embed': 10.0, 'other': 10.0}))
    >>> params = {'embed': {'embedding': jnp.ones((8, 4))}, 'up': {'kernel': jnp.ones((4, 16))}}
    >>> updates, state = opt.update(params, opt.init(params), params)

  Args:
    scales: ``{group: factor}``; a group not named keeps factor 1.
    labels: a pytree of group names with the structure of the updates, or a callable
      ``updates -> labels`` (default :func:`param_groups`; it reads names and shapes only).

  Returns:
    An ``optax.GradientTransformation``.
  """
  scales = {k: float(v) for k, v in scales.items()}

  def update_fn(updates, state, params=None):
    del params
    names = labels(updates) if callable(labels) else labels

    def scale(u, name):
      s = scales.get(name, 1.0)
      return u if s == 1.0 else u * jnp.asarray(s, u.dtype)

    return jax.tree.map(scale, updates, names), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def with_groups(tx: optax.GradientTransformation, *, embed_lr_scale: float = 1.0,
                other_lr_scale: float = 1.0) -> optax.GradientTransformation:
  """``tx`` with the embedding-and-head and the other non-matrix groups at their own rates.

  ``chain(tx, scale_by_group({'embed': embed_lr_scale, 'other': other_lr_scale}))``, or ``tx``
  itself when both are 1 (the same numbers and the same state tree as without groups).
  See :func:`scale_by_group` for what a factor means, weight decay included.
  """
  if embed_lr_scale == 1.0 and other_lr_scale == 1.0:
    return tx
  return optax.chain(tx, scale_by_group({'embed': embed_lr_scale, 'other': other_lr_scale}))


def lora_b_labels(params: Any, key: str = 'lora_b') -> Any:
  """``'lora_b'`` for every leaf named ``key`` (a LoRA layer's ``B`` factor), ``'other'`` elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'lora_b' if proj_lib.path_key_names(path)[-1:] == (key,) else 'other', params)


def scale_lora_b(ratio: float, *, key: str = 'lora_b') -> optax.GradientTransformation:
  r"""LoRA+: the update of every LoRA ``B`` factor multiplied by ``ratio``.

  LoRA+ (Hayou et al., 2024, https://arxiv.org/abs/2402.12354) shows that with one learning
  rate for both factors, LoRA's feature learning is inefficient at large width, and trains
  ``B`` at ``ratio`` times ``A``'s rate (the paper suggests ``ratio = 16``). Chained after an
  optimizer, as :func:`scale_by_group` (whose meaning it has: the decoupled weight decay of ``B``
  scales too, as with a PyTorch parameter group ``lr = ratio * lr``). Put it inside
  :func:`~lowrank_jax.optim.relora` (in its ``inner``), not after it: ReLoRA's merge update of
  ``B`` is final.

  Stateless, and ``ratio == 1`` returns the updates untouched; but chaining it wraps the
  optimizer's state in a tuple, so leave it out for ratio 1 to keep checkpoints compatible.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> from lowrank_jax.optim import scale_lora_b
    >>> opt = optax.chain(optax.adamw(1e-3), scale_lora_b(16.0))
    >>> params = {'q': {'lora_a': jnp.ones((8, 2)), 'lora_b': jnp.ones((2, 8))}}
    >>> updates, state = opt.update(params, opt.init(params), params)

  Args:
    ratio: the factor (> 0) on the updates of the leaves named ``key``.
    key: the name of the ``B`` factors' leaves.

  Returns:
    An ``optax.GradientTransformation``.
  """
  ratio = float(ratio)
  if not ratio > 0:
    raise ValueError(f'scale_lora_b: ratio must be > 0, got {ratio!r}')
  return scale_by_group({'lora_b': ratio}, lambda updates: lora_b_labels(updates, key))
