"""Bias-free linear layer: the reference every other linear kind mirrors."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Any  # (key, shape, dtype) -> Array
DTypeLike = Any

default_kernel_init = nnx.initializers.lecun_normal()


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
    return jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
