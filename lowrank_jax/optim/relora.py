"""ReLoRA (Lialin et al., 2023) as an Optax ``GradientTransformation``.

ReLoRA trains a model whose linears are LoRA layers (``y = x W + s x A B``)
and, every ``merge_every`` steps, merges ``s A B`` into ``W``, re-draws ``A``,
zeroes ``B`` and prunes the optimizer's moments of ``A`` and ``B``. A sequence
of low-rank updates thus adds up to a high-rank one, while the optimizer only
ever holds state for the low-rank factors.

Here all of that happens inside the optimizer update, so a plain jitted train
step (``updates, state = tx.update(grads, state, params)``, then
``optax.apply_updates``) runs ReLoRA without any host-side merge code and
without recompiling: the merge is a ``lax.cond`` on the step count.

Adapted layers
--------------
The params tree holds, for each adapted layer, a mapping with the keys
``kernel`` (in, out), ``lora_a`` (in, r) and ``lora_b`` (r, out) side by side
(what ``nnx.to_pure_dict`` gives for ``lowrank_jax.nn.lora.LoRALinear``).
Such mappings are found structurally: any ``Mapping`` node holding the three
``adapter_keys``. ``layer_filter(path, node) -> bool`` can exclude some of
them (those then train like any other leaf). Leading batch axes are allowed
(``(..., in, r) @ (..., r, out)``, e.g. layers stacked for a scan).

Behaviour
---------
* **Between merges** the ``kernel`` of an adapted layer gets an update of
  exactly zero, and the inner optimizer never sees it: it is replaced by an
  ``optax.MaskedNode`` in the tree given to the inner optimizer, so the inner
  state holds no moments for it. ``lora_a``, ``lora_b`` and every leaf outside
  adapted layers (embeddings, norms, a dense head, ...) are updated by the
  inner optimizer exactly as if it were run alone on them.

  The gradient of the kernel is ignored, but a transform *before* ``relora``
  (e.g. ``optax.clip_by_global_norm``) still sees it. ``LoRALinear`` stops the
  gradient into its kernel (``freeze_kernel=True``, the default) so the kernel
  gradient is exactly zero and does not distort clipping, as in the official
  code, where the base weight has ``requires_grad=False``.

* **Merge steps.** The merge happens on updates number ``merge_every``,
  ``2 * merge_every``, ... (1-based: the update that takes the count from
  ``k * merge_every - 1`` to ``k * merge_every``), i.e. *after* that many
  ordinary steps, like the official code which merges after
  ``optimizer.step()``. On a merge step:

  1. the inner optimizer makes its ordinary update ``(uA, uB)`` and the
     factors it would produce are ``A' = A + uA``, ``B' = B + uB`` (rounded to
     the parameter dtype, as ``optax.apply_updates`` would);
  2. the returned kernel update is ``scale * A' @ B'`` (float32, highest
     precision, cast to the update dtype), the ``lora_b`` update is ``-B``
     (so ``B`` becomes exactly zero) and the ``lora_a`` update is
     ``A_new - A`` where ``A_new`` is a fresh Kaiming-uniform(a=sqrt(5))
     draw, ``U(-1/sqrt(in), 1/sqrt(in))`` as at initialisation, from a key
     derived from ``seed``, the merge index and the layer's position;
  3. the inner state after this step's update is pruned on the adapter leaves.

  Hence the function the model computes after the merge step,
  ``x (W + s A' B') + s x A_new 0``, equals the one the ordinary update alone
  would give, ``x W + s x A' B'`` (up to rounding): the merge itself does not
  change the model.

  ``relora`` must be the *last* transform of a chain (its updates are final,
  the learning rate belongs in ``inner``), and it needs ``params``.

Pruning (``prune``)
-------------------
The inner state is searched for every sub-tree with the same structure as the
(masked) params tree — Adam's ``mu`` and ``nu``, momentum traces, ... — however
it is nested (``optax.chain``, ``optax.inject_hyperparams``, ``optax.masked``,
...). Within each such tree the leaves at ``lora_a`` / ``lora_b`` positions
are pruned, one leaf at a time; everything else (counts, hyperparameters,
moments of non-adapted leaves) is left untouched, and the state's structure,
shapes and dtypes never change.

* ``'magnitude'``: keep the ``n - round(prune_ratio * n)`` entries of largest
  absolute value of each leaf (``n`` its size), zero exactly
  ``round(prune_ratio * n)`` entries (ties broken by position). The official
  code thresholds at the ``prune_ratio`` quantile, which zeroes about the same
  number. The paper prunes 99% of the moments (``prune_ratio=0.99``).
* ``'random'``: zero each entry independently with probability ``prune_ratio``
  (the official code's ``optimizer_random_pruning``, whose runs use 0.999).
* ``'reset'``: zero every entry (``prune_ratio`` is ignored).

Note: optimizer states that keep adapter statistics in another shape (e.g. a
GaLore projected moment) are not recognised and are not pruned. Wrap
``relora`` *inside* ``optax.MultiSteps`` (``MultiSteps(relora(...), k)``) so
that a merge happens once per real step; a ``MultiSteps`` inside ``inner``
would have its accumulated gradients of the adapters pruned too.

``optax.inject_hyperparams(relora)`` works for the numeric arguments
(``merge_every``, ``scale`` given as a number, ``prune_ratio``, ``seed``);
callables (``scale`` as a function, ``layer_filter``) must then be listed in
``static_args``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.adapters import (ADAPTER_KEYS, FrozenLayout, LayerLeaves, Scale, adapted_layers,
                                        check_merge_args, concrete, leaf_index, scale_of)

__all__ = [
    'PRUNE_METHODS',
    'ReLoRAState',
    'relora',
    'adapted_layer_paths',
    'prune_leaf',
]

PRUNE_METHODS = ('magnitude', 'random', 'reset')

# Role of each params leaf.
_OTHER, _KERNEL, _A, _B = 'other', 'kernel', 'lora_a', 'lora_b'

# Separate random streams derived from (seed, merge index).
_REDRAW_STREAM, _PRUNE_STREAM = 0, 1


class ReLoRAState(NamedTuple):
  """State of :func:`relora`.

  ``count``: int32 scalar, updates made so far (merges happen when it reaches
  a multiple of ``merge_every``). ``inner_state``: the inner optimizer's state
  over the params with adapted kernels masked out (``optax.MaskedNode``).
  """

  count: jax.Array
  inner_state: Any


# --------------------------------------------------------------------------- #
# Structure
# --------------------------------------------------------------------------- #


class _Layout(NamedTuple):
  treedef: Any  # of the full params
  roles: tuple[str, ...]  # per params leaf
  layers: tuple[LayerLeaves, ...]

  @property
  def frozen(self) -> FrozenLayout:
    """The adapted kernels, hidden from the inner optimizer."""
    return FrozenLayout(self.treedef, tuple(r == _KERNEL for r in self.roles))


def _layout(params, adapter_keys, layer_filter) -> _Layout:
  kernel_key, a_key, b_key = adapter_keys
  path_leaves, treedef, index = leaf_index(params)
  roles = [_OTHER] * len(path_leaves)
  layers = []
  for names, node in adapted_layers(params, adapter_keys, layer_filter):
    idx = {}
    for role, key in ((_KERNEL, kernel_key), (_A, a_key), (_B, b_key)):
      leaf_path = names + (str(key),)
      if leaf_path not in index:
        raise ValueError(
            f'relora: adapted layer {"/".join(names)!r}: {key!r} must be a single array '
            f'leaf, got {type(node[key]).__name__}')
      idx[role] = index[leaf_path]
    leaves = [path_leaves[idx[r]][1] for r in (_KERNEL, _A, _B)]
    shapes = [tuple(jnp.shape(x)) for x in leaves]
    k_shape, a_shape, b_shape = shapes
    if (len(k_shape) < 2 or len(a_shape) != len(k_shape) or len(b_shape) != len(k_shape)
        or a_shape[-2] != k_shape[-2] or b_shape[-1] != k_shape[-1]
        or a_shape[-1] != b_shape[-2] or a_shape[:-2] != k_shape[:-2]
        or b_shape[:-2] != k_shape[:-2]):
      raise ValueError(
          f'relora: adapted layer {"/".join(names)!r} has inconsistent shapes '
          f'kernel {k_shape}, lora_a {a_shape}, lora_b {b_shape}; expected '
          '(..., in, out), (..., in, r), (..., r, out)')
    for role in (_KERNEL, _A, _B):
      roles[idx[role]] = role
    layers.append(LayerLeaves(names, idx[_KERNEL], idx[_A], idx[_B]))
  return _Layout(treedef, tuple(roles), tuple(layers))


def adapted_layer_paths(params, *, adapter_keys: Sequence[str] = ADAPTER_KEYS,
                        layer_filter=None) -> list[str]:
  """'/'-joined paths of the layers :func:`relora` treats as adapted (for checks / logging)."""
  layout = _layout(params, tuple(adapter_keys), layer_filter)
  return ['/'.join(l.path) for l in layout.layers]


# --------------------------------------------------------------------------- #
# Pruning
# --------------------------------------------------------------------------- #


def prune_mask(x: jax.Array, method: str, ratio, key: jax.Array | None = None) -> jax.Array:
  """Which entries of ``x`` survive pruning (bool, same shape). ``ratio`` may be traced.

  ``'magnitude'`` keeps exactly the largest ``round((1 - ratio) * n)`` by ``|x|``
  (ties broken by position), ``'random'`` keeps each entry with probability
  ``1 - ratio`` (``key`` needed), ``'reset'`` keeps nothing.
  """
  if method == 'reset':
    return jnp.zeros(x.shape, bool)
  if method == 'random':
    if key is None:
      raise ValueError("prune_mask: 'random' needs a key")
    return jax.random.uniform(key, x.shape, jnp.float32) >= ratio
  if method == 'magnitude':
    n = x.size
    if n == 0:
      return jnp.ones(x.shape, bool)
    n_prune = jnp.clip(jnp.round(jnp.asarray(ratio, jnp.float32) * n), 0, n).astype(jnp.int32)
    mag = jnp.abs(x).reshape(-1).astype(jnp.float32)
    order = jnp.argsort(mag, stable=True)  # ascending: smallest first
    rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
    return (rank >= n_prune).reshape(x.shape)
  raise ValueError(f'unknown prune method {method!r}; valid: {list(PRUNE_METHODS)}')


def prune_leaf(x: jax.Array, method: str, ratio, key: jax.Array | None = None) -> jax.Array:
  """``x`` with the entries :func:`prune_mask` drops set to zero."""
  return jnp.where(prune_mask(x, method, ratio, key), x, jnp.zeros_like(x))


def _prune_inner_state(inner_state, masked_treedef, masked_roles, masked_shapes,
                       method, ratio, key):
  """Prunes the adapter entries of every params-shaped sub-tree (moment) of ``inner_state``.

  Pruning removes *coordinates*: one mask per adapter leaf, applied to all of
  its moments (Adam's mu and nu alike). The mask comes from the first moment
  found (Adam's mu) for ``'magnitude'``, or from one random draw. Pruning each
  moment on its own, as the official code does, leaves coordinates whose
  momentum survives while their second moment is zeroed; right after a merge
  B = 0 makes A's gradient exactly zero, so such a coordinate's Adam update is
  ``mu / eps`` and the model blows up on the first step after the merge.
  """
  n_leaves = len(masked_roles)

  def is_param_tree(node):
    if isinstance(node, optax.MaskedNode):
      return False
    try:
      leaves, treedef = jax.tree.flatten(node)
    except Exception:  # pylint: disable=broad-except
      return False
    if len(leaves) != n_leaves or treedef != masked_treedef:
      return False
    return all(tuple(jnp.shape(x)) == s for x, s in zip(leaves, masked_shapes))

  moments = [n for n in jax.tree.leaves(inner_state, is_leaf=is_param_tree) if is_param_tree(n)]
  if not moments:
    return inner_state
  reference = jax.tree.leaves(moments[0])
  masks = {i: prune_mask(reference[i], method, ratio, jax.random.fold_in(key, i))
           for i, role in enumerate(masked_roles) if role in (_A, _B)}

  def visit(node):
    if not is_param_tree(node):
      return node
    leaves, treedef = jax.tree.flatten(node)
    return jax.tree.unflatten(treedef, [jnp.where(masks[i], x, jnp.zeros_like(x)) if i in masks else x
                                        for i, x in enumerate(leaves)])

  return jax.tree.map(visit, inner_state, is_leaf=is_param_tree)


# --------------------------------------------------------------------------- #
# The transform
# --------------------------------------------------------------------------- #


def freeze_adapted_kernels(
    inner: optax.GradientTransformation,
    *,
    adapter_keys: Sequence[str] = ADAPTER_KEYS,
    layer_filter: Callable[[tuple[str, ...], Any], bool] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """LoRA training: ``inner`` on every leaf except the kernels of adapted layers.

  Adapted layers are found as in :func:`relora` (a mapping holding the three
  ``adapter_keys``). Their kernels get an update of exactly zero and the inner
  optimizer never sees them, so it keeps no moments for them: the optimizer
  state is that of the adapters plus the non-adapted leaves (embeddings, norms,
  a dense head). :func:`relora` is this plus the periodic merge.

  Example::

    tx = freeze_adapted_kernels(optax.adamw(1e-3))
    state = tx.init(params)  # params hold {'kernel', 'lora_a', 'lora_b'} layers
    updates, state = tx.update(grads, state, params)
  """
  adapter_keys = tuple(adapter_keys)
  inner = optax.with_extra_args_support(inner)

  def with_kernel(names, node):
    # A kernel stored frozen and quantized (QLoRA: `int8_weight.trainable_view` gives None there) is
    # not in the optimizer's tree at all: nothing to freeze, its adapters are plain leaves.
    return node[adapter_keys[0]] is not None and (layer_filter is None or layer_filter(names, node))

  def layout_of(params):
    if params is None:
      raise ValueError('freeze_adapted_kernels: update needs params (tx.update(grads, state, params))')
    if not adapted_layers(params, adapter_keys, layer_filter):
      raise ValueError(f'no adapted layer (a mapping with keys {list(adapter_keys)}) found in params')
    return _layout(params, adapter_keys, with_kernel)

  def init_fn(params):
    return inner.init(layout_of(params).frozen.hide(params, 'relora'))

  def update_fn(updates, state, params=None, **extra_args):
    frozen = layout_of(params).frozen
    inner_updates, state = inner.update(
        frozen.hide(updates, 'relora'), state, frozen.hide(params, 'relora'), **extra_args)
    return frozen.zero_hidden(updates, inner_updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def relora(
    inner: optax.GradientTransformation,
    merge_every: int,
    *,
    scale: Scale,
    prune: str = 'magnitude',
    prune_ratio: float = 0.99,
    seed: int = 0,
    adapter_keys: Sequence[str] = ADAPTER_KEYS,
    layer_filter: Callable[[tuple[str, ...], Any], bool] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """ReLoRA around ``inner`` (see the module docstring for the exact behaviour).

  Args:
    inner: the optimizer of the trainable leaves (adapters and non-adapted
      leaves), learning rate included, e.g. ``optax.adamw(schedule)``.
    merge_every: merge after every ``merge_every`` updates (>= 1).
    scale: the LoRA scale ``alpha / rank`` used to merge: a number for all
      layers, a mapping ``'/'.join(layer path) -> scale`` or a callable
      ``layer path (tuple of str) -> scale``. The layer path is the path of
      the mapping holding ``kernel`` / ``lora_a`` / ``lora_b``, e.g.
      ``('layers', '0', 'attn', 'q')``.
    prune: ``'magnitude'``, ``'random'`` or ``'reset'``: what happens to the
      inner optimizer's moments of ``lora_a`` / ``lora_b`` at each merge.
    prune_ratio: fraction of each moment leaf zeroed, in ``[0, 1]``.
    seed: seeds the re-draws of ``lora_a`` and the random pruning (folded with
      the merge index, so every merge draws differently).
    adapter_keys: names of the (kernel, A, B) entries of an adapted layer.
    layer_filter: optional ``(path, node) -> bool``; adapted-looking layers for
      which it returns False are trained as ordinary leaves.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`ReLoRAState`; its ``update`` requires ``params``.
  """
  if prune not in PRUNE_METHODS:
    raise ValueError(f'relora: prune must be one of {list(PRUNE_METHODS)}, got {prune!r}')
  check_merge_args('relora', merge_every, scale)
  pr = concrete(prune_ratio)
  if pr is not None and not 0.0 <= pr <= 1.0:
    raise ValueError(f'relora: prune_ratio must be in [0, 1], got {prune_ratio!r}')
  adapter_keys = tuple(adapter_keys)
  if len(adapter_keys) != 3 or len(set(adapter_keys)) != 3:
    raise ValueError(f'relora: adapter_keys must be 3 distinct keys, got {adapter_keys!r}')
  inner = optax.with_extra_args_support(inner)

  frozen = freeze_adapted_kernels(inner, adapter_keys=adapter_keys, layer_filter=layer_filter)

  def get_layout(params):
    if params is None:
      raise ValueError('relora: update needs params (tx.update(grads, state, params))')
    layout = _layout(params, adapter_keys, layer_filter)
    if not layout.layers:
      raise ValueError(
          f'relora: no adapted layer (a mapping with keys {list(adapter_keys)}) '
          'found in params')
    return layout

  def init_fn(params):
    layout = get_layout(params)
    for layer in layout.layers:  # fail early on a missing per-layer scale
      scale_of(scale, layer.path, 'relora')
    return ReLoRAState(count=jnp.zeros([], jnp.int32), inner_state=frozen.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    layout = get_layout(params)
    p_leaves = jax.tree.leaves(params)
    g_leaves = jax.tree.leaves(updates)
    if len(g_leaves) != len(p_leaves):
      raise ValueError(f'relora: updates have {len(g_leaves)} leaves, params {len(p_leaves)}')

    # Between merges ReLoRA is plain LoRA training.
    frozen_updates, inner_state = frozen.update(updates, state.inner_state, params, **extra_args)
    upd = jax.tree.leaves(frozen_updates)
    masked_params = layout.frozen.hide(params, 'relora')

    count = optax.safe_increment(state.count)
    merge_index = count // jnp.asarray(merge_every, count.dtype)
    is_merge = count % jnp.asarray(merge_every, count.dtype) == 0

    masked_leaves, masked_treedef = jax.tree.flatten(masked_params)
    masked_roles = [r for r in layout.roles if r != _KERNEL]
    masked_shapes = [tuple(jnp.shape(x)) for x in masked_leaves]

    def merge(operand):
      upd, inner_state = operand
      upd = list(upd)
      key = jax.random.fold_in(jax.random.PRNGKey(seed), merge_index)
      redraw_key = jax.random.fold_in(key, _REDRAW_STREAM)
      prune_key = jax.random.fold_in(key, _PRUNE_STREAM)
      for li, layer in enumerate(layout.layers):
        a, b = p_leaves[layer.a], p_leaves[layer.b]
        a1 = (a + upd[layer.a]).astype(a.dtype)  # what apply_updates would give
        b1 = (b + upd[layer.b]).astype(b.dtype)
        s = jnp.asarray(scale_of(scale, layer.path, 'relora'), jnp.float32)
        delta = s * jnp.matmul(a1.astype(jnp.float32), b1.astype(jnp.float32),
                               precision=jax.lax.Precision.HIGHEST)
        upd[layer.kernel] = delta.astype(upd[layer.kernel].dtype)
        a_new = _redraw_a(jax.random.fold_in(redraw_key, li), a.shape, a.dtype)
        upd[layer.a] = (a_new.astype(jnp.float32) - a.astype(jnp.float32)).astype(
            upd[layer.a].dtype)
        upd[layer.b] = (-b).astype(upd[layer.b].dtype)
      inner_state = _prune_inner_state(inner_state, masked_treedef, masked_roles,
                                       masked_shapes, prune, prune_ratio, prune_key)
      return upd, inner_state

    upd, inner_state = jax.lax.cond(is_merge, merge, lambda operand: operand,
                                    (upd, inner_state))
    return (jax.tree.unflatten(jax.tree.structure(updates), upd),
            ReLoRAState(count=count, inner_state=inner_state))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _redraw_a(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
  """Kaiming-uniform(a=sqrt(5)) for ``(..., in, r)``: ``U(-1/sqrt(in), 1/sqrt(in))``.

  The same distribution as ``lowrank_jax.nn.lora.lora_a_init`` (not imported:
  ``optim`` does not depend on ``nn``).
  """
  bound = 1.0 / math.sqrt(shape[-2])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
