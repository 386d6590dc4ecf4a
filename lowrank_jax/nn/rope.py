"""Rotary position embeddings (RoPE), "rotate-half" layout as in HF LLaMA."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3RopeScaling:
  """Llama 3.1's frequency scaling (HF ``rope_scaling`` with ``rope_type: "llama3"``).

  With ``L = original_max_position_embeddings`` and wavelength ``2 pi / f`` of each inverse
  frequency ``f``: wavelengths longer than ``L / low_freq_factor`` are stretched by
  ``factor`` (``f / factor``), shorter than ``L / high_freq_factor`` kept, and the band between
  mixes the two: ``(1 - s) f / factor + s f`` with ``s = (L / wavelength - low_freq_factor) /
  (high_freq_factor - low_freq_factor)``. Llama 3.1 to 3.3: factor 8 (3.2: 32), low 1, high 4,
  L 8192. Reference: Meta's ``apply_scaling`` in llama-models; transformers'
  ``_compute_llama3_parameters``.
  """
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int

  def __post_init__(self):
    for name in ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f'Llama3RopeScaling.{name} must be a positive number, got {value!r}')
    if self.high_freq_factor <= self.low_freq_factor:
      raise ValueError(f'Llama3RopeScaling.high_freq_factor ({self.high_freq_factor}) must exceed '
                       f'low_freq_factor ({self.low_freq_factor})')

  def __call__(self, inv_freq: jax.Array) -> jax.Array:
    """The scaled inverse frequencies (same shape and dtype)."""
    old_len = self.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
    mixed = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
    return jnp.where(wavelen < old_len / self.high_freq_factor, inv_freq,
                     jnp.where(wavelen > old_len / self.low_freq_factor, inv_freq / self.factor, mixed))


def rope_frequencies(head_dim: int, theta: float = 10000.0,
                     scaling: Llama3RopeScaling | None = None) -> jax.Array:
  """Inverse frequencies ``theta ** (-2i / head_dim)`` for i < head_dim // 2, then ``scaling``."""
  if head_dim % 2:
    raise ValueError(f'head_dim must be even for rotary embeddings, got {head_dim}')
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** exponents)
  return inv_freq if scaling is None else scaling(inv_freq)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
               scaling: Llama3RopeScaling | None = None) -> jax.Array:
  """Rotates ``x[..., T, N, H]`` by position.

  ``positions`` is int of shape ``[T]`` or ``[B, T]`` (broadcast against the
  leading dims of ``x``). Pairs are ``(x[..., i], x[..., i + H/2])`` and rotate by
  angle ``positions * inv_freq[i]`` (``inv_freq`` from :func:`rope_frequencies`, scaled
  by ``scaling`` when given). Computed in float32, returned in x.dtype.
  """
  head_dim = x.shape[-1]
  inv_freq = rope_frequencies(head_dim, theta, scaling)             # [H/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq      # [..., T, H/2]
  angles = angles[..., None, :]                                     # [..., T, 1, H/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
