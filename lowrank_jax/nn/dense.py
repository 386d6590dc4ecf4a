"""Bias-free linear layer: the reference every other linear kind mirrors."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

Initializer = Any  # (key, shape, dtype) -> Array
DTypeLike = Any

default_kernel_init = nnx.initializers.lecun_normal()

# The name of a linear layer's (cast) input, for `jax.checkpoint_policies.save_only_these_names`.
MATMUL_INPUT = 'matmul_input'


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """``x @ kernel`` over the last axis of ``x``, as one 2-D ``[tokens, in] x [in, out]`` product.

  The kernel's gradient is then one plain 2-D dot. Left as a ``[batch, seq, in]`` contraction,
  that gradient contracts two axes at once and XLA:CPU first transposes the output gradient of
  every linear: the LLaMA-60m float32 train step took 1.4x as long (bench/throughput.py). The
  reshapes are free (bitcasts) on every backend.
  """
  y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


class Dense(nnx.Module):
  """``y = x @ kernel`` with ``kernel: Param[(in_features, out_features)]``.

  The kernel uses the Flax layout (in, out). It is stored in ``param_dtype``;
  the product is computed in ``dtype`` (both operands are cast), and the result
  has dtype ``dtype``. There is no bias.

  Every linear kind (LoRA, multi-head LoRA, VeLoRA, ...) takes the same
  constructor arguments and exposes ``in_features`` / ``out_features``, so the
  model's linear factory can build any of them interchangeably.
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
  ):
    self.in_features = int(in_features)
    self.out_features = int(out_features)
    self.dtype = jnp.dtype(dtype)
    self.param_dtype = jnp.dtype(param_dtype)
    self.kernel = nnx.Param(
        kernel_init(rngs.params(), (self.in_features, self.out_features),
                    self.param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    # Named so a remat policy can keep exactly what the kernel's gradient needs.
    x = checkpoint_name(x.astype(self.dtype), MATMUL_INPUT)
    return matmul(x, kernel.astype(self.dtype))
