"""Trainable weights stored in int8 (`model.weight_bits=8`), updated with stochastic rounding.

Q-GaLore (Zhang et al., 2024, https://arxiv.org/abs/2407.08296) and Q-APOLLO keep the weights of
a 7B model in int8 during pre-training. An update much smaller than the int8 step would be lost to
round-to-nearest; stochastic rounding keeps it on average: a value ``x`` between codes ``k`` and
``k + 1`` becomes ``k + 1`` with probability ``x - k``, so the expected stored weight is the float
weight after the update.

An :class:`Int8Weight` holds a ``[rows, cols]`` kernel (or embedding) as int8 codes plus float32
scales (symmetric absmax: ``w ~= codes * scale``, ``scale = absmax / 127``): one per output column
by default, or one per block of ``block_size`` consecutive rows of a column. Per column is the
default because it is what fits: compiled for a TPU v5e, the blocked layout's reshapes made the
update hold about one more float weight per layer than bf16 weights do (bench/memory_fit.py,
section int8). It stands where the float array stood in a
model's parameter dict. A layer reads it as it reads any Variable, ``kernel[...]``, which
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

In your own Optax loop::

  params = int8_weight.quantize_tree(params)                       # once
  opt_state = tx.init(int8_weight.float_view(params))
  loss, grads = int8_weight.value_and_grad(loss_fn)(params, batch)  # loss_fn(params, batch)
  updates, opt_state = tx.update(grads, opt_state, int8_weight.float_view(params))
  params = int8_weight.apply_updates(params, updates, seed=step)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

#: Rows per scale block; None: one block per column (all rows). A leaf with fewer rows than a
#: block has one block per column.
DEFAULT_BLOCK_SIZE = None
_QMAX = 127


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Int8Weight:
  """A 2-D weight as int8 ``codes`` [rows, cols] and float32 ``scale`` [ceil(rows / block_size), cols]
  (block_size None: [1, cols]).

  ``dtype`` is the float dtype it reads as (the model's ``param_dtype``). ``carrier`` is None when
  stored; inside a differentiated forward it is the float array that receives the gradient.
  """

  codes: jax.Array
  scale: jax.Array
  carrier: Any = None
  dtype: str = dataclasses.field(default='float32', metadata=dict(static=True))
  block_size: int | None = dataclasses.field(default=DEFAULT_BLOCK_SIZE, metadata=dict(static=True))

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
      return _dequantize(self.codes, self.scale, self.block_size).astype(dtype)
    return _dequantize_carried(self.block_size, dtype)(self.codes, self.scale, self.carrier)

  def __getitem__(self, index: Any) -> jax.Array:
    # What `nnx.Variable.__getitem__` calls: `kernel[...]` in a layer reads the float weight.
    w = self.dequantize()
    return w if index is Ellipsis else w[index]


def is_int8(x: Any) -> bool:
  return isinstance(x, Int8Weight)


def _rows_per_block(rows: int, block_size: int | None) -> int:
  return int(rows) if block_size is None else min(int(block_size), int(rows))


def _per_row(blocks: jax.Array, rows: int, block_size: int) -> jax.Array:
  """[num_blocks, cols] -> [rows, cols], each block's value on its rows. A broadcast and a reshape,
  which XLA fuses into the consumer (``jnp.repeat`` is a gather: a materialised [rows, cols] array)."""
  b = _rows_per_block(rows, block_size)
  nb, cols = blocks.shape
  return jnp.broadcast_to(blocks[:, None, :], (nb, b, cols)).reshape(nb * b, cols)[:rows]


def _dequantize(codes: jax.Array, scale: jax.Array, block_size: int) -> jax.Array:
  return codes.astype(jnp.float32) * _per_row(scale, codes.shape[0], block_size)


def _dequantize_carried(block_size: int, dtype: Any) -> Callable:
  @jax.custom_vjp
  def f(codes, scale, carrier):
    del carrier  # never read: only its cotangent matters
    return _dequantize(codes, scale, block_size).astype(dtype)

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

def quantize(w: jax.Array, block_size: int = DEFAULT_BLOCK_SIZE, *, seed: Any = None,
             dtype: Any = None) -> Int8Weight:
  """``w`` [rows, cols] as an :class:`Int8Weight`: round to nearest, or stochastically with ``seed``.

  ``dtype`` (default ``w``'s) is the float dtype the weight reads as.
  """
  if w.ndim != 2:
    raise ValueError(f'int8 weights are 2-D [rows, cols], got shape {w.shape}')
  if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                 or block_size <= 0):
    raise ValueError(f'block_size must be a positive integer or None (per column), got {block_size!r}')
  rows, cols = w.shape
  b = _rows_per_block(rows, block_size)
  nb = math.ceil(rows / b)
  x = w.astype(jnp.float32)
  if nb * b != rows:
    x = jnp.pad(x, ((0, nb * b - rows), (0, 0)))
  x = x.reshape(nb, b, cols)
  scale = jnp.max(jnp.abs(x), axis=1) / _QMAX  # [nb, cols]
  x = x / jnp.where(scale > 0, scale, 1.0)[:, None, :]
  x = x.reshape(nb * b, cols)[:rows]
  if seed is None:
    q = jnp.round(x)
  else:
    q = jnp.floor(x + uniform_dither(seed, (rows, cols)))
  codes = jnp.clip(q, -_QMAX, _QMAX).astype(jnp.int8)
  return Int8Weight(codes, scale, dtype=jnp.dtype(dtype or w.dtype).name,
                    block_size=None if block_size is None else int(block_size))


def _blocks_changed(update: jax.Array, rows: int, block_size: int) -> jax.Array:
  """bool [nb, cols]: which blocks the update touches (any non-zero element)."""
  b = _rows_per_block(rows, block_size)
  nb = math.ceil(rows / b)
  nz = (update != 0)
  if nb * b != rows:
    nz = jnp.pad(nz, ((0, nb * b - rows), (0, 0)))
  return jnp.any(nz.reshape(nb, b, -1), axis=1)


def updated(w: Int8Weight, update: jax.Array, seed: Any) -> Int8Weight:
  """``w + update`` requantized with stochastic rounding. A block the update leaves at zero keeps
  its codes and scale exactly (a frozen kernel, a masked leaf, a skipped step stay bit-identical)."""
  new = quantize(w.dequantize(jnp.float32) + update.astype(jnp.float32), w.block_size, seed=seed, dtype=w.dtype)
  changed = _blocks_changed(update, w.shape[0], w.block_size)
  rows_changed = _per_row(changed, w.shape[0], w.block_size)
  return Int8Weight(jnp.where(rows_changed, new.codes, w.codes), jnp.where(changed, new.scale, w.scale),
                    dtype=w.dtype, block_size=w.block_size)


# --- trees ------------------------------------------------------------------------------------

def default_select(path: tuple, leaf: Any) -> bool:
  """Which leaves ``quantize_tree`` stores in int8: 2-D ``kernel`` and ``embedding`` leaves (every
  linear, the head and the token embedding), never adapters, norms, biases or snapshots."""
  name = getattr(path[-1], 'key', getattr(path[-1], 'name', None)) if path else None
  return name in ('kernel', 'embedding') and getattr(leaf, 'ndim', 0) == 2


def quantize_tree(params: Any, block_size: int = DEFAULT_BLOCK_SIZE,
                  select: Callable[[tuple, Any], bool] = default_select) -> Any:
  """``params`` with the leaves ``select(path, leaf)`` picks replaced by :class:`Int8Weight` (nearest)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: quantize(x, block_size) if select(p, x) else x, params, is_leaf=is_int8)


def float_view(params: Any) -> Any:
  """``params`` with every :class:`Int8Weight` dequantized: what an optimizer's ``init`` / ``update``
  and an export see. Under jit each leaf is computed where it is used (weight decay fuses it)."""
  return jax.tree.map(lambda x: x.dequantize() if is_int8(x) else x, params, is_leaf=is_int8)


def has_int8(params: Any) -> bool:
  return any(is_int8(x) for x in jax.tree.leaves(params, is_leaf=is_int8))


def differentiable_view(params: Any) -> Any:
  """The tree to differentiate: a zero carrier in the weight's float dtype for each
  :class:`Int8Weight`, the leaf itself elsewhere. It has the structure of :func:`float_view`
  (gradients, updates and optimizer states are shaped like it)."""
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype) if is_int8(x) else x, params, is_leaf=is_int8)


