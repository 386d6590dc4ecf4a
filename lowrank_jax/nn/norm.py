"""RMSNorm with a learned scale, computed in float32."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

DTypeLike = Any


class RMSNorm(nnx.Module):
  """``y = x / sqrt(mean(x**2, -1) + eps) * scale`` (no mean-centering, no bias).

  The statistics and the product with ``scale`` are computed in float32 whatever
  the input / parameter dtype; the result is cast to ``dtype``. ``scale`` (shape
  ``(features,)``, initialised to ones) is stored in ``param_dtype``.
  """

  def __init__(
      self,
      features: int,
      *,
      eps: float = 1e-6,
      dtype: DTypeLike = jnp.float32,
      param_dtype: DTypeLike = jnp.float32,
      rngs: nnx.Rngs | None = None,  # unused; accepted for a uniform signature
  ):
    del rngs
    self.features = int(features)
    self.eps = float(eps)
    self.dtype = jnp.dtype(dtype)
    self.scale = nnx.Param(jnp.ones((self.features,), jnp.dtype(param_dtype)))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32)
    return y.astype(self.dtype)
