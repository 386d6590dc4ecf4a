"""Multi-head LoRA linear layer for LTE (Huh et al., 2024).

"Training Neural Networks from Scratch with Parallel Low-Rank Adapters"
(LoRA-the-Explorer, LTE; official code: github.com/minyoungg/LTE). ``N``
LoRA heads ``(A_h, B_h)`` are trained in parallel on ``N`` disjoint parts of
the batch, all sharing one main weight ``W``; every ``T`` steps their updates
are averaged into ``W``. This module is the layer; the merge lives in the
optimizer (``lowrank_jax.optim.lte.lte_merge``).

Variables (``nnx.to_pure_dict(nnx.state(layer, nnx.Param))`` gives
``kernel, lora_a, lora_b, lora_v_a, lora_v_b`` side by side):

* ``kernel`` ``W`` (in, out): ``nnx.Param``. Its gradient is always stopped:
  it changes only through merges.
* ``lora_a`` (N, in, r) and ``lora_b`` (N, r, out): ``nnx.LoRAParam``, the
  only trainable variables. ``A_h`` is drawn as in the official code: an
  orthogonal matrix (orthonormal columns when ``r <= in``) scaled by
  ``sqrt(in / r)`` (:func:`lte_a_init`), independently per head; ``B_h = 0``.
* ``lora_v_a`` (N, in, r) and ``lora_v_b`` (N, r, out): :class:`LoRASnapshot`
  (a ``Param`` subclass, *not* a ``LoRAParam``), the factors of every head at
  the last merge, so ``V_h = A_h^last B_h^last`` is head ``h``'s contribution
  already folded into ``W``. Zeros at initialisation (``V_h = 0``). Their
  gradient is stopped too; only the merge writes them (as the kernel).
  Keeping ``V`` in factored form costs the same memory as the adapters
  (``2 N r (in + out)`` scalars for A, B, V_a, V_b) instead of ``N in out``.

Why ``V`` is a ``Param``: the merge must write ``V_h <- A_h B_h`` and the
optimizer only sees (and updates) the trainer's params tree. Non-``Param``
variables travel in the trainer's ``rest``, which the optimizer cannot touch;
and the layer cannot read optimizer state. As a ``Param`` subclass, ``V`` is
in the params dict, checkpointed with it, excluded from the trainable count
(filter ``nnx.LoRAParam``), and masked out of the inner optimizer exactly like
the kernel (no moments, update zero between merges).

Forward, with ``s = alpha / r`` and ``D_h = A_h B_h - V_h`` (head ``h``'s
progress since the last merge), in the layout ``y = x @ W``:

* ``mode='parallel'`` (LTE): the leading (batch) axis of ``x`` is split into
  ``N`` equal contiguous parts; part ``h`` sees ``x W + s x D_h``. This is
  head ``h``'s own model ``W + s D_h``, as in the official reset-less DDP
  layer (``lte/ddp``). A batch size not divisible by ``N`` is a ValueError.
* ``mode='mhlora'``: every example sees ``x W + (s / N) sum_h x D_h``, the
  average of the heads' models. Before any merge (``V = 0``) this is
  ``x W + (s/N) sum_h x A_h B_h``. Subtracting ``V`` keeps the function
  unchanged across merges (after a merge ``W`` holds the average). The
  official ``mhlora`` layer sums the heads with scale ``s`` and never merges;
  here the heads are averaged, so ``s`` means the same in both modes and the
  mhlora model is exactly what ``W`` becomes at the next merge.
* Evaluation: ``use_heads=False`` computes ``x W`` only. In ``'parallel'``
  mode, ``deterministic=True`` (call time) or ``model.eval()`` (sets the
  ``deterministic`` attribute) also uses ``W`` only, as the official layer
  does outside training: after a merge ``W`` holds the average of the heads,
  and any batch size works. In ``'mhlora'`` mode the forward is already the
  same for every example and is the trained model itself, so evaluation keeps
  the heads unless ``use_heads=False`` is given.

Only ``A`` and ``B`` receive gradients. Computation is in ``dtype`` (inputs
and parameters are cast); the result has dtype ``dtype``. The base product is
computed exactly as ``Dense`` does, so with ``D = 0`` and ``use_heads=False``
the result is bit-for-bit ``Dense``'s.

Heads across devices: the heads axis is the leading axis of every head
variable and, in ``'parallel'`` mode, of the reshaped input ``(N, B/N, ...)``,
so sharding the head variables and the batch over one mesh axis keeps each
head's adapter product on the device holding its part of the batch. Inside
``jax.shard_map`` / ``jax.pmap`` a ``'parallel'`` layer may hold only its
device's block of heads (the variables' leading axis, not ``num_heads``, is
the number of heads used) and then splits that device's part of the batch
among them; ``lowrank_jax.optim.lte.lte_merge(axis_name=...)`` merges such
heads.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.nn.dense import (DTypeLike, Initializer, default_kernel_init, init_linear, matmul,
    positive_int, positive_number)

MODES: tuple[str, ...] = ('parallel', 'mhlora')

__all__ = ['MODES', 'LoRASnapshot', 'MultiHeadLoRALinear', 'lte_a_init']


class LoRASnapshot(nnx.Param):
  """A LoRA factor as it was at the last merge: in params, never trained, written by merges."""


def lte_a_init(key: jax.Array, shape: tuple[int, ...],
               dtype: DTypeLike = jnp.float32) -> jax.Array:
  """LTE's init of ``A``: per ``(in, r)`` matrix, orthogonal times ``sqrt(in / r)``.

  ``shape`` is ``(..., in, r)``; every leading index (e.g. each head) gets an
  independent draw. The official code applies ``nn.init.orthogonal_`` to the
  PyTorch weight ``(r, in)`` and multiplies it by ``sqrt(in / r)``: for
  ``r <= in`` the ``r`` columns of our ``(in, r)`` matrix are orthonormal, so
  each has norm ``sqrt(in / r)`` after scaling (rows are orthonormal instead
  when ``r > in``).
  """
  *lead, fan_in, rank = shape
  n = int(np.prod(lead)) if lead else 1
  ortho = nnx.initializers.orthogonal()
  keys = jax.random.split(key, n)
  mats = jax.vmap(lambda k: ortho(k, (fan_in, rank), jnp.float32))(keys)
  mats = mats * math.sqrt(fan_in / rank)
  return mats.reshape(shape).astype(dtype)


class MultiHeadLoRALinear(nnx.Module):
  """``N`` parallel LoRA heads on a shared, merge-only kernel (see the module docstring).

  Args:
    in_features, out_features, dtype, param_dtype, kernel_init, rngs: as
      ``Dense``; the ``params`` stream draws ``kernel`` then ``lora_a``.
    num_heads: number of heads ``N`` (>= 1).
    rank: rank ``r`` of every head (>= 1).
    alpha: LoRA alpha (> 0); ``scale = alpha / rank``. The defaults
      (``num_heads=32, rank=32, alpha=4096``) are the official README's.
    mode: ``'parallel'`` (LTE: batch split over the heads) or ``'mhlora'``
      (every example sees the average of the heads).

  Call: ``layer(x, *, use_heads=None, deterministic=None)``. ``use_heads``
  (bool) forces the heads on/off; by default they are used except in
  ``'parallel'`` mode when deterministic (call argument, else the
  ``deterministic`` attribute that ``model.eval()`` / ``model.train()`` set).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      dtype: DTypeLike = jnp.float32,
      param_dtype: DTypeLike = jnp.float32,
      kernel_init: Initializer = default_kernel_init,
      rngs: nnx.Rngs,
      num_heads: int = 32,
      rank: int = 32,
      alpha: float = 4096.0,
      mode: str = 'parallel',
  ):
    self.num_heads = positive_int(self, 'num_heads', num_heads)
    self.rank = positive_int(self, 'rank', rank)
    self.alpha = positive_number(self, 'alpha', alpha)
    if mode not in MODES:
      raise ValueError(f'MultiHeadLoRALinear: mode must be one of {list(MODES)}, got {mode!r}')
    self.scale = self.alpha / self.rank
    self.mode = mode
    self.deterministic = False
    # The kernel takes the params stream's first key (as Dense's), lora_a the next.
    init_linear(self, in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, rngs=rngs)
    n, i, o, r = self.num_heads, self.in_features, self.out_features, self.rank
    self.lora_a = nnx.LoRAParam(lte_a_init(rngs.params(), (n, i, r), self.param_dtype))
    self.lora_b = nnx.LoRAParam(jnp.zeros((n, r, o), self.param_dtype))
    self.lora_v_a = LoRASnapshot(jnp.zeros((n, i, r), self.param_dtype))
    self.lora_v_b = LoRASnapshot(jnp.zeros((n, r, o), self.param_dtype))

  def _uses_heads(self, use_heads: bool | None, deterministic: bool | None) -> bool:
    if use_heads is not None:
      return bool(use_heads)
    det = self.deterministic if deterministic is None else deterministic
    return not (det and self.mode == 'parallel')

  def _factors(self) -> tuple[jax.Array, jax.Array]:
    """``[A_h | V_a,h]`` (N, in, 2r) and ``[B_h ; -V_b,h]`` (N, 2r, out): one product gives ``D_h``."""
    cast = lambda v: v[...].astype(self.dtype)
    a = jnp.concatenate([cast(self.lora_a), jax.lax.stop_gradient(cast(self.lora_v_a))], -1)
    b = jnp.concatenate([cast(self.lora_b), -jax.lax.stop_gradient(cast(self.lora_v_b))], -2)
    return a, b

  #: Parameters whose gradient the layer stops (a model leaves them out of its optimization barriers).
  frozen_params = ('kernel', 'lora_v_a', 'lora_v_b')

  def __call__(self, x: jax.Array, *, use_heads: bool | None = None,
               deterministic: bool | None = None) -> jax.Array:
    x = x.astype(self.dtype)
    kernel = jax.lax.stop_gradient(self.kernel[...])
    y = matmul(x, kernel.astype(self.dtype))  # exactly Dense's computation
    if not self._uses_heads(use_heads, deterministic):
      return y
    a, b = self._factors()
    n = self.num_heads
    if self.mode == 'mhlora':
      low = jnp.einsum('...i,nir->...nr', x, a)  # small [..., N, 2r] activation
      low = low * jnp.asarray(self.scale / n, self.dtype)
      return y + jnp.einsum('...nr,nro->...o', low, b)
    # 'parallel': contiguous parts of the leading axis, part h -> head h.
    if x.ndim < 2:
      raise ValueError(
          f"MultiHeadLoRALinear(mode='parallel'): input must have a leading batch axis, "
          f'got shape {x.shape}')
    # The heads this layer holds: all N, or under shard_map / pmap with the
    # heads split over devices, this device's block (and x is its share of the batch).
    n = a.shape[0]
    batch = x.shape[0]
    if batch % n:
      raise ValueError(
          f"MultiHeadLoRALinear(mode='parallel'): batch size {batch} (leading axis of input "
          f'{x.shape}) must be divisible by the number of heads it holds, {n} (num_heads={self.num_heads})')
    xs = x.reshape(n, -1, self.in_features)  # (N, B/N * ..., in)
    low = jnp.einsum('nti,nir->ntr', xs, a) * jnp.asarray(self.scale, self.dtype)
    delta = jnp.einsum('ntr,nro->nto', low, b)
    return y + delta.reshape(y.shape)
