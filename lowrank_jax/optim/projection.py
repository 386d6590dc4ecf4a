"""Projection core shared by GaLore and Online Subspace Descent.

Everything here is a pure function of arrays (plus small static descriptions),
so it can be reused by any Optax code. Nothing here imports the rest of
``lowrank_jax``.

Conventions
-----------
**Matrix view.** A projected parameter is viewed as a (batch of) matrices in
*canonical* ``(n_in, n_out)`` orientation, the way Flax stores a ``Dense``
kernel: ``y = x @ X``. :class:`MatrixAxes` says which storage axes are the
input ("reduction") axes and which are the output axes; all other axes are
*batch* axes, and every batch index gets its own projector (e.g. a stacked
``(layers, in, out)`` kernel). The default ``MatrixAxes(-2, -1)`` fits Flax
kernels and stacked Flax kernels; a PyTorch-style ``(out, in)`` weight is
``MatrixAxes(in_axes=1, out_axes=0)``; an attention kernel stored
``(embed, heads, head_dim)`` is ``MatrixAxes(0, (1, 2))`` and its output
projection ``(heads, head_dim, embed)`` is ``MatrixAxes((0, 1), 2)``.

**Sides.** A projector compresses the ``'in'`` side (``P`` of shape
``(n_in, r)``, low-rank gradient ``P^T X`` of shape ``(r, n_out)``) or the
``'out'`` side (``Q`` of shape ``(n_out, r)``, low-rank gradient ``X Q`` of
shape ``(n_in, r)``) or both (``P^T X Q``, ``(r, r)``). The ``proj_type``
names follow the official GaLore code, whose PyTorch weights are the
*logical* ``(out, in)`` matrix ``W = X^T``:

=============== ========================================= ==================
``proj_type``   compressed side                            low-rank shape
=============== ========================================= ==================
``std``         the smaller dim; ``'in'`` on ties          ``r x max(m, n)``
``reverse_std`` the larger dim; ``'out'`` on ties          ``r x min(m, n)``
``right``       ``'in'`` (``W @ V_r``: right singular      ``r x n_out``
                vectors of the ``(out, in)`` matrix)
``left``        ``'out'`` (``U_r^T @ W``: left singular    ``n_in x r``
                vectors of the ``(out, in)`` matrix)
``full``        both                                       ``r x r``
=============== ========================================= ==================

Because sides are decided on ``(n_in, n_out)`` and not on the storage layout,
a Flax ``(in, out)`` kernel and the same matrix stored ``(out, in)`` (given
``MatrixAxes(1, 0)``) get the same subspace and transposed updates; ties
(square matrices) are broken as in the official code (``std`` on a square
``(out, in)`` weight projects with ``Vh``, i.e. compresses ``in``).
``optax.contrib.galore`` compresses the larger dimension of the stored
array, which is ``reverse_std`` here.

The effective rank of a leaf is ``min(rank, n_in, n_out)``.

**Refresh strategies.** :func:`svd_projectors` (exact SVD in float32, the
GaLore paper), :func:`randomized_projector` (randomized range finder /
subspace iteration, warm-started from the previous projector, with a
Rayleigh-Ritz step) and :func:`online_pca_loss` / :func:`online_pca_grad`
(the Online Subspace Descent objective and its closed-form gradient, followed
by one optimizer step per training step instead of any decomposition).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

__all__ = [
    'MatrixAxes',
    'MatrixView',
    'PROJ_TYPES',
    'SIDES',
    'DEFAULT_EXCLUDED_KEYS',
    'RandomizedRefresh',
    'matrix_view',
    'projection_sides',
    'effective_rank',
    'project',
    'project_back',
    'svd_projectors',
    'randomized_projector',
    'online_pca_loss',
    'online_pca_grad',
    'captured_energy',
    'orthonormality_error',
    'principal_angles',
    'default_projection_mask',
    'path_key_names',
]

PROJ_TYPES = ('std', 'reverse_std', 'left', 'right', 'full')
SIDES = ('in', 'out')

Projectors = Mapping[str, jax.Array]


class MatrixAxes(NamedTuple):
  """Which axes of a stored parameter form the matrix a projector acts on.

  Attributes:
    in_axes: axis or axes of the input (reduction) dimension, flattened in
      order into ``n_in``.
    out_axes: axis or axes of the output dimension, flattened into ``n_out``.

  All remaining axes are batch axes (one projector per batch index).
  Negative axes count from the end, so the default ``MatrixAxes(-2, -1)``
  fits both an ``(in, out)`` Flax kernel and a stacked ``(layers, in, out)``
  one.
  """

  in_axes: Union[int, Sequence[int]] = -2
  out_axes: Union[int, Sequence[int]] = -1


def _normalize_axes(axes: Union[int, Sequence[int]], ndim: int) -> tuple[int, ...]:
  if isinstance(axes, int):
    axes = (axes,)
  out = []
  for a in axes:
    a = int(a)
    if not -ndim <= a < ndim:
      raise ValueError(f'axis {a} out of range for an array with {ndim} dims')
    out.append(a % ndim)
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class MatrixView:
  """Static description of how a stored array maps to canonical matrices.

  ``to_matrix(x)`` has shape ``batch_shape + (n_in, n_out)``;
  ``from_matrix`` inverts it.
  """

  shape: tuple[int, ...]
  batch_axes: tuple[int, ...]
  in_axes: tuple[int, ...]
  out_axes: tuple[int, ...]

  @property
  def perm(self) -> tuple[int, ...]:
    return self.batch_axes + self.in_axes + self.out_axes

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[a] for a in self.batch_axes)

  @property
  def n_in(self) -> int:
    return math.prod(self.shape[a] for a in self.in_axes)

  @property
  def n_out(self) -> int:
    return math.prod(self.shape[a] for a in self.out_axes)

  @property
  def matrix_shape(self) -> tuple[int, ...]:
    return self.batch_shape + (self.n_in, self.n_out)

  def to_matrix(self, x: jax.Array) -> jax.Array:
    if tuple(x.shape) != self.shape:
      raise ValueError(f'expected shape {self.shape}, got {x.shape}')
    return jnp.transpose(x, self.perm).reshape(self.matrix_shape)

  def from_matrix(self, m: jax.Array) -> jax.Array:
    permuted_shape = tuple(self.shape[a] for a in self.perm)
    inv = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
    return m.reshape(permuted_shape).transpose(inv)


def matrix_view(shape: Sequence[int], axes: Optional[MatrixAxes] = None) -> MatrixView:
  """Builds the :class:`MatrixView` of an array of ``shape`` under ``axes``."""
  shape = tuple(int(s) for s in shape)
  axes = MatrixAxes() if axes is None else axes
  ndim = len(shape)
  if ndim < 2:
    raise ValueError(f'a projected leaf needs >= 2 dims, got shape {shape}')
  ins = _normalize_axes(axes.in_axes, ndim)
  outs = _normalize_axes(axes.out_axes, ndim)
  if not ins or not outs:
    raise ValueError(f'empty in_axes or out_axes in {axes}')
  if len(set(ins + outs)) != len(ins) + len(outs):
    raise ValueError(f'in_axes and out_axes overlap or repeat in {axes}')
  batch = tuple(a for a in range(ndim) if a not in ins and a not in outs)
  return MatrixView(shape, batch, ins, outs)


def projection_sides(proj_type: str, n_in: int, n_out: int) -> tuple[str, ...]:
  """Sides (``'in'``, ``'out'``) compressed by ``proj_type`` on an ``(n_in, n_out)`` matrix.

  See the module docstring for the table; ``std`` and ``reverse_std`` break
  ties like the official GaLore code on the logical ``(out, in)`` matrix.
  """
  if proj_type == 'std':
    return ('in',) if n_out >= n_in else ('out',)
  if proj_type == 'reverse_std':
    return ('out',) if n_out >= n_in else ('in',)
  if proj_type == 'right':
    return ('in',)
  if proj_type == 'left':
    return ('out',)
  if proj_type == 'full':
    return ('in', 'out')
  raise ValueError(f'proj_type must be one of {PROJ_TYPES}, got {proj_type!r}')


def effective_rank(rank: int, n_in: int, n_out: int) -> int:
  """The rank actually used for a ``(n_in, n_out)`` matrix: ``min(rank, n_in, n_out)``."""
  return max(1, min(int(rank), n_in, n_out))


def _swap(x):
  return jnp.swapaxes(x, -1, -2)


def _side_matrix(x: jax.Array, side: str) -> jax.Array:
  """The matrix whose *left* singular vectors the ``side`` projector holds."""
  if side == 'in':
    return x
  if side == 'out':
    return _swap(x)
  raise ValueError(f'side must be one of {SIDES}, got {side!r}')


def project(x: jax.Array, projectors: Projectors) -> jax.Array:
  """Projects canonical matrices ``x`` (``(..., n_in, n_out)``) to the subspace.

  ``projectors`` maps ``'in'`` to ``P`` (``(..., n_in, r)``) and/or ``'out'``
  to ``Q`` (``(..., n_out, r)``); returns ``P^T x``, ``x Q`` or ``P^T x Q``.
  The result has the promoted dtype of ``x`` and the projectors.
  """
  y = x
  if 'in' in projectors:
    y = jnp.einsum('...ir,...io->...ro', projectors['in'], y)
  if 'out' in projectors:
    y = jnp.einsum('...io,...or->...ir', y, projectors['out'])
  return y


def project_back(y: jax.Array, projectors: Projectors) -> jax.Array:
  """Maps a low-rank ``y`` back to canonical full space (``P y``, ``y Q^T``, ``P y Q^T``)."""
  if 'out' in projectors:
    y = jnp.einsum('...ir,...or->...io', y, projectors['out'])
  if 'in' in projectors:
    y = jnp.einsum('...ir,...ro->...io', projectors['in'], y)
  return y


def svd_projectors(
    x: jax.Array,
    ranks: Union[Mapping[str, int], Sequence[tuple[str, int]]],
    dtype: Any = jnp.float32,
) -> dict[str, jax.Array]:
  """Exact projectors from one float32 SVD of ``x`` (the GaLore paper).

  Args:
    x: canonical matrices ``(..., n_in, n_out)``.
    ranks: side -> rank, e.g. ``{'in': 128}`` (or pairs ``(('in', 128),)``,
      hashable, for a static argument of ``jax.jit``).
    dtype: dtype of the returned projectors.

  Returns:
    side -> orthonormal columns: top-r left singular vectors for ``'in'``,
    top-r right singular vectors for ``'out'``.
  """
  ranks = dict(ranks)
  u, _, vh = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
  out = {}
  if 'in' in ranks:
    out['in'] = u[..., :, : ranks['in']].astype(dtype)
  if 'out' in ranks:
    out['out'] = _swap(vh[..., : ranks['out'], :]).astype(dtype)
  return out


@dataclasses.dataclass(frozen=True)
class RandomizedRefresh:
  """Settings of the randomized refresh (a static, hashable value).

  Attributes:
    oversample: extra random columns added to the ``rank`` warm-start columns.
    n_iter: subspace (power) iterations, each costing two products with the
      gradient and a thin QR. At least 1.
    seed: seed of the Gaussian test columns; folded with the step count and
      the leaf index, so no key is kept in the optimizer state.
  """

  oversample: int = 8
  n_iter: int = 2
  seed: int = 0

  def __post_init__(self):
    if self.n_iter < 1:
      raise ValueError('RandomizedRefresh.n_iter must be >= 1')
    if self.oversample < 0:
      raise ValueError('RandomizedRefresh.oversample must be >= 0')


_HI = jax.lax.Precision.HIGHEST


def randomized_projector(
    a: jax.Array,
    rank: int,
    key: jax.Array,
    prev: Optional[jax.Array] = None,
    *,
    cold: Union[bool, jax.Array] = False,
    oversample: int = 8,
    n_iter: int = 2,
    dtype: Any = jnp.float32,
) -> jax.Array:
  """Approximate top-``rank`` left singular vectors of ``a`` (``(..., d, k)``).

  Subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4) started from
  ``[prev, Gaussian(oversample)]`` (or from ``rank + oversample`` Gaussian
  columns when ``prev`` is None or ``cold`` is true), ``n_iter`` steps of
  ``Q <- qr(a a^T Q)``, then a Rayleigh-Ritz step: the eigenvectors of the
  small ``(l, l)`` matrix ``(Q^T a)(Q^T a)^T`` rotate ``Q`` so that its first
  ``rank`` columns are ordered by captured energy. Cost: ``2 n_iter + 1``
  products of ``a`` with a ``(d, l)`` block, ``l = rank + oversample``; no
  decomposition larger than ``l x l`` besides the thin QR.

  For a warm start pass the previous projector of the same side, for a cold
  start (first step) ``cold=True`` (may be a traced boolean).
  """
  a = a.astype(jnp.float32)
  d = a.shape[-2]
  batch = a.shape[:-2]
  rank = min(int(rank), d)
  l = min(rank + int(oversample), d)
  omega = jax.random.normal(key, batch + (d, l), jnp.float32)
  if prev is not None:
    head = jnp.where(cold, omega[..., :rank], prev.astype(jnp.float32))
    omega = jnp.concatenate([head, omega[..., rank:]], axis=-1)

  at = _swap(a)

  def body(_, q):
    z = jnp.matmul(a, jnp.matmul(at, q, precision=_HI), precision=_HI)
    q, _ = jnp.linalg.qr(z)
    return q

  q = jax.lax.fori_loop(0, int(n_iter), body, omega)
  b = jnp.matmul(_swap(q), a, precision=_HI)  # (l, k)
  c = jnp.matmul(b, _swap(b), precision=_HI)  # (l, l)
  _, v = jnp.linalg.eigh(c)  # ascending eigenvalues
  v = v[..., :, ::-1][..., :, :rank]
  return jnp.matmul(q, v, precision=_HI).astype(dtype)


def online_pca_loss(
    p: jax.Array, x: jax.Array, side: str, orthogonality: float = 0.0
) -> jax.Array:
  """Online Subspace Descent objective for one side, summed over batch.

  ``||A~ - P P^T A~||_F^2 + orthogonality * ||P^T P - I||_F^2`` with
  ``A~ = A / ||A||_F``, where ``A = x`` for the ``'in'`` side and ``x^T`` for
  the ``'out'`` side, i.e. for the official code's ``(out, in)`` weight ``W``:
  ``||W~ - W~ P P^T||`` (``right``) and ``||W~ - P P^T W~||`` (``left``).
  Computed in float32. ``P`` needs not be orthonormal.
  """
  a = _side_matrix(x, side).astype(jnp.float32)
  p = p.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(a), axis=(-2, -1), keepdims=True))
  a = a / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny)
  b = jnp.matmul(_swap(p), a)
  resid = a - jnp.matmul(p, b)
  loss = jnp.sum(jnp.square(resid))
  if not (isinstance(orthogonality, (int, float)) and orthogonality == 0):
    r = p.shape[-1]
    gram = jnp.matmul(_swap(p), p) - jnp.eye(r, dtype=p.dtype)
    loss = loss + orthogonality * jnp.sum(jnp.square(gram))
  return loss


def online_pca_grad(
    p: jax.Array,
    x: jax.Array,
    side: str,
    orthogonality: float = 0.0,
    pa: Optional[jax.Array] = None,
) -> jax.Array:
  """Closed-form gradient of :func:`online_pca_loss` with respect to ``p``.

  With ``A`` the side matrix, ``n = ||A||_F^2`` and ``B = P^T A``::

    dL/dP = -(2 / n) (2 A B^T - A B^T (P^T P) - P (B B^T))
            + 4 lambda P (P^T P - I)

  ``pa`` may pass a precomputed ``P^T A`` (for the ``'in'`` side that is the
  GaLore low-rank gradient ``P^T X``, for ``'out'`` the transpose of ``X Q``),
  which leaves one product with the full matrix (``A B^T``) per step, against
  five for ``jax.grad`` of the loss. Computed in float32.
  """
  a = _side_matrix(x, side).astype(jnp.float32)
  p = p.astype(jnp.float32)
  n = jnp.sum(jnp.square(a), axis=(-2, -1), keepdims=True)
  inv = 1.0 / jnp.maximum(n, jnp.finfo(jnp.float32).tiny)
  b = jnp.matmul(_swap(p), a) if pa is None else pa.astype(jnp.float32)
  ab = jnp.matmul(a, _swap(b))  # (d, r)
  d, k = a.shape[-2:]
  # B B^T = P^T (A B^T): the cheaper of the two products (d vs k rows).
  bb = jnp.matmul(_swap(p), ab) if d <= k else jnp.matmul(b, _swap(b))  # (r, r)
  ptp = jnp.matmul(_swap(p), p)  # (r, r)
  grad = -2.0 * inv * (2.0 * ab - jnp.matmul(ab, ptp) - jnp.matmul(p, bb))
  if not (isinstance(orthogonality, (int, float)) and orthogonality == 0):
    eye = jnp.eye(p.shape[-1], dtype=jnp.float32)
    grad = grad + 4.0 * orthogonality * jnp.matmul(p, ptp - eye)
  return grad


def captured_energy(x: jax.Array, projectors: Projectors) -> jax.Array:
  """``||proj(x)||_F^2 / ||x||_F^2`` (over all batch entries), in float32.

  With orthonormal projectors this is the fraction of the gradient's energy
  kept in the subspace.
  """
  x = x.astype(jnp.float32)
  pr = {k: v.astype(jnp.float32) for k, v in projectors.items()}
  y = project(x, pr)
  return jnp.sum(jnp.square(y)) / jnp.sum(jnp.square(x))


def orthonormality_error(p: jax.Array) -> jax.Array:
  """``max |P^T P - I|`` over all entries (float32)."""
  p = p.astype(jnp.float32)
  gram = jnp.matmul(_swap(p), p, precision=_HI)
  return jnp.max(jnp.abs(gram - jnp.eye(p.shape[-1], dtype=jnp.float32)))


def principal_angles(a: jax.Array, b: jax.Array) -> jax.Array:
  """Principal angles (radians, ascending) between the column spans of ``a`` and ``b``.

  The columns need not be orthonormal (they are orthonormalized first).
  """
  qa, _ = jnp.linalg.qr(a.astype(jnp.float32))
  qb, _ = jnp.linalg.qr(b.astype(jnp.float32))
  s = jnp.linalg.svd(jnp.matmul(_swap(qa), qb, precision=_HI), compute_uv=False)
  return jnp.arccos(jnp.clip(s, -1.0, 1.0))


# ---------------------------------------------------------------------------
# Which leaves are projected.

DEFAULT_EXCLUDED_KEYS = ('head', 'lm_head', 'embed*', 'wte', 'wpe')


def path_key_names(path: Sequence[Any]) -> tuple[str, ...]:
  """The names of a ``jax.tree_util`` key path as strings."""
  names = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      names.append(str(k.name))
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      names.append(str(k.key))
    else:
      names.append(str(k))
  return tuple(names)


def _excluded(name: str, exclude: Sequence[str]) -> bool:
  for pat in exclude:
    if pat.endswith('*'):
      if name.startswith(pat[:-1]):
        return True
    elif name == pat:
      return True
  return False


def default_projection_mask(
    params: Any,
    *,
    rank: Optional[int] = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDED_KEYS,
) -> Any:
  """The default choice of projected leaves: the 2-D kernels of the linears.

  A leaf is projected when

  * it is 2-D,
  * the last key of its path is ``kernel``,
  * no key of its path matches ``exclude`` (exact names, or prefixes written
    ``'embed*'``; by default the output head and embeddings are excluded),
  * and, when ``rank`` is given, both its dims are ``>= rank`` (a smaller
    matrix would only be rotated, not compressed, at the price of an SVD).

  This matches the official GaLore recipe for LLaMA: the attention and MLP
  linears (``layers/0/attn/q/kernel``, ``layers/0/mlp/gate/kernel``, ...),
  not ``embed/embedding``, ``head/kernel`` or norm scales. Stacked kernels
  (3-D) and kernels stored with split head axes are not selected: pass an
  explicit mask with :class:`MatrixAxes` leaves for those.

  Args:
    params: a pytree of arrays (or of ``jax.ShapeDtypeStruct``); e.g. the
      ``.to_pure_dict()`` of an ``nnx.State``.
    rank: optional minimum size of both dims.
    exclude: path names never projected.

  Returns:
    A pytree of bools with the structure of ``params``.
  """

  def leaf_fn(path, x):
    shape = getattr(x, 'shape', ())
    if len(shape) != 2:
      return False
    names = path_key_names(path)
    if not names or names[-1] != 'kernel':
      return False
    if any(_excluded(n, exclude) for n in names):
      return False
    if rank is not None and min(shape) < rank:
      return False
    return True

  return jax.tree_util.tree_map_with_path(leaf_fn, params)
