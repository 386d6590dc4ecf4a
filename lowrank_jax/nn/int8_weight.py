"""Trainable weights stored in int8 (`model.weight_bits=8`), updated with stochastic rounding.

Q-GaLore (Zhang et al., 2024, https://arxiv.org/abs/2407.08296) and Q-APOLLO keep the weights of
a 7B model in int8 during pre-training. An update much smaller than the int8 step would be lost to
round-to-nearest; stochastic rounding keeps it on average: a value ``x`` between codes ``k`` and
``k + 1`` becomes ``k + 1`` with probability ``x - k``, so the expected stored weight is the float
weight after the update.

An :class:`Int8Weight` holds a ``[rows, cols]`` kernel (or embedding) as int8 codes plus float32
scales (symmetric absmax: ``w ~= codes * scale``, ``scale = absmax / 127``): a kernel's one per
output column by default (an embedding's one per token), or one per block of ``block_size``
consecutive rows of a column. Per column is the default because it is what fits: compiled for a
TPU v5e, the blocked layout's reshapes made the update's temporaries larger than with bf16 weights
(bench/memory_fit.py, section int8). It stands where the float array stood in a model's parameter
dict. A layer reads it as it reads any Variable, ``kernel[...]``, which
dequantizes right there: each layer's float kernel exists only while that layer runs (and is
recomputed in the backward pass under remat), never the whole model's.

The gradient with respect to the dequantized weight comes out through a *carrier*: a float
array of the weight's shape that the forward never reads, whose cotangent is the weight's
gradient (``W = dequantize(codes, scale) + carrier`` with ``carrier = 0``, without the add).
:func:`differentiable_view` gives the tree to differentiate (carriers where weights are int8,
the arrays elsewhere), :func:`attach` puts the carriers into the weights for the forward, and
:func:`value_and_grad` wraps both. :func:`apply_updates` is ``optax.apply_updates`` that
requantizes the int8 leaves with stochastic rounding, keyed by a uint32 seed (the trainer's:
its run seed and step, so a resumed run draws the same roundings).

Frozen quantized bases (:class:`lowrank_jax.nn.quantized_base.QuantizedBase`, ``model.base_bits``: the NF4 or
int8 kernels under LoRA adapters, QLoRA) ride in the same trees but are never differentiated nor updated:
:func:`differentiable_view` and :func:`trainable_view` leave them out (``None``: no gradient, no optimizer state, no
update), :func:`float_view` dequantizes them (an export), and :func:`apply_updates` keeps them as they are.

In your own Optax loop (the same with frozen quantized bases in ``params``)::

  params = int8_weight.quantize_tree(params)                       # once
  opt_state = tx.init(int8_weight.trainable_view(params))
  loss, grads = int8_weight.value_and_grad(loss_fn)(params, batch)  # loss_fn(params, batch)
  updates, opt_state = tx.update(grads, opt_state, int8_weight.trainable_view(params))
  params = int8_weight.apply_updates(params, updates, seed=step)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

#: Rows per scale block; None: one block per column (all rows). A leaf with fewer rows than a
#: block has one block per column.
DEFAULT_BLOCK_SIZE = None
_QMAX = 127


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
  """A 2-D weight as int8 ``codes`` [rows, cols] and float32 ``scale``.

  A scale spans ``block_size`` consecutive elements along ``axis`` (None: the whole axis). Kernels
  [in, out] use ``axis=0``: ``scale`` [ceil(rows / block_size), cols], one per output column (block
  None). Embeddings [vocab, d] use ``axis=1``: ``scale`` [rows, ceil(cols / block_size)], one per
  token, so a rare token's row is not coded on the scale of the largest one.

  ``dtype`` is the float dtype it reads as (the model's ``param_dtype``). ``carrier`` is None when
  stored; inside a differentiated forward it is the float array that receives the gradient.
  """

  codes: jax.Array
  scale: jax.Array
  carrier: Any = None
  dtype: str = dataclasses.field(default='float32', metadata=dict(static=True))
  block_size: int | None = dataclasses.field(default=DEFAULT_BLOCK_SIZE, metadata=dict(static=True))
  axis: int = dataclasses.field(default=0, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The float weight (``dtype``: default the stored one), with the carrier's gradient path."""
    dtype = jnp.dtype(dtype or self.dtype)
    if self.carrier is None:
      return _dequantize(self.codes, self.scale, self.block_size, self.axis).astype(dtype)
    return _dequantize_carried(self.block_size, self.axis, dtype)(self.codes, self.scale, self.carrier)

  def __getitem__(self, index: Any) -> jax.Array:
    # What `nnx.Variable.__getitem__` calls: `kernel[...]` in a layer reads the float weight.
    w = self.dequantize()
    return w if index is Ellipsis else w[index]


def is_int8(x: Any) -> bool:
  return isinstance(x, Int8Weight)


def _is_base(x: Any) -> bool:
  """A frozen stored weight (a ``QuantizedBase``, whose class declares ``FROZEN_STORED``; named by that
  mark, not imported: quantized_base builds on this module)."""
  return getattr(type(x), 'FROZEN_STORED', False) is True


def is_stored(x: Any) -> bool:
  """A weight stored quantized: an :class:`Int8Weight` or a frozen ``QuantizedBase`` (one leaf of a params tree)."""
  return isinstance(x, Int8Weight) or _is_base(x)


def _blocks(n: int, block_size: int | None) -> tuple[int, int]:
  """(number of blocks, elements per block) along an axis of length n."""
  b = int(n) if block_size is None else min(int(block_size), int(n))
  return math.ceil(n / b), b


def _expand(per_block: jax.Array, shape: tuple[int, int], block_size: int | None, axis: int) -> jax.Array:
  """Each block's value on its elements: [nb, cols] (axis 0) or [rows, nb] (axis 1) -> ``shape``.
  A broadcast and a reshape, which XLA fuses into the consumer (``jnp.repeat`` is a gather: a
  materialised array of the weight's shape)."""
  nb, b = _blocks(shape[axis], block_size)
  if axis == 0:
    return jnp.broadcast_to(per_block[:, None, :], (nb, b, shape[1])).reshape(nb * b, shape[1])[:shape[0]]
  return jnp.broadcast_to(per_block[:, :, None], (shape[0], nb, b)).reshape(shape[0], nb * b)[:, :shape[1]]


def _block_reduce(x: jax.Array, block_size: int | None, axis: int, reduce: Callable) -> jax.Array:
  """``reduce`` over each block of ``x`` along ``axis``: [nb, cols] (axis 0) or [rows, nb] (axis 1)."""
  nb, b = _blocks(x.shape[axis], block_size)
  pad = nb * b - x.shape[axis]
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)) if axis == 0 else ((0, 0), (0, pad)))
  if axis == 0:
    return reduce(x.reshape(nb, b, x.shape[1]), axis=1)
  return reduce(x.reshape(x.shape[0], nb, b), axis=2)


