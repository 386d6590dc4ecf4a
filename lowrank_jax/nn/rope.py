"""Rotary position embeddings (RoPE), "rotate-half" layout as in HF LLaMA."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float = 10000.0) -> jax.Array:
  """Inverse frequencies ``theta ** (-2i / head_dim)`` for i < head_dim // 2."""
  if head_dim % 2:
    raise ValueError(f'head_dim must be even for rotary embeddings, got {head_dim}')
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta ** exponents)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
  """Rotates ``x[..., T, N, H]`` by position.

  ``positions`` is int of shape ``[T]`` or ``[B, T]`` (broadcast against the
  leading dims of ``x``). Pairs are ``(x[..., i], x[..., i + H/2])`` and rotate by
  angle ``positions * inv_freq[i]``. Computed in float32, returned in x.dtype.
  """
  head_dim = x.shape[-1]
  inv_freq = rope_frequencies(head_dim, theta)                      # [H/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq      # [..., T, H/2]
  angles = angles[..., None, :]                                     # [..., T, 1, H/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