def attach(params: Any, view: Any) -> Any:
  """The model's parameters for a differentiated forward: int8 weights carrying ``view``'s
  carriers, ``view``'s leaves elsewhere."""
  return jax.tree.map(lambda p, v: dataclasses.replace(p, carrier=v) if is_int8(p) else v,
                      params, view, is_leaf=is_int8)


def value_and_grad(fun: Callable, has_aux: bool = False) -> Callable:
  """``jax.value_and_grad(fun)`` for ``fun(params, *args)`` whose params may hold int8 weights: the
  gradients are those of the dequantized weights (shaped like :func:`float_view`)."""
  def carried(view, params, *args, **kwargs):
    return fun(attach(params, view), *args, **kwargs)

  grad_fn = jax.value_and_grad(carried, has_aux=has_aux)
  return lambda params, *args, **kwargs: grad_fn(differentiable_view(params), params, *args, **kwargs)


def apply_updates(params: Any, updates: Any, seed: Any) -> Any:
  """``optax.apply_updates`` where int8 leaves are requantized with stochastic rounding.

  ``updates`` is shaped like :func:`float_view` (``optax.MaskedNode`` / None leaves change
  nothing); ``seed`` a uint32 scalar, each leaf drawing from its own :func:`leaf_seed`. Float
  leaves are ``(p + u).astype(p.dtype)``, as optax does.
  """
  leaves, treedef = jax.tree.flatten(params, is_leaf=is_int8)
  upd = treedef.flatten_up_to(updates)
  out = []
  for i, (p, u) in enumerate(zip(leaves, upd)):
    if u is None or not hasattr(u, 'shape'):
      out.append(p)
    elif is_int8(p):
      out.append(updated(p, u, leaf_seed(seed, i)))
    else:
      out.append(jnp.asarray(p + u).astype(p.dtype))
  return jax.tree.unflatten(treedef, out)