def _dequantize(codes: jax.Array, scale: jax.Array, block_size: int | None, axis: int) -> jax.Array:
  return codes.astype(jnp.float32) * _expand(scale, codes.shape, block_size, axis)


@functools.cache  # one custom_vjp per layout, not a new one at every read
def _dequantize_carried(block_size: int | None, axis: int, dtype: Any) -> Callable:
  @jax.custom_vjp
  def f(codes, scale, carrier):
    del carrier  # never read: only its cotangent matters
    return _dequantize(codes, scale, block_size, axis).astype(dtype)

  def fwd(codes, scale, carrier):
    return f(codes, scale, carrier), None

  def bwd(_, g):
    return None, None, g.astype(dtype)

  f.defvjp(fwd, bwd)
  return f


# --- the dither: a counter-based hash, so rounding is cheap, elementwise and reproducible ------

def _mix(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer (a bijection of uint32 with full avalanche)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def uniform_dither(seed: Any, shape: tuple[int, ...]) -> jax.Array:
  """float32 values in [0, 1) of ``shape``, a function of the uint32 ``seed`` and each element's
  flat index (24 random bits each). Elementwise integer arithmetic: XLA fuses it into the
  rounding, so no random array of the weight's size is ever stored."""
  seed = jnp.asarray(seed, jnp.uint32)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
    stride *= shape[axis]
  h = _mix(_mix(index ^ _mix(seed)) + seed * jnp.uint32(0x9E3779B9))
  return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def step_seed(key_data: Any, step: Any) -> jax.Array:
  """A uint32 seed for one step's roundings from a run's uint32 key data and its step count."""
  words = jnp.ravel(jnp.asarray(key_data)).astype(jnp.uint32)
  seed = _mix(jnp.asarray(step).astype(jnp.uint32) + jnp.uint32(0x6A09E667))
  for i in range(words.shape[0]):
    seed = _mix(seed ^ words[i])
  return seed


def leaf_seed(seed: Any, index: int) -> jax.Array:
  """The seed of the ``index``-th leaf under a step's ``seed``."""
  return _mix(jnp.asarray(seed, jnp.uint32) ^ _mix(jnp.uint32(index * 0x9E3779B9 % 2**32 + 1)))


# --- quantize ---------------------------------------------------------------------------------

def quantize(w: jax.Array, block_size: int | None = DEFAULT_BLOCK_SIZE, *, seed: Any = None,
             dtype: Any = None, axis: int = 0) -> Int8Weight:
  """``w`` [rows, cols] as an :class:`Int8Weight`: round to nearest, or stochastically with ``seed``.

  Scales span ``block_size`` elements along ``axis`` (None: the whole axis). ``dtype`` (default
  ``w``'s) is the float dtype the weight reads as.
  """
  if w.ndim != 2:
    raise ValueError(f'int8 weights are 2-D [rows, cols], got shape {w.shape}')
  if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                 or block_size <= 0):
    raise ValueError(f'block_size must be a positive integer or None (the whole axis), got {block_size!r}')
  if axis not in (0, 1):
    raise ValueError(f'axis must be 0 (a scale per column) or 1 (per row), got {axis!r}')
  block_size = None if block_size is None else int(block_size)
  x = w.astype(jnp.float32)
  scale = _block_reduce(jnp.abs(x), block_size, axis, jnp.max) / _QMAX
  x = x / _expand(jnp.where(scale > 0, scale, 1.0), x.shape, block_size, axis)
  q = jnp.round(x) if seed is None else jnp.floor(x + uniform_dither(seed, x.shape))
  codes = jnp.clip(q, -_QMAX, _QMAX).astype(jnp.int8)
  return Int8Weight(codes, scale, dtype=jnp.dtype(dtype or w.dtype).name, block_size=block_size, axis=axis)


