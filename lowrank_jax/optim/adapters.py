"""Where the adapters are: the layout of LoRA-style layers in a params tree.

An *adapted layer* is any mapping node of the params holding a kernel and its
adapter factors side by side (``kernel``, ``lora_a``, ``lora_b`` by default: what
``nnx.to_pure_dict`` gives for ``lowrank_jax.nn.LoRALinear`` and
``MultiHeadLoRALinear``). The adapter transforms (:func:`~lowrank_jax.optim.relora`,
:func:`~lowrank_jax.optim.freeze_adapted_kernels`, :func:`~lowrank_jax.optim.lte_merge`)
and the trainer's parameter counts find them with these helpers, so the rule is
written once.

A :class:`FrozenLayout` marks the leaves an inner optimizer must not see (adapted
kernels, LTE's snapshots): :meth:`FrozenLayout.hide` replaces them with
``optax.MaskedNode()`` (so the inner state holds no moments for them) and
:meth:`FrozenLayout.zero_hidden` puts exact zeros back in their place.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import optax

__all__ = ['ADAPTER_KEYS', 'FrozenLayout', 'LayerLeaves', 'Scale', 'adapted_layers', 'check_merge_args', 'concrete',
           'is_adapted', 'leaf_index', 'path_names', 'scale_of']

ADAPTER_KEYS: tuple[str, ...] = ('kernel', 'lora_a', 'lora_b')

# A merge scale: one number, one per layer path ('/'-joined), or a function of the path.
Scale = Union[float, Mapping[str, float], Callable[[tuple[str, ...]], float]]

LayerFilter = Callable[[tuple[str, ...], Any], bool]


def _key_name(entry: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """A pytree key path as plain names: ``(DictKey('layers'), SequenceKey(0)) -> ('layers', '0')``."""
  return tuple(_key_name(e) for e in path)


def is_adapted(node: Any, keys: Sequence[str] = ADAPTER_KEYS) -> bool:
  """Whether ``node`` is an adapted layer: a mapping holding every one of ``keys``."""
  return isinstance(node, Mapping) and all(k in node for k in keys)


def adapted_layers(params: Any, keys: Sequence[str] = ADAPTER_KEYS,
                   layer_filter: LayerFilter | None = None) -> list[tuple[tuple[str, ...], Mapping]]:
  """Every adapted layer of ``params`` as (path names, node), in tree order.

  ``layer_filter(path_names, node) -> bool`` excludes some (they then count as plain leaves).
  """
  keys = tuple(keys)
  is_layer = lambda node: is_adapted(node, keys)  # noqa: E731
  nodes, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_layer)
  out = []
  for path, node in nodes:
    if not is_layer(node):
      continue
    names = path_names(path)
    if layer_filter is None or layer_filter(names, node):
      out.append((names, node))
  return out


def leaf_index(params: Any) -> tuple[list[tuple[Any, Any]], Any, dict[tuple[str, ...], int]]:
  """(flat (path, leaf) pairs, treedef, {path names: flat index}) of ``params``."""
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  return path_leaves, treedef, {path_names(p): i for i, (p, _) in enumerate(path_leaves)}


class LayerLeaves(NamedTuple):
  """Where one adapted layer's arrays are among the flat params leaves."""
  path: tuple[str, ...]
  kernel: int  # flat leaf indices into the params leaves
  a: int
  b: int
  v_a: int = -1  # LTE's snapshots of the heads at the last merge (-1: none)
  v_b: int = -1


class FrozenLayout(NamedTuple):
  """Which leaves of a params-shaped tree the inner optimizer never sees."""
  treedef: Any  # of the full params
  frozen: tuple[bool, ...]  # per params leaf

  def hide(self, tree: Any, who: str = 'adapters') -> Any:
    """``tree`` (params, gradients or updates) with the frozen leaves replaced by ``optax.MaskedNode()``."""
    leaves = jax.tree.leaves(tree)
    if len(leaves) != len(self.frozen):
      raise ValueError(f'{who}: tree has {len(leaves)} leaves, params have {len(self.frozen)}')
    leaves = [optax.MaskedNode() if f else x for x, f in zip(leaves, self.frozen)]
    return jax.tree.unflatten(self.treedef, leaves)

  def zero_hidden(self, updates: Any, inner_updates: Any) -> Any:
    """A tree like ``updates``: ``inner_updates`` where visible, exact zeros at the frozen leaves."""
    inner = iter(jax.tree.leaves(inner_updates))
    leaves = [jnp.zeros_like(g) if f else next(inner) for g, f in zip(jax.tree.leaves(updates), self.frozen)]
    return jax.tree.unflatten(jax.tree.structure(updates), leaves)


def scale_of(scale: Scale, path: tuple[str, ...], who: str = 'adapters'):
  """The merge scale of the layer at ``path``."""
  if isinstance(scale, Mapping):
    key = '/'.join(path)
    if key not in scale:
      raise ValueError(f'{who}: no scale given for layer {key!r}; scale has keys {sorted(scale)}')
    return scale[key]
  if callable(scale):
    return scale(path)
  return scale


def check_merge_args(who: str, merge_every: Any, scale: Scale) -> None:
  """The arguments every merging transform shares: a positive integer period and a finite scale.

  Traced values (under ``inject_hyperparams``) are checked where they are concrete only.
  """
  me = concrete(merge_every)
  if me is not None and (isinstance(merge_every, bool) or me < 1 or me != int(me)):
    raise ValueError(f'{who}: merge_every must be a positive integer, got {merge_every!r}')
  if not (isinstance(scale, Mapping) or callable(scale)):
    s = concrete(scale)
    if s is not None and not math.isfinite(s):
      raise ValueError(f'{who}: scale must be finite, got {scale!r}')


def concrete(x: Any) -> float | None:
  """Python value of ``x``, or None when traced (to check arguments that may be traced)."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None
