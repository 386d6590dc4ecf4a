"""LoRA linear layer (Hu et al., 2021), as used by ReLoRA (Lialin et al., 2023).

``y = x @ kernel + scale * dropout(x) @ lora_a @ lora_b`` with
``scale = alpha / rank``:

* ``kernel`` (in, out): an ``nnx.Param``, the base weight. It is a Param (not a
  frozen variable) so the trainer's params tree carries it and ReLoRA can merge
  into it. The layer stops its gradient (``freeze_kernel=True``), and the
  optimizer keeps it fixed between merges (``lowrank_jax.optim.relora`` gives
  it exactly zero updates and no optimizer state).
* ``lora_a`` (in, rank): an ``nnx.LoRAParam`` (a ``Param`` subclass), drawn
  from Kaiming-uniform with ``a = sqrt(5)`` as PyTorch's ``nn.Linear`` default
  (and the official LoRA / ReLoRA code) initialises ``lora_A``. For a weight of
  fan-in ``in``, gain ``sqrt(2 / (1 + a^2)) = sqrt(1/3)`` and bound
  ``gain * sqrt(3 / in)``, i.e. ``U(-1/sqrt(in), 1/sqrt(in))`` (std
  ``1/sqrt(3 * in)``).
* ``lora_b`` (rank, out): an ``nnx.LoRAParam``, zeros.

So a fresh layer computes exactly the base linear, and the gradient w.r.t.
``lora_b`` is non-zero from the first step (``A != 0``); ``lora_a`` starts
receiving gradient as soon as ``B`` moves (one step later), exactly as in LoRA.
Both factors are never zero together at initialisation (that would leave the
adapter without any gradient, so nothing would train until the first merge).

Computation is in ``dtype`` (inputs and parameters are cast); the result has
dtype ``dtype``. The base product is computed exactly as :class:`Dense` does,
so with ``B == 0`` the layer returns bit-for-bit what ``Dense`` returns.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lowrank_jax.nn.dense import (MATMUL_INPUT, DTypeLike, Initializer, default_kernel_init,
    init_linear, matmul, positive_int, positive_number)
from lowrank_jax.nn.velora import VeLoRAInput

__all__ = ['LoRALinear', 'lora_a_bound', 'lora_a_init']


def lora_a_bound(in_features: int) -> float:
  """Bound of ``U(-b, b)`` that Kaiming-uniform(a=sqrt(5)) gives for fan-in ``in_features``."""
  gain = math.sqrt(2.0 / (1.0 + 5.0))  # a = sqrt(5)
  return gain * math.sqrt(3.0 / in_features)  # == 1 / sqrt(in_features)


def lora_a_init(key: jax.Array, shape: tuple[int, ...],
                dtype: DTypeLike = jnp.float32) -> jax.Array:
  """Kaiming-uniform(a=sqrt(5)) for an ``(..., in, rank)`` factor (fan-in = ``shape[-2]``)."""
  bound = lora_a_bound(shape[-2])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoRALinear(nnx.Module, VeLoRAInput):
  """``y = x @ kernel + (alpha / rank) * dropout(x) @ lora_a @ lora_b`` (no bias).

  Args:
    in_features, out_features: as :class:`Dense`.
    dtype: compute dtype (inputs and parameters are cast to it).
    param_dtype: storage dtype of ``kernel``, ``lora_a`` and ``lora_b``.
    kernel_init: initialiser of the base ``kernel`` (in, out).
    rngs: ``nnx.Rngs``; its ``params`` stream draws ``kernel`` then ``lora_a``.
      When ``dropout > 0`` the layer also keeps a fork of its ``dropout``
      stream (falls back to ``default``), so it can be called without rngs.
      That stream is non-``Param`` state of the model (``RngKey`` /
      ``RngCount``); reseed it with ``nnx.reseed(model, dropout=key)``.
    rank: LoRA rank ``r`` (>= 1).
    alpha: LoRA alpha (> 0); ``scale = alpha / rank``. Defaults as the ReLoRA
      paper / official code: ``rank=128, alpha=32``.
    dropout: dropout rate on the adapter's input in ``[0, 1)``. With ``0`` (the
      default) no dropout module and no RNG state are created.
    freeze_kernel: stop the gradient into ``kernel`` (default True): its
      gradient is exactly zero, so XLA skips the full-size weight-gradient
      product and a global-norm clip before the optimizer only sees the
      trainable factors (the official code sets ``requires_grad=False`` on the
      base weight). The kernel still changes through ReLoRA merges or
      :meth:`merge`. Set False to train kernel and adapters jointly.
    velora_sub_token_size: compress the adapter's input as VeLoRA does
      (:func:`lowrank_jax.nn.velora.velora_matmul`): the ``x @ lora_a`` product
      saves only the rank-1 sub-token projections of ``x`` for backward. With
      a frozen kernel the base path needs no ``x`` for its backward either, so
      the layer then keeps no full copy of its input. ``None``: off.
    velora_scale, velora_v_init: VeLoRA's gradient scale and the choice of its
      projection vector (``'batch_average_once'``, ``'batch_average'``, ``'random'``).

  Attributes: ``in_features, out_features, rank, alpha, scale, dropout_rate``,
  ``kernel`` (Param), ``lora_a`` / ``lora_b`` (LoRAParam).

  Dropout follows ``nnx.Dropout``: active unless ``deterministic=True`` is given
  at call time or the module is put in eval mode (``model.eval()``); call-time
  ``rngs`` take precedence over the stored stream.
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
      rank: int = 128,
      alpha: float = 32.0,
      dropout: float = 0.0,
      freeze_kernel: bool = True,
      velora_sub_token_size: int | None = None,
      velora_scale: float = 1.0,
      velora_v_init: str = 'batch_average_once',
  ):
    self.rank = positive_int(self, 'rank', rank)
    self.alpha = positive_number(self, 'alpha', alpha)
    if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
        or not 0.0 <= dropout < 1.0):
      raise ValueError(f'LoRALinear: dropout must be a number in [0, 1), got {dropout!r}')
    self.scale = self.alpha / self.rank
    self.dropout_rate = float(dropout)
    self.freeze_kernel = bool(freeze_kernel)
    # The kernel takes the params stream's first key (as Dense's), lora_a the next.
    init_linear(self, in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, rngs=rngs)
    self.lora_a = nnx.LoRAParam(
        lora_a_init(rngs.params(), (self.in_features, self.rank), self.param_dtype))
    self.lora_b = nnx.LoRAParam(jnp.zeros((self.rank, self.out_features), self.param_dtype))
    if self.dropout_rate > 0.0:
      self.dropout = nnx.Dropout(self.dropout_rate, rngs=rngs)
    else:
      self.dropout = None
    self.compress_input = velora_sub_token_size is not None
    if self.compress_input:
      self.init_velora(self.in_features, num_groups=None, sub_token_size=velora_sub_token_size,
                       scale=velora_scale, v_init=velora_v_init, key=rngs.params())

  @property
  def frozen_params(self) -> tuple[str, ...]:
    """Parameters whose gradient the layer stops (a model leaves them out of its optimization barriers)."""
    return ('kernel',) if self.freeze_kernel else ()

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    x = checkpoint_name(x.astype(self.dtype), MATMUL_INPUT)  # as in Dense: for remat policies
    kernel = self.kernel[...]
    if self.freeze_kernel:
      kernel = jax.lax.stop_gradient(kernel)
    # Exactly Dense's computation for the base path.
    y = matmul(x, kernel.astype(self.dtype))
    h = x
    if self.dropout is not None:
      h = self.dropout(h, deterministic=deterministic, rngs=rngs)
    # (x A) is the small [.., r] activation: scale it there, then project up.
    lora_a = self.lora_a[...].astype(self.dtype)
    if self.compress_input:
      low = self.velora_dot(h, lora_a) * jnp.asarray(self.scale, self.dtype)
    else:
      low = matmul(h, lora_a) * jnp.asarray(self.scale, self.dtype)
    return y + matmul(low, self.lora_b[...].astype(self.dtype))

  def delta(self) -> jax.Array:
    """``scale * lora_a @ lora_b`` (in, out), computed in float32."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return self.scale * (a @ b)

  def merge(self, *, rngs: nnx.Rngs | None = None) -> None:
    """Folds ``scale * A @ B`` into ``kernel`` and sets ``B`` to zero.

    The function computed by the layer is unchanged (up to rounding into
    ``param_dtype``). With ``rngs``, ``A`` is also re-drawn from its initial
    distribution (the ReLoRA "merge and re-init"); without, ``A`` is kept.
    For training with an optimizer use ``lowrank_jax.optim.relora``, which
    does the merge inside the update (so optimizer state stays consistent).
    """
    kernel = self.kernel[...]
    self.kernel[...] = (kernel.astype(jnp.float32) + self.delta()).astype(kernel.dtype)
    self.lora_b[...] = jnp.zeros_like(self.lora_b[...])
    if rngs is not None:
      self.lora_a[...] = lora_a_init(rngs.params(), self.lora_a[...].shape,
                                     self.lora_a[...].dtype)