def updated(w: Int8Weight, update: jax.Array, seed: Any) -> Int8Weight:
  """``w + update`` requantized with stochastic rounding. A block the update leaves at zero keeps
  its codes and scale exactly (a frozen kernel, a masked leaf, a skipped step stay bit-identical)."""
  new = quantize(w.dequantize(jnp.float32) + update.astype(jnp.float32), w.block_size, seed=seed, dtype=w.dtype,
                 axis=w.axis)
  changed = _block_reduce(update != 0, w.block_size, w.axis, jnp.any)
  return Int8Weight(jnp.where(_expand(changed, w.shape, w.block_size, w.axis), new.codes, w.codes),
                    jnp.where(changed, new.scale, w.scale), dtype=w.dtype, block_size=w.block_size, axis=w.axis)


# --- trees ------------------------------------------------------------------------------------

def default_select(path: tuple, leaf: Any) -> int | None:
  """Which leaves ``quantize_tree`` stores in int8, and the axis their scales span: 2-D ``kernel``
  leaves (every linear and the head, [in, out]: a scale per output column, axis 0) and
  ``embedding`` leaves ([vocab, d]: a scale per token, axis 1); None for the rest (adapters, norms,
  biases, snapshots)."""
  name = getattr(path[-1], 'key', getattr(path[-1], 'name', None)) if path else None
  if getattr(leaf, 'ndim', 0) != 2:
    return None
  return {'kernel': 0, 'embedding': 1}.get(name)


def quantize_tree(params: Any, block_size: int | None = DEFAULT_BLOCK_SIZE,
                  select: Callable[[tuple, Any], int | None] = default_select) -> Any:
  """``params`` with the leaves ``select(path, leaf)`` gives an axis for replaced by
  :class:`Int8Weight` (rounded to nearest)."""
  def one(path, x):
    axis = None if is_int8(x) else select(path, x)
    return x if axis is None else quantize(x, block_size, axis=axis)

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_int8)


def float_view(params: Any) -> Any:
  """``params`` with every :class:`Int8Weight` dequantized: what an optimizer's ``init`` / ``update``
  and an export see. Under jit each leaf is computed where it is used (weight decay fuses it)."""
  return jax.tree.map(lambda x: x.dequantize() if is_stored(x) else x, params, is_leaf=is_stored)


Frozen = Callable[[tuple[str, ...]], bool]  # a leaf's key names -> never trained (no gradient, no state)


def _names(path: tuple) -> tuple[str, ...]:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _left_out(path: tuple, x: Any, frozen: Frozen | None) -> bool:
  """A leaf the optimizer never sees: a frozen quantized base, or one ``frozen`` names."""
  return _is_base(x) or (frozen is not None and frozen(_names(path)))


