"""LLaMA (as in the GaLore paper's configs) in Flax NNX.

Every linear layer is built through a :class:`LinearFactory`, keyed by the
layer names ``q, k, v, o`` (attention), ``gate, up, down`` (SwiGLU MLP) and
``head`` (output projection), so LoRA-style linears can be swapped in per layer
name without touching this file.

Parameter paths (``nnx.state(model, nnx.Param)``)::

  embed/embedding                    [vocab, d_model]
  layers/{i}/attn_norm/scale         [d_model]
  layers/{i}/attn/{q,o}/kernel       [d_model, d_model]
  layers/{i}/attn/{k,v}/kernel       [d_model, n_kv_heads * head_dim]
  layers/{i}/attn/{q,k,v,o}/bias     [out]   (only with attention_bias; mlp_bias alike)
  layers/{i}/mlp_norm/scale          [d_model]
  layers/{i}/mlp/{gate,up}/kernel    [d_model, d_ff]
  layers/{i}/mlp/down/kernel         [d_ff, d_model]
  final_norm/scale                   [d_model]
  head/kernel                        [d_model, vocab]   (absent when tied)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax import nn
from lowrank_jax.models.linear_factory import LinearFactory
from lowrank_jax.models.transformer import (
    CausalSelfAttention,
    DecoderLM,
    PreNormBlock,
    attach_bias,
    linear_with_bias,
    run_blocks,
)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  vocab_size: int
  d_model: int
  d_ff: int
  n_heads: int
  n_layers: int
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  dtype: str = 'float32'        # compute dtype
  param_dtype: str = 'float32'  # storage dtype of the parameters
  remat: bool = False           # activation checkpointing per block
  n_kv_heads: int | None = None  # grouped-query attention: k/v heads (None: n_heads)
  attention_bias: bool = False  # biases on q, k, v, o (HF `attention_bias`)
  mlp_bias: bool = False        # biases on gate, up, down (HF `mlp_bias`)

  def __post_init__(self):
    for name in ('vocab_size', 'd_model', 'd_ff', 'n_heads', 'n_layers', 'max_seq_len'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f'LlamaConfig.{name} must be a positive integer, got {value!r}')
    if self.d_model % self.n_heads:
      raise ValueError(
          f'LlamaConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})')
    if self.head_dim % 2:
      raise ValueError(
          f'LlamaConfig.d_model / n_heads = {self.head_dim} (head dim) must be even for '
          'rotary embeddings')
    if self.n_kv_heads is not None and (
        isinstance(self.n_kv_heads, bool) or not isinstance(self.n_kv_heads, (int, np.integer))
        or self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
      raise ValueError(f'LlamaConfig.n_kv_heads must be a positive divisor of n_heads '
                       f'({self.n_heads}) or None, got {self.n_kv_heads!r}')
    for name in ('rope_theta', 'norm_eps', 'init_std'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f'LlamaConfig.{name} must be a positive number, got {value!r}')
    for name in ('dtype', 'param_dtype'):
      value = getattr(self, name)
      if value not in DTYPES:
        raise ValueError(
            f'LlamaConfig.{name} must be one of {list(DTYPES)}, got {value!r}')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return DTYPES[self.param_dtype]


# name -> (d_model, d_ff, n_heads, n_layers). GaLore paper / repo configs
# (llama_60m ... llama_7b); 'tiny' is for CPU smoke runs.
LLAMA_SIZES: dict[str, dict[str, int]] = {
    'tiny': dict(d_model=128, d_ff=344, n_heads=4, n_layers=2),
    '60m': dict(d_model=512, d_ff=1376, n_heads=8, n_layers=8),
    '130m': dict(d_model=768, d_ff=2048, n_heads=12, n_layers=12),
    '350m': dict(d_model=1024, d_ff=2736, n_heads=16, n_layers=24),
    '1b': dict(d_model=2048, d_ff=5461, n_heads=32, n_layers=24),
    '7b': dict(d_model=4096, d_ff=11008, n_heads=32, n_layers=32),
}


def llama_config(size: str, vocab_size: int, **overrides: Any) -> LlamaConfig:
  """The ``LlamaConfig`` of a named size, with any field overridden."""
  if size not in LLAMA_SIZES:
    raise ValueError(f'unknown LLaMA size {size!r}; valid sizes: {list(LLAMA_SIZES)}')
  fields = {f.name for f in dataclasses.fields(LlamaConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown LlamaConfig fields {unknown}; valid fields: {sorted(fields)}')
  return LlamaConfig(**{**LLAMA_SIZES[size], 'vocab_size': vocab_size, **overrides})


class MLP(nnx.Module):
  """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: LlamaConfig, linear_factory: LinearFactory, *, rngs: nnx.Rngs):
    kw = dict(dtype=config.compute_dtype, param_dtype=config.storage_dtype,
              kernel_init=nnx.initializers.normal(config.init_std), rngs=rngs)
    self.gate = linear_factory('gate', config.d_model, config.d_ff, **kw)
    self.up = linear_factory('up', config.d_model, config.d_ff, **kw)
    self.down = linear_factory('down', config.d_ff, config.d_model, **kw)
    if config.mlp_bias:
      for layer in (self.gate, self.up, self.down):
        attach_bias(layer, config.storage_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = jax.nn.silu(linear_with_bias(self.gate, x)) * linear_with_bias(self.up, x)
    return linear_with_bias(self.down, hidden)


def _block(config: LlamaConfig, linear_factory: LinearFactory, *, rngs: nnx.Rngs) -> PreNormBlock:
  kw = dict(dtype=config.compute_dtype, param_dtype=config.storage_dtype,
            kernel_init=nnx.initializers.normal(config.init_std), rngs=rngs)
  norm_kw = dict(eps=config.norm_eps, dtype=config.compute_dtype, param_dtype=config.storage_dtype)
  return PreNormBlock(
      attn_norm=nn.RMSNorm(config.d_model, **norm_kw),
      attn=CausalSelfAttention(config.d_model, config.n_heads, linear_factory, dtype=config.compute_dtype,
                               rope_theta=config.rope_theta, q_kw=kw, bias=config.attention_bias,
                               n_kv_heads=config.n_kv_heads),
      mlp_norm=nn.RMSNorm(config.d_model, **norm_kw),
      mlp=MLP(config, linear_factory, rngs=rngs),
      dtype=config.compute_dtype)


class Llama(DecoderLM):
  """LLaMA decoder. ``model(tokens int32[B, T]) -> logits float32[B, T, vocab]``."""

  def __init__(self, config: LlamaConfig, *, linear_factory: LinearFactory | None = None,
               rngs: nnx.Rngs):
    if linear_factory is None:
      linear_factory = LinearFactory()
    self.config = config
    init = nnx.initializers.normal(config.init_std)
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=config.compute_dtype,
                           param_dtype=config.storage_dtype, embedding_init=init, rngs=rngs)
    self.layers = nnx.List(
        [_block(config, linear_factory, rngs=rngs) for _ in range(config.n_layers)])
    self.final_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps,
                                 dtype=config.compute_dtype, param_dtype=config.storage_dtype)
    if not config.tie_embeddings:
      self.head = linear_factory('head', config.d_model, config.vocab_size,
                                 dtype=config.compute_dtype, param_dtype=config.storage_dtype,
                                 kernel_init=init, rngs=rngs)

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """The final hidden states [B, T, d_model] (see ``DecoderLM``; ``model(tokens)`` gives the logits)."""
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f'tokens must have shape [batch, seq], got {tokens.shape}')
    if tokens.shape[1] > cfg.max_seq_len:
      raise ValueError(
          f'sequence length {tokens.shape[1]} exceeds max_seq_len {cfg.max_seq_len}')
    x = self.embed(tokens).astype(cfg.compute_dtype)
    x = run_blocks(self.layers, x, remat=cfg.remat, positions=positions, segment_ids=segment_ids)
    return self.final_norm(x)


def count_params(model_or_state: Any) -> int:
  """Number of scalars in the parameters.

  Accepts an ``nnx.Module`` (counts its ``nnx.Param`` variables, also when the
  model is abstract from ``nnx.eval_shape``), an ``nnx.State`` or any pytree
  of arrays / ``jax.ShapeDtypeStruct``.
  """
  tree = model_or_state
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  leaves = jax.tree.leaves(tree)
  return int(sum(int(np.prod(leaf.shape)) for leaf in leaves))
