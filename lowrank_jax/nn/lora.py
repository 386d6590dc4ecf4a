"""LoRA linear layer (Hu et al., 2021), as used by ReLoRA (Lialin et al., 2023), with its variants.

``y = x @ kernel + scale * dropout(x) @ lora_a @ lora_b`` with
``scale = alpha / rank``:

* ``kernel`` (in, out): an ``nnx.Param``, the base weight. It is a Param (not a
  frozen variable) so the trainer's params tree carries it and ReLoRA can merge
  into it. The layer stops its gradient (``freeze_kernel=True``), and the
  optimizer keeps it fixed between merges (``lowrank_jax.optim.relora`` gives
  it exactly zero updates and no optimizer state). It may hold a 4- or 8-bit
  frozen base (:class:`lowrank_jax.nn.quantized_base.QuantizedBase`, QLoRA);
  the base product is then :func:`~lowrank_jax.nn.quantized_base.frozen_matmul`.
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

The variants PEFT offers as options of its one ``LoraLayer`` are options here too:

* ``rank_scaling='rslora'``: rsLoRA (Kalajdzievski, 2023, https://arxiv.org/abs/2312.03732),
  ``scale = alpha / sqrt(rank)``, so the adapter's learning does not slow down as the rank grows.
* ``variant='dora'``: DoRA (Liu et al., 2024, https://arxiv.org/abs/2402.09353), weight
  decomposed into a trained magnitude per output column and a direction
  ``(W + s A B) / ||W + s A B||``.
* :meth:`LoRALinear.init_pissa` / :func:`pissa_init`: PiSSA (Meng et al., 2024,
  https://arxiv.org/abs/2404.02948), the adapters start as the kernel's principal components.

Computation is in ``dtype`` (inputs and parameters are cast); the result has
dtype ``dtype``. The base product is computed exactly as :class:`Dense` does,
so with ``B == 0`` the layer returns bit-for-bit what ``Dense`` returns (also
with DoRA: a fresh layer's magnitude over its norm is exactly 1).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from lowrank_jax.nn import quantized_base
from lowrank_jax.nn.dense import (MATMUL_INPUT, DTypeLike, Initializer, default_kernel_init,
    init_linear, matmul, positive_int, positive_number)
from lowrank_jax.nn.velora import VeLoRAInput

__all__ = ['RANK_SCALINGS', 'VARIANTS', 'LoRALinear', 'dora_weight_norm', 'lora_a_bound', 'lora_a_init',
           'lora_scale', 'pissa_init']

#: ``variant`` values: plain LoRA, or DoRA's magnitude and direction.
VARIANTS = ('lora', 'dora')
#: ``rank_scaling`` values: ``alpha / rank`` (LoRA) or ``alpha / sqrt(rank)`` (rsLoRA).
RANK_SCALINGS = ('alpha_over_r', 'rslora')

_HIGHEST = jax.lax.Precision.HIGHEST


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
  # float32 at full precision: on TPU the default f32 dot runs in bfloat16 passes, whose error
  # would show in a norm or an SVD residual. Only used for rank-sized products and inits.
  return jnp.matmul(a, b, precision=_HIGHEST)


def lora_scale(alpha: float, rank: int, rank_scaling: str = 'alpha_over_r') -> float:
  """The adapter's scale: ``alpha / rank``, or ``alpha / sqrt(rank)`` for ``'rslora'``.

  rsLoRA (Kalajdzievski, 2023, https://arxiv.org/abs/2312.03732, Theorem 3.2) shows that only
  ``1 / sqrt(rank)`` keeps the adapter's activations and gradients of order one as the rank
  grows; with ``1 / rank`` higher ranks learn no better than low ones.
  """
  if rank_scaling not in RANK_SCALINGS:
    raise ValueError(f'rank_scaling must be one of {list(RANK_SCALINGS)}, got {rank_scaling!r}')
  return float(alpha) / (math.sqrt(rank) if rank_scaling == 'rslora' else rank)


def lora_a_bound(in_features: int) -> float:
  """Bound of ``U(-b, b)`` that Kaiming-uniform(a=sqrt(5)) gives for fan-in ``in_features``."""
  gain = math.sqrt(2.0 / (1.0 + 5.0))  # a = sqrt(5)
  return gain * math.sqrt(3.0 / in_features)  # == 1 / sqrt(in_features)


def lora_a_init(key: jax.Array, shape: tuple[int, ...],
                dtype: DTypeLike = jnp.float32) -> jax.Array:
  """Kaiming-uniform(a=sqrt(5)) for an ``(..., in, rank)`` factor (fan-in = ``shape[-2]``)."""
  bound = lora_a_bound(shape[-2])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def dora_weight_norm(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float) -> jax.Array:
  """``||W + scale A B||`` of every output column (the norm over the ``in`` axis), float32 [out].

  DoRA's column norm (Liu et al., 2024, eq. 5; for torch's [out, in] weight PEFT's per-row norm).
  Expanded as ``||w||^2 + 2 s (A^T w) . b + s^2 b^T (A^T A) b`` per column, so the only full-size
  operand is the kernel itself: ``A B`` [in, out] is never formed (a quantized kernel is
  dequantized straight into a reduction and an ``r``-row product). With ``B == 0`` the two
  adapter terms are exact zeros, so the norm is exactly the kernel's column norm.
  """
  w = kernel.astype(jnp.float32)
  a = lora_a.astype(jnp.float32)
  b = lora_b.astype(jnp.float32)
  cross = jnp.sum(_dot(a.T, w) * b, axis=0)
  quad = jnp.sum(b * _dot(_dot(a.T, a), b), axis=0)
  squared = jnp.sum(w * w, axis=0) + (2.0 * scale) * cross + (scale * scale) * quad
  # Rounding can take a column that W + sAB (nearly) cancels below zero: its norm is 0 then.
  return jnp.sqrt(jnp.maximum(squared, 0.0))


def _randomized_svd(w: jax.Array, rank: int, iters: int, key: jax.Array,
                    oversample: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top singular triplets of ``w`` by randomized subspace iteration (Halko et al., 2011,
  https://arxiv.org/abs/0909.4061, Algorithm 4.4): ``rank + oversample`` Gaussian probes,
  ``iters`` power iterations re-orthonormalised at every product (plain powers lose the small
  directions to rounding), then the exact SVD of the small ``Q^T W``."""
  m, n = w.shape
  k = min(rank + oversample, m, n)
  q, _ = jnp.linalg.qr(_dot(w, jax.random.normal(key, (n, k), jnp.float32)))
  for _ in range(iters):
    z, _ = jnp.linalg.qr(_dot(w.T, q))
    q, _ = jnp.linalg.qr(_dot(w, z))
  u, s, vt = jnp.linalg.svd(_dot(q.T, w), full_matrices=False)
  return _dot(q, u), s, vt


def pissa_init(kernel: jax.Array, rank: int, scale: float, *, iters: int = 0, key: jax.Array | None = None,
               oversample: int = 10) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PiSSA's adapters and residual kernel (Meng et al., 2024, https://arxiv.org/abs/2404.02948).

  With ``kernel = U S V^T`` ([in, out], float32) and its rank-``r`` truncation ``U_r S_r V_r^T``:
  ``lora_a = U_r sqrt(S_r / scale)`` [in, r], ``lora_b = sqrt(S_r / scale) V_r^T`` [r, out] and
  ``residual = kernel - scale * lora_a @ lora_b`` [in, out], so ``scale * A B`` is the principal
  part and ``residual + scale * A B == kernel`` up to rounding: the model is unchanged, and
  fine-tuning moves the principal directions while the residual stays frozen (PEFT's
  ``init_lora_weights='pissa'``; its factors are these, transposed to torch's layout).

  Args:
    kernel: the [in, out] weight (any float dtype; computed in float32).
    rank: ``r``, at most ``min(in, out)``.
    scale: the layer's adapter scale (:func:`lora_scale`).
    iters: 0: the exact SVD (``jnp.linalg.svd``); ``N > 0``: a randomized SVD with ``N``
      subspace iterations (Halko et al., 2011; PEFT's ``'pissa_niter_N'``), much cheaper for
      large kernels and close to exact when the spectrum decays.
    key: the random probes' key, needed when ``iters > 0``.
    oversample: extra probes of the randomized SVD beyond ``rank`` (Halko et al. use 5 to 10).

  Returns:
    ``(lora_a, lora_b, residual)``, float32.
  """
  w = jnp.asarray(kernel).astype(jnp.float32)
  if w.ndim != 2:
    raise ValueError(f'pissa_init: kernel must be 2-D [in, out], got shape {w.shape}')
  if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= min(w.shape):
    raise ValueError(f'pissa_init: rank must be an integer in [1, {min(w.shape)}], got {rank!r}')
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
    raise ValueError(f'pissa_init: iters must be an integer >= 0, got {iters!r}')
  if iters:
    if key is None:
      raise ValueError('pissa_init: a randomized SVD (iters > 0) needs key')
    u, s, vt = _randomized_svd(w, rank, iters, key, oversample)
  else:
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  root = jnp.sqrt(s[:rank] / scale)
  a = u[:, :rank] * root[None, :]
  b = root[:, None] * vt[:rank]
  return a, b, w - scale * _dot(a, b)


class LoRALinear(nnx.Module, VeLoRAInput):
  """``y = x @ kernel + scale * dropout(x) @ lora_a @ lora_b`` (no bias), or its DoRA form.

  Args:
    in_features, out_features: as :class:`Dense`.
    dtype: compute dtype (inputs and parameters are cast to it).
    param_dtype: storage dtype of ``kernel``, ``lora_a``, ``lora_b`` (and ``lora_magnitude``).
    kernel_init: initialiser of the base ``kernel`` (in, out).
    rngs: ``nnx.Rngs``; its ``params`` stream draws ``kernel`` then ``lora_a``.
      When ``dropout > 0`` the layer also keeps a fork of its ``dropout``
      stream (falls back to ``default``), so it can be called without rngs.
      That stream is non-``Param`` state of the model (``RngKey`` /
      ``RngCount``); reseed it with ``nnx.reseed(model, dropout=key)``.
    rank: LoRA rank ``r`` (>= 1).
    alpha: LoRA alpha (> 0). Defaults as the ReLoRA paper / official code:
      ``rank=128, alpha=32``.
    rank_scaling: ``'alpha_over_r'`` (``scale = alpha / rank``, LoRA) or ``'rslora'``
      (``scale = alpha / sqrt(rank)``, rsLoRA; :func:`lora_scale`).
    variant: ``'lora'``, or ``'dora'`` (DoRA, Liu et al., 2024,
      https://arxiv.org/abs/2402.09353): a trained ``lora_magnitude`` [out] (an
      ``nnx.LoRAParam``) initialised to the kernel's column norms, and
      ``y = m * (x @ W + s * dropout(x) @ A @ B)`` with ``m = lora_magnitude / ||W + s A B||``
      per output column. The norm is computed in float32 and gets no gradient (the paper's
      section 4.3, as PEFT), so backward is LoRA's plus elementwise work over [tokens, out];
      the magnitude's gradient keeps the undivided output (one [tokens, out] activation).
      This is PEFT's ``DoraLinearLayer`` with the base product computed once; with dropout
      PEFT multiplies a second base product of the dropped input by ``m - 1`` (equal in
      expectation, identical without dropout or in eval).
    dropout: dropout rate on the adapter's input in ``[0, 1)``. With ``0`` (the
      default) no dropout module and no RNG state are created.
    freeze_kernel: stop the gradient into ``kernel`` (default True): its
      gradient is exactly zero, so XLA skips the full-size weight-gradient
      product and a global-norm clip before the optimizer only sees the
      trainable factors (the official code sets ``requires_grad=False`` on the
      base weight). The kernel still changes through ReLoRA merges or
      :meth:`merge`. Set False to train kernel and adapters jointly. A quantized
      base never gets a gradient.
    velora_sub_token_size: compress the adapter's input as VeLoRA does
      (:func:`lowrank_jax.nn.velora.velora_matmul`): the ``x @ lora_a`` product
      saves only the rank-1 sub-token projections of ``x`` for backward. With
      a frozen kernel the base path needs no ``x`` for its backward either, so
      the layer then keeps no full copy of its input. ``None``: off.
    velora_scale, velora_v_init: VeLoRA's gradient scale and the choice of its
      projection vector (``'batch_average_once'``, ``'batch_average'``, ``'random'``).

  Attributes: ``in_features, out_features, rank, alpha, rank_scaling, scale, variant,
  dropout_rate``, ``kernel`` (Param), ``lora_a`` / ``lora_b`` (LoRAParam), with DoRA
  ``lora_magnitude`` (LoRAParam). ``scale`` is the one number the adapters are multiplied by,
  whatever ``rank_scaling`` (merges and exports read it).

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
      rank_scaling: str = 'alpha_over_r',
      variant: str = 'lora',
      dropout: float = 0.0,
      freeze_kernel: bool = True,
      velora_sub_token_size: int | None = None,
      velora_scale: float = 1.0,
      velora_v_init: str = 'batch_average_once',
  ):
    self.rank = positive_int(self, 'rank', rank)
    self.alpha = positive_number(self, 'alpha', alpha)
    if rank_scaling not in RANK_SCALINGS:
      raise ValueError(f'LoRALinear: rank_scaling must be one of {list(RANK_SCALINGS)}, got {rank_scaling!r}')
    if variant not in VARIANTS:
      raise ValueError(f'LoRALinear: variant must be one of {list(VARIANTS)}, got {variant!r}')
    if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
        or not 0.0 <= dropout < 1.0):
      raise ValueError(f'LoRALinear: dropout must be a number in [0, 1), got {dropout!r}')
    self.rank_scaling = rank_scaling
    self.scale = lora_scale(self.alpha, self.rank, rank_scaling)
    self.variant = variant
    self.dropout_rate = float(dropout)
    self.freeze_kernel = bool(freeze_kernel)
    # The kernel takes the params stream's first key (as Dense's), lora_a the next.
    init_linear(self, in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, rngs=rngs)
    self.lora_a = nnx.LoRAParam(
        lora_a_init(rngs.params(), (self.in_features, self.rank), self.param_dtype))
    self.lora_b = nnx.LoRAParam(jnp.zeros((self.rank, self.out_features), self.param_dtype))
    if variant == 'dora':
      self.lora_magnitude = nnx.LoRAParam(jnp.zeros((self.out_features,), self.param_dtype))
      self.init_magnitude()
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
    value = self.kernel.get_value()
    if quantized_base.is_quantized_base(value):
      # Saves only the codes for backward, not a float kernel.
      y = quantized_base.frozen_matmul(x, value, self.dtype)
    else:
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
    y = y + matmul(low, self.lora_b[...].astype(self.dtype))
    if self.variant == 'dora':
      # m (x W + s x A B) as one fused multiply-add over [tokens, out]; PEFT's
      # (m - 1) x W + m s x A B, added to x W, is the same with one more pass.
      y = y * self._dora_factor().astype(self.dtype)
    return y

  def _weight_norm(self) -> jax.Array:
    """``||W + s A B||`` per output column, float32, no gradient (DoRA section 4.3)."""
    return jax.lax.stop_gradient(dora_weight_norm(self.kernel[...], self.lora_a[...],
                                                  self.lora_b[...], self.scale))

  def _dora_factor(self) -> jax.Array:
    """``lora_magnitude / ||W + s A B||`` [out], float32; the gradient reaches the magnitude only."""
    # The barrier keeps XLA from rewriting m / sqrt(q) as m * rsqrt(q), which is not exactly 1
    # for m == sqrt(q): a fresh layer would then not compute exactly its base linear under jit.
    return self.lora_magnitude[...].astype(jnp.float32) / jax.lax.optimization_barrier(self._weight_norm())

  def init_magnitude(self) -> None:
    """DoRA: sets ``lora_magnitude`` to ``||W + s A B||`` per column, so the layer computes
    ``x @ (W + s A B)`` (with a fresh ``B == 0``, exactly the base linear).

    The paper initialises the magnitude from the pretrained weight: call this after
    loading a kernel into a DoRA layer built with another one.
    """
    if self.variant != 'dora':
      raise ValueError(f"LoRALinear.init_magnitude: variant is {self.variant!r}, not 'dora'")
    self.lora_magnitude[...] = self._weight_norm().astype(self.lora_magnitude[...].dtype)

  def delta(self) -> jax.Array:
    """``scale * lora_a @ lora_b`` (in, out), computed in float32."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return self.scale * (a @ b)

  def merged_kernel(self) -> jax.Array:
    """The kernel this layer computes with, float32 (in, out): ``x @ merged_kernel()`` is the
    layer's output (without dropout).

    LoRA: ``W + s A B``. DoRA: ``(W + s A B) * lora_magnitude / ||W + s A B||`` column-wise.
    A quantized base is dequantized. What an export to a plain linear writes.
    """
    merged = self.kernel[...].astype(jnp.float32) + self.delta()
    if self.variant == 'dora':
      merged = merged * self._dora_factor()[None, :]
    return merged

  def merge(self, *, rngs: nnx.Rngs | None = None) -> None:
    """Folds ``scale * A @ B`` into ``kernel`` and sets ``B`` to zero.

    The function computed by the layer is unchanged (up to rounding into
    ``param_dtype``). With ``rngs``, ``A`` is also re-drawn from its initial
    distribution (the ReLoRA "merge and re-init"); without, ``A`` is kept.
    For training with an optimizer use ``lowrank_jax.optim.relora``, which
    does the same merge inside the update (so optimizer state stays consistent).

    DoRA: the direction's numerator ``W + s A B`` becomes the kernel and the magnitude is
    kept, so ``m / ||W'|| * W'`` with ``W' = W + s A B`` is the same function: the merge is
    exact for DoRA too, and so is :func:`~lowrank_jax.optim.relora`'s, which never touches
    ``lora_magnitude``. A quantized base is refused: re-quantizing the merged kernel would
    change the function (export with :meth:`merged_kernel` instead).
    """
    if quantized_base.is_quantized_base(self.kernel.get_value()):
      raise ValueError('LoRALinear.merge: the kernel is a quantized base; re-quantizing W + s A B '
                       'would change the function (use merged_kernel() to export)')
    kernel = self.kernel[...]
    self.kernel[...] = (kernel.astype(jnp.float32) + self.delta()).astype(kernel.dtype)
    self.lora_b[...] = jnp.zeros_like(self.lora_b[...])
    if rngs is not None:
      self.lora_a[...] = lora_a_init(rngs.params(), self.lora_a[...].shape,
                                     self.lora_a[...].dtype)

  def init_pissa(self, iters: int = 0, key: jax.Array | None = None) -> None:
    """PiSSA (Meng et al., 2024, https://arxiv.org/abs/2404.02948): the adapters become the
    kernel's top ``rank`` singular directions and the kernel their residual (:func:`pissa_init`).

    An initialisation, for a layer holding its pretrained kernel and fresh adapters: afterwards
    ``kernel + s A B`` is the old kernel (up to rounding into ``param_dtype``; the residual is
    computed from the rounded factors), so the layer computes the base linear as a fresh layer
    does. A quantized base is dequantized, and the residual re-quantized with the same bits,
    block size and double quantization (QPiSSA: the principal part stays in full precision,
    so the layer is closer to the float kernel than the quantized kernel was). DoRA: the
    magnitude is reset to the new ``||kernel + s A B||``, which keeps ``x @ (kernel + s A B)``.

    Args:
      iters: 0: exact SVD; ``N > 0``: randomized SVD with ``N`` subspace iterations.
      key: needed when ``iters > 0``.
    """
    value = self.kernel.get_value()
    w = self.kernel[...].astype(jnp.float32)
    a, b, _ = pissa_init(w, self.rank, self.scale, iters=iters, key=key)
    a = a.astype(self.lora_a[...].dtype)
    b = b.astype(self.lora_b[...].dtype)
    residual = w - self.scale * _dot(a.astype(jnp.float32), b.astype(jnp.float32))
    if quantized_base.is_quantized_base(value):
      residual = quantized_base.quantize_base(residual, value.bits, block_size=value.block_size,
                                              double_quant=value.scale_scale is not None, dtype=value.dtype)
    else:
      residual = residual.astype(value.dtype)
    self.kernel.set_value(residual)
    self.lora_a[...] = a
    self.lora_b[...] = b
    if self.variant == 'dora':
      self.init_magnitude()