def trainable_view(params: Any, frozen: Frozen | None = None) -> Any:
  """What an optimizer sees: :func:`float_view` without the frozen quantized bases and the leaves
  ``frozen(key names)`` marks (``None`` there: no gradient, no state, no update; a method that trains
  the adapters alone says which, so the embeddings' gradients are never computed). Gradients from
  :func:`value_and_grad` are shaped like it."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: None if _left_out(path, x, frozen) else x.dequantize() if is_int8(x) else x,
      params, is_leaf=is_stored)


def has_int8(params: Any) -> bool:
  return any(is_int8(x) for x in jax.tree.leaves(params, is_leaf=is_int8))


def differentiable_view(params: Any, frozen: Frozen | None = None) -> Any:
  """The tree to differentiate: a zero carrier in the weight's float dtype for each
  :class:`Int8Weight`, the leaf itself elsewhere. It has the structure of :func:`trainable_view`
  (gradients, updates and optimizer states are shaped like it): None for a frozen quantized base
  and for the leaves ``frozen`` marks, which get no gradient."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: None if _left_out(path, x, frozen) else jnp.zeros(x.shape, x.dtype) if is_int8(x) else x,
      params, is_leaf=is_stored)


def attach(params: Any, view: Any) -> Any:
  """The model's parameters for a differentiated forward: int8 weights carrying ``view``'s
  carriers, ``view``'s leaves elsewhere, and where ``view`` has None (a leaf left out of the
  gradient) the parameter itself, a constant of the differentiated function."""
  leaves, treedef = jax.tree.flatten(params, is_leaf=is_stored)
  out = [p if v is None else dataclasses.replace(p, carrier=v) if is_int8(p) else v
         for p, v in zip(leaves, treedef.flatten_up_to(view))]
  return jax.tree.unflatten(treedef, out)


def read_once(module: Any) -> Any:
  """A view of an NNX ``module`` whose int8 weights are read (dequantized, gradient path kept) here,
  once: for a module called inside a loop (``lax.scan``), where each weight would otherwise be
  read per iteration and its carrier would be a loop operand, an array that must exist. A module
  without int8 weights is returned as it is."""
  graphdef, state = nnx.split(module)
  if not has_int8(state):
    return module
  return nnx.merge(graphdef, jax.tree.map(lambda x: x.dequantize() if is_int8(x) else x, state, is_leaf=is_int8))


def value_and_grad(fun: Callable, has_aux: bool = False, frozen: Frozen | None = None) -> Callable:
  """``jax.value_and_grad(fun)`` for ``fun(params, *args)`` whose params may hold int8 weights: the
  gradients are those of the dequantized weights (shaped like :func:`trainable_view`, with the same
  ``frozen``: no gradient is computed for what it marks)."""
  def carried(view, params, *args, **kwargs):
    return fun(attach(params, view), *args, **kwargs)

  grad_fn = jax.value_and_grad(carried, has_aux=has_aux)
  return lambda params, *args, **kwargs: grad_fn(differentiable_view(params, frozen), params, *args, **kwargs)


def apply_updates(params: Any, updates: Any, seed: Any, where: Any = None) -> Any:
  """``optax.apply_updates`` where int8 leaves are requantized with stochastic rounding.

  ``updates`` is shaped like :func:`float_view` (``optax.MaskedNode`` / None leaves change
  nothing); ``seed`` a uint32 scalar, each leaf drawing from its own :func:`leaf_seed`. Float
  leaves are ``(p + u).astype(p.dtype)``, as optax does.

  ``where`` (a bool scalar, e.g. "this step's loss is finite"): when False every leaf stays exactly
  as it is. An int8 leaf then takes a zero update (its blocks keep codes and scale bit for bit)
  instead of a select between its new and old codes afterwards: a select would hold every layer's
  new codes until ``where`` is known (measured on a TPU v5e: +1 GiB of a LLaMA 1b GaLore step's
  temporaries), while a zero update lets the new codes overwrite the old ones in place.
  """
  leaves, treedef = jax.tree.flatten(params, is_leaf=is_stored)
  upd = treedef.flatten_up_to(updates)
  out = []
  for i, (p, u) in enumerate(zip(leaves, upd)):
    if u is None or not hasattr(u, 'shape'):
      out.append(p)
    elif is_int8(p):
      out.append(updated(p, u if where is None else jnp.where(where, u, jnp.zeros_like(u)), leaf_seed(seed, i)))
    else:
      new = jnp.asarray(p + u).astype(p.dtype)
      out.append(new if where is None else jnp.where(where, new, p))
  return jax.tree.unflatten(treedef, out)
