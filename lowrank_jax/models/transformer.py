"""The pieces LLaMA and GPT-2 share: causal self-attention, the pre-norm block, the block stack.

Each model supplies what differs (norms, MLP, rotary or learned positions, init);
the attention and residual structure are written once here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax import nn
from lowrank_jax.models.linear_factory import LinearFactory


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with linears `q, k, v, o` from the factory.

  `rope_theta`: rotary embeddings on q and k (LLaMA), or None (GPT-2, learned positions).
  `q_kw` / `o_kw`: keyword arguments for the linears (dtypes, init); `o_kw` lets GPT-2
  scale its residual projection's init.
  """

  def __init__(self, d_model: int, n_heads: int, linear_factory: LinearFactory, *, dtype: Any,
               rope_theta: float | None, q_kw: dict, o_kw: dict | None = None):
    self.n_heads = n_heads
    self.head_dim = d_model // n_heads
    self.rope_theta = None if rope_theta is None else float(rope_theta)
    self.dtype = dtype
    self.q = linear_factory('q', d_model, d_model, **q_kw)
    self.k = linear_factory('k', d_model, d_model, **q_kw)
    self.v = linear_factory('v', d_model, d_model, **q_kw)
    self.o = linear_factory('o', d_model, d_model, **(o_kw or q_kw))

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, self.n_heads, self.head_dim)  # noqa: E731
    q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
    if self.rope_theta is not None:
      positions = jnp.arange(t, dtype=jnp.int32)
      q = nn.apply_rope(q, positions, self.rope_theta)
      k = nn.apply_rope(k, positions, self.rope_theta)
    q, k, v = (y.astype(self.dtype) for y in (q, k, v))
    # [B, T, N, H] layout; XLA on CPU/TPU, cuDNN flash kernels eligible on GPU.
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return self.o(out.reshape(b, t, self.n_heads * self.head_dim))


class PreNormBlock(nnx.Module):
  """`x + attn(attn_norm(x))`, then `x + mlp(mlp_norm(x))`, kept in the compute dtype."""

  def __init__(self, attn_norm: nnx.Module, attn: nnx.Module, mlp_norm: nnx.Module, mlp: nnx.Module,
               dtype: Any):
    self.attn_norm = attn_norm
    self.attn = attn
    self.mlp_norm = mlp_norm
    self.mlp = mlp
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = (x + self.attn(self.attn_norm(x))).astype(self.dtype)
    return (x + self.mlp(self.mlp_norm(x))).astype(self.dtype)


@nnx.remat
def _remat_block(block: nnx.Module, x: jax.Array) -> jax.Array:
  return block(x)


def run_blocks(blocks: Any, x: jax.Array, *, remat: bool) -> jax.Array:
  """The block stack, each block under activation checkpointing when `remat`."""
  for block in blocks:
    x = _remat_block(block, x) if remat else block(x)
  return x

