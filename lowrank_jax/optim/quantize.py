"""8-bit optimizer states for any Optax transform (blockwise quantization).

Dettmers, Lewis, Shleifer & Zettlemoyer, "8-bit Optimizers via Block-wise
Quantization", ICLR 2022, https://arxiv.org/abs/2110.02861.

:func:`quantize_state` wraps a ``GradientTransformation``; between steps the
wrapped state's moment leaves are held as :class:`QuantizedArray` (one byte
per element plus one float32 scale per block). The codec pieces
(:func:`dynamic_codebook`, :func:`linear_codebook`, :func:`quantize`,
:func:`dequantize`) are public for measuring and testing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

#: Codebooks: 'dynamic' (bitsandbytes' dynamic tree map: a decimal exponent
#: and a linear fraction whose length grows with the value, 7 decades of
#: range) or 'linear' (absmax, uniform steps).
CODECS = ('dynamic', 'linear')
SUPPORTED_BITS = (8,)
#: ``block_size`` must be a positive multiple of this (the byte codes of one
#: block then fill whole 64-byte lines; bitsandbytes uses 64..4096).
BLOCK_MULTIPLE = 64

#: Names of state fields (NamedTuple / dataclass attributes, never dict keys,
#: so a parameter called ``v`` is not mistaken for one) holding moments.
FIRST_MOMENT_FIELDS = frozenset({'mu', 'trace', 'momentum', 'm', 'exp_avg', 'ema'})
SECOND_MOMENT_FIELDS = frozenset(
    {'nu', 'nu_hat', 'nu_max', 'v', 'v_row', 'v_col', 'sum_of_squares', 'exp_avg_sq'}
)

_NUM_DECADES = 7  # 1e-7 .. 1 of the block's absmax


@functools.cache
def dynamic_codebook(signed: bool) -> np.ndarray:
  """256 sorted values of the dynamic tree map, in ``[-1, 1]`` or ``[0, 1]``.

  The magnitude ``[10^-7, 1]`` is split in decades; decade ``i`` (``i = 0``
  the smallest) is cut into ``2^i`` (signed) or ``2^(i+1)`` (unsigned) equal
  bins, represented by their midpoints. So a value near the block maximum
  keeps 6 (7 unsigned) fraction bits and a tiny one keeps its exponent. Plus
  0 and the ends ``1`` (and ``-1``; the signed map then drops its smallest
  negative bin): the block's absmax is coded exactly, so quantizing a
  dequantized array gives back the same codes.
  """
  mags = []
  for i in range(_NUM_DECADES):
    n = 2 ** (i + (0 if signed else 1))
    edges = np.linspace(0.1, 1.0, n + 1) * 10.0 ** (i + 1 - _NUM_DECADES)
    mags.extend((edges[:-1] + edges[1:]) / 2)
  mags = np.asarray(mags)
  values = [0.0, 1.0, *mags] + ([-1.0, *(-mags[1:])] if signed else [])
  book = np.sort(np.asarray(values, np.float64)).astype(np.float32)
  assert book.size == 256, book.size
  return book


@functools.cache
def linear_codebook(signed: bool) -> np.ndarray:
  """Uniform codes: ``k / 127`` for ``|k| <= 127`` (signed, 255 used), ``k / 255`` unsigned."""
  if signed:
    return (np.arange(-127, 129) / 127.0).clip(-1, 1).astype(np.float32)[:256]
  return (np.arange(256) / 255.0).astype(np.float32)


def codebook(codec: str, signed: bool) -> np.ndarray:
  if codec == 'dynamic':
    return dynamic_codebook(signed)
  if codec == 'linear':
    return linear_codebook(signed)
  raise ValueError(f'`codec` must be one of {CODECS}, got {codec!r}')


def codec_error_bound(codec: str, signed: bool) -> float:
  """Largest ``|x - dequantize(quantize(x))| / absmax`` over the codec's range
  (half the widest gap between neighbouring codes; ends included)."""
  book = codebook(codec, signed).astype(np.float64)
  lo = -1.0 if signed else 0.0
  gaps = np.diff(np.unique(book)) / 2
  return float(max(gaps.max(), book[0] - lo, 1.0 - book[-1]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A float array stored blockwise in 8 bits.

  ``codes`` has the array's shape (uint8 indices into the codebook; the
  codebook is signed for first moments, unsigned for second moments).
  Blocks are ``block_size`` consecutive elements along the trailing axes
  ``shape[axis:]`` (the smallest suffix holding a block, so the last axis
  when it is long enough), so the leading axes are never mixed: sharding
  the array along them (or along the last axis in multiples of a block)
  keeps every block on one device. ``scale`` (float32, shape
  ``shape[:axis] + (num_blocks,)``) is each block's absolute maximum.
  """

  codes: jax.Array
  scale: jax.Array
  dtype: str = dataclasses.field(metadata=dict(static=True))
  codec: str = dataclasses.field(metadata=dict(static=True))
  signed: bool = dataclasses.field(metadata=dict(static=True))
  sqrt: bool = dataclasses.field(metadata=dict(static=True))
  block_size: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.codes.shape)

  @property
  def nbytes(self) -> int:
    return _nbytes(self.codes) + _nbytes(self.scale)


