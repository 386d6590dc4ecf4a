"""Bias-free linear layer: the reference every other linear kind mirrors."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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


def positive_int(layer: Any, name: str, value: Any) -> int:
  """``value`` as an ``int``; unless it is a positive integer, a ValueError naming ``layer``'s
  class and the argument ``name``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f'{type(layer).__name__}: {name} must be a positive integer, got {value!r}')
  return int(value)


def positive_number(layer: Any, name: str, value: Any) -> float:
  """``value`` as a ``float``; unless it is a number > 0, a ValueError naming ``layer``'s class
  and the argument ``name``."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f'{type(layer).__name__}: {name} must be a positive number, got {value!r}')
  return float(value)


def init_linear(layer: nnx.Module, in_features: int, out_features: int, *, dtype: DTypeLike,
                param_dtype: DTypeLike, kernel_init: Initializer, rngs: nnx.Rngs) -> jax.Array:
  """What every linear kind's constructor does first, from the arguments they all share.

  Checks ``in_features`` / ``out_features`` (positive integers), sets them and ``dtype`` /
  ``param_dtype`` on ``layer``, and draws ``layer.kernel`` (in, out) in ``param_dtype`` with
  ``kernel_init`` from one key of ``rngs.params``. Returns that key (VeLoRA derives its
  vector from it). A kind calls this before it draws anything else, so for the same
  ``rngs`` every kind's kernel is ``Dense``'s kernel and what a kind draws next (adapters)
  comes from the same later keys as before.
  """
  layer.in_features = positive_int(layer, 'in_features', in_features)
  layer.out_features = positive_int(layer, 'out_features', out_features)
  layer.dtype = jnp.dtype(dtype)
  layer.param_dtype = jnp.dtype(param_dtype)
  key = rngs.params()
  layer.kernel = nnx.Param(
      kernel_init(key, (layer.in_features, layer.out_features), layer.param_dtype))
  return key


class Dense(nnx.Module):
  """``y = x @ kernel`` with ``kernel: Param[(in_features, out_features)]``.

  The kernel uses the Flax layout (in, out). It is stored in ``param_dtype``;
  the product is computed in ``dtype`` (both operands are cast), and the result
  has dtype ``dtype``. There is no bias.

  Every linear kind (LoRA, multi-head LoRA, VeLoRA, ...) takes the same
  constructor arguments and exposes ``in_features`` / ``out_features``, so the
  model's linear factory can build any of them interchangeably; they all set
  these and draw the kernel with :func:`init_linear`.
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
    init_linear(self, in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                kernel_init=kernel_init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...]
    # Named so a remat policy can keep exactly what the kernel's gradient needs.
    x = checkpoint_name(x.astype(self.dtype), MATMUL_INPUT)
    return matmul(x, kernel.astype(self.dtype))
