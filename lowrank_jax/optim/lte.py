"""LTE (LoRA-the-Explorer; Huh et al., 2024) merges as an Optax ``GradientTransformation``.

LTE trains ``N`` LoRA heads in parallel on a shared main weight ``W`` (each
head on its own part of the batch) and every ``T`` steps averages their
progress into ``W``. This is the *reset-less* variant of the paper (its
appendix; the official code's default): heads are never re-initialised and
the optimizer is never reset; instead each layer remembers every head's
factors at the last merge, ``V_h = A_h^last B_h^last``, and head ``h``'s model
is ``W + s (A_h B_h - V_h)``. The layer is
``lowrank_jax.nn.mhlora.MultiHeadLoRALinear``.

Like :func:`lowrank_jax.optim.relora.relora`, everything happens inside the
update, so a plain jitted train step runs LTE without host-side merge code and
without recompiling (the merge is a ``lax.cond`` on the step count).

Adapted layers
--------------
Found structurally in the params tree: any ``Mapping`` node holding
``kernel`` (..., in, out), ``lora_a`` (..., N, in, r), ``lora_b``
(..., N, r, out), ``lora_v_a`` (like ``lora_a``) and ``lora_v_b`` (like
``lora_b``): the heads are stacked on the axis just before the matrix axes.
(``keys`` renames them.) ``layer_filter(path, node) -> bool`` can exclude
layers (they then train as ordinary leaves). A node with ``kernel`` /
``lora_a`` / ``lora_b`` but no stacked heads or no snapshots (a plain LoRA
layer) is an error unless excluded.

Where ``V`` lives: ``lora_v_a`` / ``lora_v_b`` are parameters of the model
(``LoRASnapshot``, an ``nnx.Param`` subclass that is not an
``nnx.LoRAParam``), in the params tree next to the kernel, so the layer reads
them and this transform writes them, the same way it writes the kernel: by
returning ``new - old`` as their update. The layer stops their gradient.

Behaviour
---------
* **Between merges** ``kernel``, ``lora_v_a`` and ``lora_v_b`` get updates of
  exactly zero and are hidden from the inner optimizer (``optax.MaskedNode``
  in the tree it sees, as ``relora`` hides kernels), so the inner state holds
  no moments for them. ``lora_a``, ``lora_b`` and every leaf outside adapted
  layers (embeddings, norms: the official code's "replica" layers) are
  updated by the inner optimizer exactly as if it were run alone on them.
* **Merge steps**: updates number ``merge_every``, ``2 * merge_every``, ...
  (1-based, after the ordinary update, as ``relora``). With
  ``A'_h = A_h + uA_h``, ``B'_h = B_h + uB_h`` (the inner update, rounded to the
  parameter dtype as ``optax.apply_updates`` would) and the layer scale ``s``:

  - kernel update ``(s / N) sum_h (A'_h B'_h - V_a,h V_b,h)`` (float32,
    highest precision), i.e. ``W <- W + mean_h s (A'_h B'_h - V_h)``;
  - ``lora_v_a`` update ``A' - V_a``, ``lora_v_b`` update ``B' - V_b``: after
    ``apply_updates`` the snapshots hold ``A'``, ``B'`` (``V_h = A'_h B'_h``,
    up to one rounding of ``V + (A' - V)``);
  - ``lora_a`` / ``lora_b`` get their ordinary update; the inner state is
    untouched (no reset, no pruning).

  Right after a merge every head's model ``W + s (A_h B_h - V_h)`` is the new
  ``W``, which is the average of the heads' models just before the merge. The
  average model ``W + mean_h s (A_h B_h - V_h)`` (what ``mode='mhlora'``
  computes) is unchanged by the merge. With ``N = 1`` the model is
  ``W_0 + s A B`` at all times, whatever ``merge_every``: one head with merges
  is exactly LoRA training.

``mode='mhlora'`` layers train with the same transform: between merges they
are multi-head LoRA (the average of the heads), merges fold the average into
``W`` without changing the function.

``lte_merge`` must be the *last* transform of a chain (its updates are final;
the learning rate belongs in ``inner``), and it needs ``params``. Wrap it
*inside* ``optax.MultiSteps`` so that merges count real steps.
``optax.inject_hyperparams(lte_merge)`` works for ``merge_every`` and a numeric
``scale`` (callables must be listed in ``static_args``).

Heads spread over devices
-------------------------
In a per-device program (``jax.shard_map`` or ``jax.pmap``) whose named axis
``axis_name`` splits every layer's heads into equal contiguous blocks (device
``d`` of ``D`` holds heads ``d N/D, ..., (d+1) N/D - 1`` of A, B, V_a, V_b and
their optimizer state, plus a full copy of the kernel), pass ``axis_name``:
the merge sums its own heads' ``A'_h B'_h - V_h`` and all-reduces that one
(in, out) matrix over the axis, dividing by the global ``N``. That ``psum``,
inside the merge branch, is the only communication between heads; between
merges each device updates its heads alone. :func:`lte_head_mask` marks the
split leaves (e.g. for :func:`lowrank_jax.optim.clipping.clip_by_global_norm`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.adapters import (FrozenLayout, LayerLeaves, Scale, adapted_layers, check_merge_args, leaf_index,
                                        scale_of)

__all__ = ['LTE_KEYS', 'LTEState', 'lte_head_mask', 'lte_layer_paths', 'lte_leaf_roles', 'lte_merge']

# (kernel, A, B, snapshot of A, snapshot of B): the variable names of
# lowrank_jax.nn.mhlora.MultiHeadLoRALinear.
LTE_KEYS: tuple[str, ...] = ('kernel', 'lora_a', 'lora_b', 'lora_v_a', 'lora_v_b')


class LTEState(NamedTuple):
  """State of :func:`lte_merge`.

  ``count``: int32 scalar, updates made so far (merges happen when it reaches
  a multiple of ``merge_every``). ``inner_state``: the inner optimizer's state
  over the params with every adapted layer's ``kernel``, ``lora_v_a`` and
  ``lora_v_b`` masked out (``optax.MaskedNode``).
  """

  count: jax.Array
  inner_state: Any


def _heads_layout(params, keys: tuple[str, ...], layer_filter
                  ) -> tuple[tuple[LayerLeaves, ...], FrozenLayout]:
  """The multi-head layers of ``params`` and the layout hiding their kernel and V from the inner optimizer."""
  path_leaves, treedef, index = leaf_index(params)
  frozen = [False] * len(path_leaves)
  layers = []
  for names, node in adapted_layers(params, keys[:3], layer_filter):
    where = '/'.join(names)
    not_heads = ValueError(
        f'lte_merge: layer {where!r} has {list(keys[:3])} but is not a multi-head layer '
        f'(needs {list(keys[3:])} and heads stacked on the adapters: {keys[1]!r} of rank '
        f'kernel rank + 1); exclude it with layer_filter or train it with relora')
    if any(k not in node for k in keys[3:]):
      raise not_heads
    idx = []
    for key in keys:
      leaf_path = names + (str(key),)
      if leaf_path not in index:
        raise ValueError(f'lte_merge: layer {where!r}: {key!r} must be a single array leaf, '
                         f'got {type(node[key]).__name__}')
      idx.append(index[leaf_path])
    k, a, b, va, vb = (tuple(jnp.shape(path_leaves[i][1])) for i in idx)
    if len(a) != len(k) + 1:
      raise not_heads
    if (len(k) < 2 or a[:-3] != k[:-2] or b[:-3] != k[:-2] or a[-3] != b[-3]
        or a[-2] != k[-2] or b[-1] != k[-1] or a[-1] != b[-2] or va != a or vb != b):
      raise ValueError(
          f'lte_merge: layer {where!r} has inconsistent shapes {dict(zip(keys, (k, a, b, va, vb)))}'
          '; expected (..., in, out), (..., N, in, r), (..., N, r, out) and snapshots shaped '
          'as the adapters')
    frozen[idx[0]] = frozen[idx[3]] = frozen[idx[4]] = True
    layers.append(LayerLeaves(names, *idx))
  return tuple(layers), FrozenLayout(treedef, tuple(frozen))


def lte_layer_paths(params, *, keys: Sequence[str] = LTE_KEYS, layer_filter=None) -> list[str]:
  """'/'-joined paths of the layers :func:`lte_merge` treats as multi-head layers."""
  layers, _ = _heads_layout(params, tuple(keys), layer_filter)
  return ['/'.join(l.path) for l in layers]


def lte_leaf_roles(params, *, keys: Sequence[str] = LTE_KEYS, layer_filter=None) -> Any:
  """A tree like ``params`` naming each leaf's role in its multi-head layer.

  Leaves of the layers :func:`lte_merge` merges get their variable's name from
  ``keys`` (``'kernel'``, ``'lora_a'``, ``'lora_b'``, ``'lora_v_a'``,
  ``'lora_v_b'`` by default); every other leaf gets ``''``. Works on any tree
  shaped like the params (gradients, updates).
  """
  keys = tuple(keys)
  layers, mask = _heads_layout(params, keys, layer_filter)
  roles = [''] * len(mask.frozen)
  for layer in layers:
    for key, i in zip(keys, (layer.kernel, layer.a, layer.b, layer.v_a, layer.v_b)):
      roles[i] = key
  return jax.tree.unflatten(mask.treedef, roles)


def lte_head_mask(params, *, keys: Sequence[str] = LTE_KEYS, layer_filter=None) -> Any:
  """A tree of bools like ``params``: True for every head variable (A, B and their snapshots).

  These are the leaves a ``heads`` device axis splits (see "Heads spread over
  devices" in the module docstring); kernels and all other leaves are False.
  """
  keys = tuple(keys)
  return jax.tree.map(lambda role: role in keys[1:],
                      lte_leaf_roles(params, keys=keys, layer_filter=layer_filter))


def lte_merge(
    inner: optax.GradientTransformation,
    merge_every: int,
    *,
    scale: Scale,
    keys: Sequence[str] = LTE_KEYS,
    layer_filter: Callable[[tuple[str, ...], Any], bool] | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Reset-less LTE around ``inner`` (see the module docstring for the exact behaviour).

  Args:
    inner: the optimizer of the trainable leaves (heads' ``lora_a`` /
      ``lora_b`` and non-adapted leaves), learning rate included.
    merge_every: merge after every ``merge_every`` updates (>= 1).
    scale: the heads' LoRA scale ``alpha / rank``: a number, a mapping
      ``'/'.join(layer path) -> scale`` or a callable ``layer path -> scale``
      (the layer path is that of the mapping holding the layer's variables,
      e.g. ``('layers', '0', 'attn', 'q')``).
    keys: names of (kernel, A, B, snapshot of A, snapshot of B).
    layer_filter: optional ``(path, node) -> bool``; layers for which it
      returns False are trained as ordinary leaves.
    axis_name: inside ``shard_map`` / ``pmap`` with the heads split over this
      named axis (each device holding an equal contiguous block of every
      layer's heads), the merge all-reduces the heads' sum over it. ``None``:
      all heads are local.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is an
    :class:`LTEState`; its ``update`` requires ``params``.

  Example (a model of ``lowrank_jax.nn.MultiHeadLoRALinear`` layers with rank
  8 and alpha 32)::

    params = nnx.state(model, nnx.Param)  # kernels, heads and snapshots
    tx = lte_merge(optax.adamw(1e-3), merge_every=10, scale=32 / 8)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  """
  check_merge_args('lte_merge', merge_every, scale)
  keys = tuple(keys)
  if len(keys) != 5 or len(set(keys)) != 5:
    raise ValueError(f'lte_merge: keys must be 5 distinct names, got {keys!r}')
  inner = optax.with_extra_args_support(inner)

  def layout_of(params):
    if params is None:
      raise ValueError('lte_merge: update needs params (tx.update(grads, state, params))')
    layers, mask = _heads_layout(params, keys, layer_filter)
    if not layers:
      raise ValueError(f'lte_merge: no multi-head layer (a mapping with keys {list(keys)}) '
                       'found in params')
    return layers, mask

  def init_fn(params):
    layers, mask = layout_of(params)
    for layer in layers:  # fail early on a missing per-layer scale
      scale_of(scale, layer.path, 'lte_merge')
    return LTEState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(mask.hide(params, 'lte_merge')))

  def update_fn(updates, state, params=None, **extra_args):
    layers, mask = layout_of(params)
    p_leaves = jax.tree.leaves(params)
    g_leaves, g_treedef = jax.tree.flatten(updates)
    if len(g_leaves) != len(p_leaves):
      raise ValueError(f'lte_merge: updates have {len(g_leaves)} leaves, params {len(p_leaves)}')

    # Between merges: the inner optimizer on everything but kernels and snapshots.
    inner_updates, inner_state = inner.update(
        mask.hide(updates, 'lte_merge'), state.inner_state, mask.hide(params, 'lte_merge'), **extra_args)
    upd = jax.tree.leaves(mask.zero_hidden(updates, inner_updates))

    count = optax.safe_increment(state.count)
    is_merge = count % jnp.asarray(merge_every, count.dtype) == 0

    def merge(upd):
      upd = list(upd)
      f32 = lambda x: x.astype(jnp.float32)
      for layer in layers:
        a, b = p_leaves[layer.a], p_leaves[layer.b]
        v_a, v_b = p_leaves[layer.v_a], p_leaves[layer.v_b]
        a1 = (a + upd[layer.a]).astype(a.dtype)  # what apply_updates gives
        b1 = (b + upd[layer.b]).astype(b.dtype)
        n = a.shape[-3]  # this device's heads
        if axis_name is not None:
          n = n * jax.lax.axis_size(axis_name)
        s = jnp.asarray(scale_of(scale, layer.path, 'lte_merge'), jnp.float32)
        # sum_h (A'_h B'_h - V_a,h V_b,h) as one product of rank 2r per head.
        left = jnp.concatenate([f32(a1), f32(v_a)], -1)
        right = jnp.concatenate([f32(b1), -f32(v_b)], -2)
        total = jnp.einsum('...nir,...nro->...io', left, right,
                           precision=jax.lax.Precision.HIGHEST)
        if axis_name is not None:  # the only communication between heads
          total = jax.lax.psum(total, axis_name)
        upd[layer.kernel] = (total * (s / n)).astype(upd[layer.kernel].dtype)
        upd[layer.v_a] = (f32(a1) - f32(v_a)).astype(upd[layer.v_a].dtype)
        upd[layer.v_b] = (f32(b1) - f32(v_b)).astype(upd[layer.v_b].dtype)
      return upd

    upd = jax.lax.cond(is_merge, merge, lambda u: list(u), upd)
    return jax.tree.unflatten(g_treedef, upd), LTEState(count=count, inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