def _nbytes(x) -> int:
  return int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def block_axis(shape: tuple[int, ...], block_size: int) -> int:
  """First axis of the blocked suffix: the last axis, widened to the left
  until it holds at least one block."""
  axis = len(shape) - 1
  while axis > 0 and math.prod(shape[axis:]) < block_size:
    axis -= 1
  return axis


def scale_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
  axis = block_axis(shape, block_size)
  return tuple(shape[:axis]) + (-(-math.prod(shape[axis:]) // block_size),)


def quantized_nbytes(shape: tuple[int, ...], block_size: int) -> int:
  """Bytes of a :class:`QuantizedArray` of ``shape``: one per element plus a
  float32 scale per block."""
  return math.prod(shape) + 4 * math.prod(scale_shape(tuple(shape), block_size))


def _blocks(x: jax.Array, block_size: int) -> jax.Array:
  """``x`` as ``shape[:axis] + (num_blocks, block_size)``, zero-padded."""
  axis = block_axis(x.shape, block_size)
  lead = x.shape[:axis]
  x = x.reshape(lead + (-1,))
  pad = -x.shape[-1] % block_size
  if pad:
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)])
  return x.reshape(lead + (-1, block_size))


def _unblocks(b: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  axis = block_axis(shape, b.shape[-1])
  n = math.prod(shape[axis:])
  return b.reshape(b.shape[:-2] + (-1,))[..., :n].reshape(shape)


# Nearest-code search by a table on the top bits of the float32 pattern: a
# binary search over 256 codes (jnp.searchsorted) costs ~50x an elementwise
# op on CPU; one table gather plus one comparison with each neighbouring
# midpoint is exact (every bucket holds at most one midpoint, checked).
_BUCKET_SHIFT = 15  # keeps sign, exponent and 8 mantissa bits


@functools.cache
def _bucket_table(codec: str, signed: bool) -> tuple[np.ndarray, np.ndarray]:
  book = codebook(codec, signed).astype(np.float64)
  mids = (book[1:] + book[:-1]) / 2
  patterns = np.arange(2 ** (32 - _BUCKET_SHIFT), dtype=np.uint64) << _BUCKET_SHIFT
  ends = [(patterns + off).astype(np.uint32).view(np.float32) for off in (0, (1 << _BUCKET_SHIFT) - 1)]
  with np.errstate(invalid="ignore"):
    lo, hi = (np.clip(e.astype(np.float64), -1, 1) for e in ends)
  finite = np.isfinite(lo) & np.isfinite(hi)  # inf/NaN patterns: any code will do
  a = np.where(finite, np.minimum(lo, hi), 0.0)
  b = np.where(finite, np.maximum(lo, hi), 0.0)
  lower = np.searchsorted(mids, a)
  inside = np.searchsorted(mids, b) - lower
  assert inside.max() <= 1, 'codebook too fine for the bucket table'
  return lower.astype(np.uint8), np.concatenate([mids, [np.inf]]).astype(np.float32)


def _lookup(table: jax.Array, index: jax.Array) -> jax.Array:
  """``table[index]`` laid out like ``index`` (a small replicated table read
  with sharded indices; explicit-sharding meshes need the layout named)."""
  return table.at[index].get(mode='clip', out_sharding=jax.typeof(index).sharding)


def _encode(y: jax.Array, codec: str, signed: bool) -> jax.Array:
  """Index of the nearest code to each ``y`` (in ``[-1, 1]``, or ``[0, 1]``)."""
  if codec == 'linear':
    if signed:
      return (jnp.round(jnp.clip(y, -1, 1) * 127) + 127).astype(jnp.uint8)
    return jnp.round(jnp.clip(y, 0, 1) * 255).astype(jnp.uint8)
  table, mids = (jnp.asarray(t) for t in _bucket_table(codec, signed))
  bits = jax.lax.bitcast_convert_type(y, jnp.uint32)
  k = _lookup(table, jax.lax.shift_right_logical(bits, jnp.uint32(_BUCKET_SHIFT))).astype(jnp.int32)
  k = k + (y > _lookup(mids, k)).astype(jnp.int32)  # mids[255] = inf
  return k.astype(jnp.uint8)


def quantize(
    x: jax.Array,
    *,
    block_size: int = 256,
    codec: str = 'dynamic',
    signed: bool = True,
    sqrt: bool = False,
) -> QuantizedArray:
  """Blockwise 8-bit quantization of ``x`` to the nearest code.

  Args:
    x: a floating array (``ndim >= 1``).
    block_size: elements per block (one scale each).
    codec: ``'dynamic'`` or ``'linear'``, see :data:`CODECS`.
    signed: signed codebook; else unsigned (negative values become 0).
    sqrt: store ``sqrt(x)`` (unsigned only): halves the decades a second
      moment spans, and the error of ``1/sqrt(v)`` no longer doubles.

  Returns:
    A :class:`QuantizedArray`; :func:`dequantize` inverts it within
    :func:`codec_error_bound` times each block's absmax (of ``sqrt(x)`` when
    ``sqrt``).
  """
  if sqrt and signed:
    raise ValueError('sqrt storage is for nonnegative (unsigned) values')
  encode = functools.partial(_quantize, block_size=block_size, codec=codec, signed=signed, sqrt=sqrt)
  chunks = _chunking(x, block_size)
  if chunks is None:
    codes, scale = encode(x)
  else:
    codes, scale = _in_chunks(encode, chunks, (x,),
                              (jnp.zeros(x.shape, jnp.uint8), jnp.zeros(scale_shape(x.shape, block_size), jnp.float32)))
  return QuantizedArray(
      codes=codes,
      scale=scale,
      dtype=jnp.dtype(x.dtype).name,
      codec=codec,
      signed=signed,
      sqrt=sqrt,
      block_size=block_size,
  )


def _quantize(x, *, block_size, codec, signed, sqrt):
  """``quantize``'s codes and scales of one array (or chunk)."""
  y = x.astype(jnp.float32)
  if not signed:
    y = jnp.maximum(y, 0.0)
  if sqrt:
    y = jnp.sqrt(y)
  b = _blocks(y, block_size)
  absmax = jnp.max(jnp.abs(b), axis=-1)
  inv = jnp.where(absmax > 0, 1.0 / absmax, 0.0)
  codes = _encode(b * inv[..., None], codec, signed)
  return _unblocks(codes, x.shape), absmax


def dequantize(q: QuantizedArray) -> jax.Array:
  """The float array a :class:`QuantizedArray` stands for (in its dtype)."""
  decode = functools.partial(_dequantize, q)
  chunks = _chunking(q.codes, q.block_size)
  if chunks is None:
    (x,) = decode(q.codes, q.scale)
    return x
  (x,) = _in_chunks(decode, chunks, (q.codes, q.scale), (jnp.zeros(q.shape, q.dtype),))
  return x


def _dequantize(q: QuantizedArray, codes: jax.Array, scale: jax.Array) -> tuple[jax.Array]:
  book = jnp.asarray(codebook(q.codec, q.signed))
  b = _blocks(_lookup(book, codes), q.block_size) * scale[..., None]
  if q.sqrt:
    b = jnp.square(b)
  return (_unblocks(b, codes.shape).astype(q.dtype),)


# Large leaves are coded chunk by chunk in a loop: coded whole, the TPU compiler
# materialised several float32 and int32 (gather index) copies of a leaf at once,
# e.g. 4.2 GiB for one 32128 x 4096 embedding's moments. A chunk holds whole
# blocks, so the codes and scales are the same as coded whole.

#: 2-D leaves with more elements than this are coded in chunks of about this many
#: (at most, where the cut axis allows).
CHUNK_ELEMENTS = 2**22


def _chunking(x: jax.Array, block_size: int) -> Optional[tuple[int, int]]:
  """``(axis, count)``: cut a 2-D leaf into ``count`` equal slices along ``axis``, or
  None (small, not 2-D, no cut in whole blocks, or sharded over an explicit mesh
  axis: each device then holds a part of it anyway). The cut runs along the
  smaller axis (the second on a tie): FSDP shards the largest one (the first on a
  tie), and a loop over slices of a sharded axis would gather it on every device."""
  shape = tuple(x.shape)
  size = math.prod(shape)
  if len(shape) != 2 or size <= CHUNK_ELEMENTS or block_axis(shape, block_size) != 1:
    return None
  if any(name is not None for name in jax.typeof(x).sharding.spec):
    return None
  axis = 1 if shape[1] <= shape[0] else 0
  unit = block_size if axis == 1 else 1
  if shape[axis] % unit:
    return None
  units = shape[axis] // unit
  want = -(-size // CHUNK_ELEMENTS)
  count = next((n for n in range(want, units + 1) if units % n == 0), units)
  return (axis, count) if count > 1 else None


def _in_chunks(fn, chunks, inputs, outputs):
  """``outputs`` (zeros) filled by ``fn`` over ``count`` equal slices along
  ``axis`` of every input and output: codes, values and scales alike (a
  scale row has one column per block, and a cut along axis 1 is in whole blocks)."""
  axis, count = chunks

  def cut(a, i):
    n = a.shape[axis] // count
    return jax.lax.dynamic_slice_in_dim(a, i * n, n, axis)

  def body(i, outs):
    pieces = fn(*[cut(a, i) for a in inputs])
    return tuple(jax.lax.dynamic_update_slice_in_dim(o, p, i * (o.shape[axis] // count), axis)
                 for o, p in zip(outs, pieces))

  return jax.lax.fori_loop(0, count, body, outputs)


# ---------------------------------------------------------------------------
# The wrapper.


def moment_kind(path: tuple, leaf: Any) -> Optional[str]:
  """``'first'``, ``'second'`` or None: the innermost state attribute on
  ``path`` that names a moment (:data:`FIRST_MOMENT_FIELDS`,
  :data:`SECOND_MOMENT_FIELDS`). Dict keys (parameter names) never count, so
  a GaLore/OSD ``projector``, MultiSteps' ``acc_grads``, ReLoRA's snapshots
  and injected hyperparameters are not moments; OSD's
  ``projector_state.mu`` is."""
  del leaf
  for entry in reversed(path):
    if isinstance(entry, jax.tree_util.GetAttrKey):
      if entry.name in FIRST_MOMENT_FIELDS:
        return 'first'
      if entry.name in SECOND_MOMENT_FIELDS:
        return 'second'
  return None


class QuantizedState(NamedTuple):
  """State of :func:`quantize_state`: the wrapped transform's state with its
  quantized moment leaves as :class:`QuantizedArray`."""

  inner_state: optax.OptState


def _is_quantized(x: Any) -> bool:
  return isinstance(x, QuantizedArray)


def dequantize_tree(tree: Any) -> Any:
  """Every :class:`QuantizedArray` in ``tree`` replaced by its float array."""
  return jax.tree.map(lambda x: dequantize(x) if _is_quantized(x) else x, tree, is_leaf=_is_quantized)


def _is_float(x: Any) -> bool:
  return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)


def _check_args(bits, block_size, min_size, codec, second_moment):
  if bits not in SUPPORTED_BITS:
    raise ValueError(
        f'`bits` must be one of {SUPPORTED_BITS} (for 32-bit states do not wrap the '
        f'optimizer), got {bits!r}'
    )
  if not isinstance(block_size, int) or block_size <= 0 or block_size % BLOCK_MULTIPLE:
    raise ValueError(
        f'`block_size` must be a positive multiple of {BLOCK_MULTIPLE} (e.g. 256), got '
        f'{block_size!r}'
    )
  if not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f'`min_size` must be a nonnegative int, got {min_size!r}')
  if codec not in CODECS:
    raise ValueError(f'`codec` must be one of {CODECS}, got {codec!r}')
  if second_moment not in SECOND_MOMENT_MODES:
    raise ValueError(f'`second_moment` must be one of {SECOND_MOMENT_MODES}, got {second_moment!r}')


#: How second moments are stored: ``'sqrt'`` (``sqrt(v)`` with the unsigned
#: codebook) or ``'direct'`` (``v`` itself with the unsigned codebook).
SECOND_MOMENT_MODES = ('sqrt', 'direct')


def quantize_state(
    inner: optax.GradientTransformation,
    bits: int = 8,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    codec: str = 'dynamic',
    second_moment: str = 'sqrt',
    classify: Callable[[tuple, Any], Optional[str]] = moment_kind,
    leaf_groups: int = 1,
) -> optax.GradientTransformationExtraArgs:
  r"""Keeps ``inner``'s moment states in 8 bits between steps (block-wise).

  Every floating state leaf of ``inner`` that ``classify`` calls a moment
  and that has at least ``min_size`` elements is stored as a
  :class:`QuantizedArray`: per block of ``block_size`` consecutive elements
  (along the trailing axes, see :class:`QuantizedArray`), a float32 absmax
  ``s`` and one byte per element, the nearest code ``c`` of ``x / s`` in a
  256-entry codebook, ``x \approx s \, c``. First moments use a signed
  codebook; second moments (nonnegative, many decades) an unsigned one,
  applied to ``\sqrt{v}`` by default. The rest of the state (step counts,
  GaLore/OSD projectors, small leaves, hyperparameters, accumulated
  gradients) is kept as it is.

  ``update`` dequantizes, runs ``inner.update`` and quantizes the new
  state in one traced function. In a train step each parameter's quantized
  leaves are tied to its gradient (an ``optimization_barrier``), so a leaf
  is dequantized only once its gradient exists and its update can run,
  and be quantized again, while the backward pass goes on: without that
  the compiler is free to dequantize every leaf before the backward pass
  (a LLaMA 7b GaLore step compiled for TPU v5p: 24.2 GiB of temporaries,
  5.5 GiB with it). 2-D leaves over :data:`CHUNK_ELEMENTS` are coded in
  slices (not when sharded over an explicit mesh axis), so no float32 copy
  of a whole large leaf is made. In an update called
  on its own (every gradient already there) XLA may still dequantize every
  leaf at once; ``leaf_groups`` bounds that.

  Bytes per quantized leaf of ``n`` elements: ``n + 4 ceil(n / block_size)``
  (:func:`quantized_nbytes`), about 0.254 of float32 at ``block_size=256``.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lowrank_jax.optim import quantize_state
    >>> params = {'w': jnp.ones((64, 128)), 'b': jnp.zeros((128,))}
    >>> opt = quantize_state(optax.adamw(1e-3), min_size=1024)
    >>> state = opt.init(params)
    >>> state.inner_state[0].mu['w'].codes.dtype
    dtype('uint8')
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(opt.update)(grads, state, params)

  Args:
    inner: any gradient transformation (``optax.adamw``, ``galore``,
      ``osd``, a ``chain``, ``MultiSteps``' inner optimizer, ...).
    bits: bits per element; only 8.
    block_size: elements per scale; a positive multiple of
      :data:`BLOCK_MULTIPLE`. Smaller blocks follow outliers more closely
      and cost ``4 / block_size`` bytes per element more.
    min_size: leaves with fewer elements stay as they are (bitsandbytes:
      4096).
    codec: ``'dynamic'`` (default: the dynamic tree map, relative precision
      over 7 decades) or ``'linear'`` (uniform absmax steps), see
      :data:`CODECS`.
    second_moment: ``'sqrt'`` (default) or ``'direct'``, see
      :data:`SECOND_MOMENT_MODES`.
    classify: ``(path, leaf) -> 'first' | 'second' | None`` for every state
      leaf; default :func:`moment_kind` (by state field name).
    leaf_groups: 1 (default): one ``inner.update`` on the whole dequantized
      state; XLA may then hold every leaf's float32 moments at once. ``k > 1``:
      the parameters are cut into ``k`` groups of about equal state size, and
      ``inner.update`` is traced ``k`` times, the ``j``-th time with group
      ``j``'s moments dequantized only after group ``j - 1``'s are quantized
      again (an ``optimization_barrier``); each call keeps only its group's
      outputs and XLA removes the rest as dead code, so the float32 moments of
      about one group are live at a time. The result is the same; compile
      time grows with ``k``. Measured (``bench/bench_quantize.py``), AdamW on
      16 leaves of 512 x 2048 compiled for TPU v5e: temporaries 216 MiB
      (``k=1``), 80 MiB (``k=4``), 23 MiB (``k=16``), against 128 MiB of
      float32 moments. XLA:CPU drops the barrier, so on CPU ``k`` changes
      nothing. Meant for elementwise transforms (AdamW, Lion): a transform
      with cross-leaf work in the update (a ``lax.cond`` over all leaves, as
      GaLore's in-update refresh) may keep that work ``k`` times.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state is a
    :class:`QuantizedState`.

  Raises:
    ValueError: for unsupported ``bits``, ``block_size``, ``codec``,
      ``second_moment``, or (at ``init``) when ``inner`` has no floating
      moment state.

  References:
    Dettmers et al., 8-bit Optimizers via Block-wise Quantization, 2022,
    https://arxiv.org/abs/2110.02861
  """
  _check_args(bits, block_size, min_size, codec, second_moment)
  if not isinstance(leaf_groups, int) or leaf_groups < 1:
    raise ValueError(f'`leaf_groups` must be a positive int, got {leaf_groups!r}')
  inner = optax.with_extra_args_support(inner)

  def encode(path, x):
    if _is_quantized(x) or not _is_float(x) or x.ndim == 0:
      return x
    kind = classify(path, x)
    if kind is None or x.size < min_size:
      return x
    second = kind == 'second'
    return quantize(
        x,
        block_size=block_size,
        codec=codec,
        signed=not second,
        sqrt=second and second_moment == 'sqrt',
    )

  def encode_tree(tree):
    return jax.tree_util.tree_map_with_path(encode, tree)

  def init_fn(params):
    state = inner.init(params)
    found = [
        classify(path, x)
        for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
        if _is_float(x)
    ]
    if not any(found):
      raise ValueError(
          'quantize_state: the wrapped transform has no floating moment state '
          f'(state fields named {sorted(FIRST_MOMENT_FIELDS | SECOND_MOMENT_FIELDS)}); '
          'there is nothing to quantize. Pass `classify` if its moments have other names.'
      )
    return QuantizedState(inner_state=encode_tree(state))

  def update_fn(updates, state, params=None, **extra_args):
    if leaf_groups == 1:
      updates, inner_state = _held_until_gradient(updates, state.inner_state)
      inner_state = dequantize_tree(inner_state)
      updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
      return updates, QuantizedState(inner_state=encode_tree(inner_state))
    return _grouped_update(inner, encode, leaf_groups, updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _param_owner(state_path: tuple, param_index: dict) -> Optional[int]:
  """Index of the parameter a state leaf belongs to: the entries after the
  state's innermost attribute start with that parameter's path (Adam's
  ``mu[path]``, a projector's ``projector[path]['in']``); None for shared
  leaves (counts, hyperparameters)."""
  start = 0
  for i, entry in enumerate(state_path):
    if isinstance(entry, jax.tree_util.GetAttrKey):
      start = i + 1
  tail = tuple(state_path[start:])
  for length in range(len(tail), 0, -1):
    owner = param_index.get(tail[:length])
    if owner is not None:
      return owner
  return None


def _held_until_gradient(updates: Any, inner_state: Any) -> tuple[Any, Any]:
  """Each parameter's quantized state leaves tied to its gradient by an
  ``optimization_barrier``, so no leaf is dequantized before its gradient
  exists. Without it the dequantization depends on nothing computed in a
  train step, and the TPU compiler hoisted it: every leaf's dequantized
  moments were live through the backward pass. Values are unchanged."""
  flat_u, udef = jax.tree_util.tree_flatten_with_path(updates)
  param_index = {tuple(path): i for i, (path, _) in enumerate(flat_u)}
  flat_s, sdef = jax.tree_util.tree_flatten_with_path(inner_state, is_leaf=_is_quantized)
  grads, leaves = [g for _, g in flat_u], [x for _, x in flat_s]
  owned: dict[int, list[int]] = {}
  for j, (path, x) in enumerate(flat_s):
    owner = _param_owner(tuple(path), param_index) if _is_quantized(x) else None
    if owner is not None and hasattr(grads[owner], 'dtype'):
      owned.setdefault(owner, []).append(j)
  for i, js in owned.items():
    held, grads[i] = jax.lax.optimization_barrier(([leaves[j] for j in js], grads[i]))
    for j, q in zip(js, held):
      leaves[j] = q
  return udef.unflatten(grads), sdef.unflatten(leaves)


def _grouped_update(inner, encode, num_groups, updates, state, params, extra_args):
  """``quantize_state``'s update with ``leaf_groups = num_groups > 1``."""
  flat_u, udef = jax.tree_util.tree_flatten_with_path(updates)
  param_index = {tuple(path): i for i, (path, _) in enumerate(flat_u)}
  flat_s, sdef = jax.tree_util.tree_flatten_with_path(state.inner_state, is_leaf=_is_quantized)
  owners = [_param_owner(tuple(path), param_index) for path, _ in flat_s]
  # Contiguous groups of parameters with about equal quantized state.
  weight = np.zeros(len(flat_u))
  for (_, x), owner in zip(flat_s, owners):
    if _is_quantized(x) and owner is not None:
      weight[owner] += math.prod(x.shape)
  cut = np.cumsum(weight) / max(weight.sum(), 1) * num_groups
  group_of = np.minimum(np.floor(cut - 1e-9), num_groups - 1).clip(0).astype(int)
  plain = [dequantize(x) if _is_quantized(x) else x for _, x in flat_s]
  new_u = [None] * len(flat_u)
  new_s = [None] * len(flat_s)
  token = ()
  for g in range(num_groups):
    mine = {j for j, o in enumerate(owners) if o is not None and group_of[o] == g}
    qs = sorted(j for j in mine if _is_quantized(flat_s[j][1]))
    leaves = list(plain)
    if qs:
      held, _ = jax.lax.optimization_barrier(([flat_s[j][1] for j in qs], token))
      for j, q in zip(qs, held):
        leaves[j] = dequantize(q)
    u, s = inner.update(udef.unflatten([x for _, x in flat_u]), sdef.unflatten(leaves), params, **extra_args)
    u_leaves = udef.flatten_up_to(u)
    s_leaves = sdef.flatten_up_to(s)
    last = g == num_groups - 1
    for i in range(len(flat_u)):
      if group_of[i] == g:
        new_u[i] = u_leaves[i]
    for j, (path, _) in enumerate(flat_s):
      if j in mine or (last and owners[j] is None):
        new_s[j] = encode(path, s_leaves[j])
    if qs:
      token = [new_s[j] for j in qs]
  return udef.unflatten(new_u), QuantizedState(inner_state=sdef.unflatten(new_s))
