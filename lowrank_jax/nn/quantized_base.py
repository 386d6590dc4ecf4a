"""A frozen base kernel stored in 4-bit NF4 or 8-bit int8, for LoRA fine-tuning (``model.base_bits``).

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) fine-tunes a 65B model on one
GPU by storing the frozen base weights in 4 bits and training bf16 LoRA adapters on top; the
gradient flows through the quantized weight into the adapters and the input, never into the
weight itself.

**NF4** (QLoRA section 3.1, the ``nf4`` type of bitsandbytes): each block of :data:`NF4_BLOCK`
consecutive input rows of one output column (64 consecutive elements of a row of a torch
``[out, in]`` weight, the blocks bitsandbytes makes) is divided by its absmax and every element
becomes the index of the nearest of the 16 values in :data:`NF4_CODE`, the quantiles of a
standard normal rescaled to [-1, 1] (with an exact zero). Two indices share a byte. Storage:
4 bits per element plus a float32 absmax per 64, 4.5 bits.

**Double quantization** (QLoRA section 3.2): the absmax values, less their mean, are
quantized again in blocks of :data:`DQ_BLOCK` with one float32 scale each: 4 + 8/64 + 32/(64*256)
= 4.127 bits. QLoRA codes the absmax values with 8-bit floats; here they are symmetric linear int8
(absmax / 127 per block of 256), simpler to decode. On a Gaussian 4096 x 4096 kernel it adds 0.012 %
to the relative error 0.0920 (bitsandbytes' 8-bit float second level: 0.025 %), and the 4-bit codes and
absmax values are bitsandbytes' exactly (bench/nf4_error.py).

**int8**: round to nearest, symmetric absmax / 127 per output column (``int8_weight.quantize``).

A :class:`QuantizedBase` stands where the float kernel stood; a layer reads the float weight with
``kernel[...]``, or better multiplies with :func:`frozen_matmul`, whose backward recomputes the
dequantized kernel from the codes: the float kernel then exists one layer at a time in the
forward and in the backward pass, never the whole model's. Compiled for a TPU v5e, the gradient of
6 NF4 layers of 2048 x 2048 (4096 tokens) needs 119 MiB of temporaries this way, 246 MiB with the
plain product on ``dequantize()`` or without the barrier (bench/nf4_error.py, section memory).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.nn import int8_weight

#: The 16 NF4 values (QLoRA Appendix E; bitsandbytes' ``get_4bit_type('nf4')``), ascending.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)
#: Elements per absmax block (QLoRA).
NF4_BLOCK = 64
#: absmax values per second-level scale (QLoRA double quantization).
DQ_BLOCK = 256
# An element goes to code i when it exceeds i of these midpoints (a midpoint itself to the lower
# code); float32, as bitsandbytes computes them, so both pick the same codes.
_NF4_MID = (NF4_CODE[:-1] + NF4_CODE[1:]) / np.float32(2)
_QMAX = 127


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedBase:
  """A frozen 2-D kernel ``[rows, out]`` stored in 4 or 8 bits.

  ``bits=8``: ``codes`` int8 ``[rows, out]``, ``scale`` float32 ``[1, out]``; ``w ~= codes * scale``.

  ``bits=4``: ``codes`` uint8 ``[ceil(rows / 2), out]``, kernel row ``2i`` in the low nibble and
  ``2i + 1`` in the high one; ``scale`` the absmax ``[ceil(rows / block_size), out]`` of each block of
  ``block_size`` input rows of a column, float32, or with double quantization int8 codes of that
  shape decoded as ``codes * scale_scale[block] + scale_offset`` (blocks of :data:`DQ_BLOCK` in the
  row-major order of ``scale``).

  ``dtype`` is the float dtype it reads as (the model's ``param_dtype``); ``block_size`` is used by
  ``bits=4`` only.
  """

  #: A stored weight that is never differentiated nor updated: the trees of `int8_weight` (what the
  #: trainer differentiates, optimizes and updates) leave out any value whose class says so.
  FROZEN_STORED: ClassVar[bool] = True

  codes: jax.Array
  scale: jax.Array
  scale_scale: jax.Array | None = None
  scale_offset: jax.Array | None = None
  bits: int = dataclasses.field(default=4, metadata=dict(static=True))
  rows: int = dataclasses.field(default=0, metadata=dict(static=True))
  dtype: str = dataclasses.field(default='float32', metadata=dict(static=True))
  block_size: int = dataclasses.field(default=NF4_BLOCK, metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, int]:
    return (self.rows, int(self.codes.shape[1]))

  @property
  def ndim(self) -> int:
    return 2

  @property
  def size(self) -> int:
    return self.rows * int(self.codes.shape[1])

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes and every level of scales."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(self))

  def absmax(self) -> jax.Array:
    """float32 ``scale`` as the element quantizer used it (decoded when double-quantized)."""
    if self.scale_scale is None:
      return self.scale
    flat = _pad_to(self.scale.reshape(-1), DQ_BLOCK).reshape(-1, DQ_BLOCK)
    decoded = flat.astype(jnp.float32) * self.scale_scale[:, None]
    return decoded.reshape(-1)[:self.scale.size].reshape(self.scale.shape) + self.scale_offset

  def dequantize(self, dtype: Any = None) -> jax.Array:
    """The float kernel ``[rows, out]`` in ``dtype`` (default the stored one), without a gradient path."""
    dtype = jnp.dtype(dtype or self.dtype)
    if self.bits == 8:
      w = self.codes.astype(jnp.float32) * self.scale
    else:  # the even and the odd rows, interleaved
      half, out = self.codes.shape
      rows = [_nf4_rows(self, parity, jnp.float32) for parity in (0, 1)]
      w = jnp.stack(rows, axis=1).reshape(2 * half, out)[:self.rows]
    return jax.lax.stop_gradient(w.astype(dtype))

  def __getitem__(self, index: Any) -> jax.Array:
    # What `nnx.Variable.__getitem__` calls: `kernel[...]` in a layer reads the float weight.
    w = self.dequantize()
    return w if index is Ellipsis else w[index]


def is_quantized_base(x: Any) -> bool:
  return isinstance(x, QuantizedBase)


def _pad_to(x: jax.Array, multiple: int) -> jax.Array:
  """``x`` with zero rows appended up to a multiple of ``multiple`` rows."""
  pad = -x.shape[0] % multiple
  return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) if pad else x


def _nf4_index(scaled: jax.Array) -> jax.Array:
  """uint8 index of the nearest NF4 value: the number of midpoints below each element. Fifteen
  elementwise compares fuse into one pass (a ``[..., 16]`` distance array would not)."""
  index = jnp.zeros(scaled.shape, jnp.uint8)
  for m in _NF4_MID:
    index = index + (scaled > m).astype(jnp.uint8)
  return index


def _double_quantize(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(int8 codes shaped like ``absmax``, float32 scales [ceil(n / DQ_BLOCK)], float32 offset)."""
  offset = jnp.mean(absmax)
  flat = _pad_to((absmax - offset).reshape(-1), DQ_BLOCK).reshape(-1, DQ_BLOCK)
  step = jnp.max(jnp.abs(flat), axis=1) / _QMAX
  q = jnp.round(flat / jnp.where(step > 0, step, 1.0)[:, None])
  codes = jnp.clip(q, -_QMAX, _QMAX).astype(jnp.int8).reshape(-1)[:absmax.size].reshape(absmax.shape)
  return codes, step, offset


def quantize_base(w: jax.Array, bits: int, *, block_size: int = NF4_BLOCK, double_quant: bool = False,
                  dtype: Any = None) -> QuantizedBase:
  """``w`` [in, out] (any float dtype) as a :class:`QuantizedBase` that reads as ``dtype`` (default ``w``'s).

  ``bits=4``: NF4 with an absmax per ``block_size`` input rows of each column, each element the
  nearest code of ``w / absmax`` (ties to the lower code, as bitsandbytes); ``double_quant``
  quantizes the absmax values again (int8 per :data:`DQ_BLOCK`, see the module docstring).
  ``bits=8``: int8 round to nearest, absmax / 127 per column (``double_quant`` ignored). Jit-able with
  the keyword arguments and ``bits`` static.
  """
  if getattr(w, 'ndim', None) != 2:
    raise ValueError(f'a quantized base kernel is 2-D [in, out], got shape {getattr(w, "shape", None)}')
  if bits not in (4, 8):
    raise ValueError(f'bits must be 4 (NF4) or 8 (int8), got {bits!r}')
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0 or block_size % 2:
    # (even: a byte's two rows share a block, so each nibble's rows have their own scales)
    raise ValueError(f'block_size must be a positive even integer, got {block_size!r}')
  dtype = jnp.dtype(dtype or w.dtype).name
  rows, out = w.shape
  if bits == 8:
    # double_quant is ignored: one float32 scale per column is already 32 / in bits a weight.
    q = int8_weight.quantize(w, None)
    return QuantizedBase(q.codes, q.scale, bits=8, rows=rows, dtype=dtype)
  block_size = int(block_size)
  nb = math.ceil(rows / block_size)
  x = _pad_to(w.astype(jnp.float32), block_size).reshape(nb, block_size, out)
  absmax = jnp.max(jnp.abs(x), axis=1)
  # Multiplied by the reciprocal as bitsandbytes does; a zero block's elements stay 0 (code 7).
  scaled = x * jnp.where(absmax > 0, 1 / absmax, 0.0)[:, None, :]
  index = _pad_to(_nf4_index(scaled.reshape(nb * block_size, out)[:rows]), 2).reshape(-1, 2, out)
  codes = index[:, 0] | (index[:, 1] << 4)
  if not double_quant:
    return QuantizedBase(codes, absmax, bits=4, rows=rows, dtype=dtype, block_size=block_size)
  scale, scale_scale, offset = _double_quantize(absmax)
  return QuantizedBase(codes, scale, scale_scale, offset, bits=4, rows=rows, dtype=dtype, block_size=block_size)


# --- the product --------------------------------------------------------------------------------

def _nf4_rows(w: QuantizedBase, parity: int, dtype: Any) -> jax.Array:
  """The kernel's rows ``2i + parity`` ([ceil(rows / 2), out], dequantized): one nibble of every byte.

  The product by an NF4 kernel is taken as two products by these halves (see :func:`_product`):
  unpacked into one [rows, out] kernel, the interleaving of the nibbles and the absmax broadcast
  left XLA several float32 copies of each kernel to hold (compiled for a TPU v5e, LLaMA-7B MLP
  kernels: 4.6 x the temporaries of this form).
  """
  codes = w.codes & 0xF if parity == 0 else w.codes >> 4
  nb, out = w.scale.shape
  per_block = w.block_size // 2  # rows 2i + parity of a block of block_size rows (block_size is even)
  # Broadcast and reshape (fused into the consumer), not jnp.repeat (a gather, materialised).
  absmax = jnp.broadcast_to(w.absmax()[:, None, :], (nb, per_block, out)).reshape(nb * per_block, out)
  return (jnp.asarray(NF4_CODE)[codes] * absmax[:codes.shape[0]]).astype(dtype)


def _product(x: jax.Array, w: QuantizedBase) -> jax.Array:
  """``x [tokens, rows] @ dequantize(w)`` in x's dtype."""
  if w.bits != 4:
    return jnp.dot(x, w.dequantize(x.dtype))
  half = w.codes.shape[0]
  if 2 * half != x.shape[1]:  # an odd row count: the padding row's codes meet a zero input
    x = jnp.pad(x, ((0, 0), (0, 2 * half - x.shape[1])))
  f32 = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
  y = f32(x[:, 0::2], _nf4_rows(w, 0, x.dtype)) + f32(x[:, 1::2], _nf4_rows(w, 1, x.dtype))
  return y.astype(x.dtype)


def _product_transposed(g: jax.Array, w: QuantizedBase) -> jax.Array:
  """``g [tokens, out] @ dequantize(w).T`` in g's dtype: the input's gradient."""
  if w.bits != 4:
    return jnp.dot(g, w.dequantize(g.dtype).T)
  even, odd = (jnp.dot(g, _nf4_rows(w, parity, g.dtype).T) for parity in (0, 1))
  return jnp.stack([even, odd], axis=-1).reshape(g.shape[0], -1)[:, :w.rows]


@jax.custom_vjp
def _frozen(x: jax.Array, w: QuantizedBase) -> jax.Array:
  # Tied to x, the dequantization happens where the product does. Untied, it is a function of
  # weights alone: inside the loop over micro-batches (gradient accumulation) XLA hoists the codes'
  # unpacking (nibbles, the size of the codes) out of the loop and keeps every layer's for the whole
  # loop (a LLaMA-7B QLoRA step on a TPU v5e: +3.2 GiB of temporaries, bench/qlora.py).
  x, w = jax.lax.optimization_barrier((x, w))
  y = _product(x.reshape(-1, x.shape[-1]), w)
  return y.reshape(*x.shape[:-1], y.shape[-1])


def _frozen_fwd(x, w):
  # The residual is the stored kernel alone: the float kernel dies with the forward product.
  return _frozen(x, w), w


def _frozen_bwd(w, g):
  # The barrier makes the backward's dequantization depend on g, so XLA cannot share it with the
  # forward's (common subexpressions): shared, every layer's float kernel would live from its
  # forward to its backward. (XLA:CPU drops barriers, so there they are shared anyway: jax.checkpoint
  # saves nothing there either. The TPU compiler keeps them: see the module docstring.)
  w, g = jax.lax.optimization_barrier((w, g))
  dx = _product_transposed(g.reshape(-1, g.shape[-1]), w)
  return dx.reshape(*g.shape[:-1], w.rows), None  # None: no gradient for the frozen kernel


_frozen.defvjp(_frozen_fwd, _frozen_bwd)


def frozen_matmul(x: jax.Array, w: QuantizedBase, dtype: Any) -> jax.Array:
  """``x [..., in] @ w.dequantize()`` in ``dtype``; ``w`` gets no gradient, ``x`` gets
  ``g @ w.dequantize().T`` with the kernel dequantized again in the backward pass (the only residual
  is ``w``'s codes and scales)."""
  return _frozen(x.astype(dtype), w)


# --- trees --------------------------------------------------------------------------------------

def default_select(path: tuple, leaf: Any) -> bool:
  """2-D ``kernel`` leaves (every linear and the head, [in, out])."""
  name = getattr(path[-1], 'key', getattr(path[-1], 'name', None)) if path else None
  return name == 'kernel' and getattr(leaf, 'ndim', 0) == 2


def quantized_base_tree(params: Any, bits: int, *, select: Callable[[tuple, Any], bool] = default_select,
                        double_quant: bool = False, block_size: int = NF4_BLOCK) -> Any:
  """``params`` with the leaves ``select(path, leaf)`` picks replaced by :func:`quantize_base` of them."""
  def one(path, x):
    if is_quantized_base(x) or not select(path, x):
      return x
    return quantize_base(x, bits, block_size=block_size, double_quant=double_quant)

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized_base)


__all__ = ['DQ_BLOCK', 'NF4_BLOCK', 'NF4_CODE', 'QuantizedBase', 'default_select', 'frozen_matmul',
           'is_quantized_base', 'quantize_base', 'quantized_base_tree']
