"""GPT-2 (Radford et al., 2019) in Flax NNX, built through the linear factory.

Pre-norm decoder: learned token and position embeddings, blocks
``x + attn(ln(x))`` then ``x + mlp(ln(x))``, a final LayerNorm and an output
head tied to the token embedding (``logits = h @ E^T``). Every linear is built
by a :class:`LinearFactory` under the names ``q, k, v, o`` (attention),
``up`` (d -> d_ff) and ``down`` (d_ff -> d) (GELU MLP), and ``head`` only when
``tie_embeddings=False``, so LoRA / multi-head LoRA kinds are swapped in per
layer name exactly as for LLaMA.

Parameter paths (``nnx.state(model, nnx.Param)``)::

  embed/embedding                      [vocab, d_model]
  pos_embed/embedding                  [max_seq_len, d_model]
  layers/{i}/attn_norm/{scale,bias}    [d_model]
  layers/{i}/attn/{q,k,v,o}/kernel     [d_model, d_model]
  layers/{i}/mlp_norm/{scale,bias}     [d_model]
  layers/{i}/mlp/up/kernel             [d_model, d_ff]
  layers/{i}/mlp/down/kernel           [d_ff, d_model]
  final_norm/{scale,bias}              [d_model]
  head/kernel                          [d_model, vocab]  (only when not tied)

Initialisation as GPT-2 / nanoGPT: every linear and both embeddings
``N(0, init_std = 0.02)``; the residual projections (``o`` and ``down``)
``N(0, init_std / sqrt(2 n_layers))``; LayerNorm scale 1, bias 0.

Deviations from the original GPT-2 (on purpose):

* **Bias-free linears** by default (the factory's kinds mirror ``Dense``), so
  q/k/v/o/up/down have no bias; LayerNorms keep theirs. 124M has 82,944 fewer
  scalars than OpenAI's checkpoint (124,356,864 vs 124,439,808 with vocab
  50257). ``bias=True`` (set by ``from_pretrained`` for HF checkpoints) gives
  every linear a ``.../bias`` beside its kernel, as OpenAI's GPT-2.
* **No dropout** (GPT-2 used 0.1; modern pre-training, e.g. nanoGPT, uses 0).
* GELU is the tanh approximation (GPT-2's ``gelu_new``); LayerNorm eps 1e-5.

Parameter count (tied, bias-free)::

  V d + T d + L (4 d^2 + 2 d d_ff + 4 d) + 2 d      (+ d V when untied)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
class GPT2Config:
  vocab_size: int
  d_model: int
  n_heads: int
  n_layers: int
  d_ff: int | None = None       # MLP width; None -> 4 * d_model
  max_seq_len: int = 1024       # context: number of learned positions
  tie_embeddings: bool = True   # GPT-2 ties the head to the token embedding
  norm_eps: float = 1e-5
  init_std: float = 0.02
  dtype: str = 'float32'        # compute dtype
  param_dtype: str = 'float32'  # storage dtype of the parameters
  remat: bool = False           # activation checkpointing per block
  bias: bool = False            # biases on every linear (OpenAI's GPT-2 has them)

  def __post_init__(self):
    if self.d_ff is None:
      object.__setattr__(self, 'd_ff', 4 * self.d_model if _is_pos_int(self.d_model) else None)
    for name in ('vocab_size', 'd_model', 'd_ff', 'n_heads', 'n_layers', 'max_seq_len'):
      value = getattr(self, name)
      if not _is_pos_int(value):
        raise ValueError(f'GPT2Config.{name} must be a positive integer, got {value!r}')
    if self.d_model % self.n_heads:
      raise ValueError(
          f'GPT2Config.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})')
    if not isinstance(self.tie_embeddings, bool):
      raise ValueError(f'GPT2Config.tie_embeddings must be a bool, got {self.tie_embeddings!r}')
    for name in ('norm_eps', 'init_std'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f'GPT2Config.{name} must be a positive number, got {value!r}')
    for name in ('dtype', 'param_dtype'):
      value = getattr(self, name)
      if value not in DTYPES:
        raise ValueError(f'GPT2Config.{name} must be one of {list(DTYPES)}, got {value!r}')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return DTYPES[self.param_dtype]


def _is_pos_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value > 0


# name -> (d_model, n_heads, n_layers); d_ff = 4 d_model. OpenAI's sizes;
# 'tiny' is for CPU smoke runs.
GPT2_SIZES: dict[str, dict[str, int]] = {
    'tiny': dict(d_model=128, n_heads=4, n_layers=2),
    '124m': dict(d_model=768, n_heads=12, n_layers=12),
    '350m': dict(d_model=1024, n_heads=16, n_layers=24),
    '774m': dict(d_model=1280, n_heads=20, n_layers=36),
    '1.5b': dict(d_model=1600, n_heads=25, n_layers=48),
}


def gpt2_config(size: str, vocab_size: int, **overrides: Any) -> GPT2Config:
  """The ``GPT2Config`` of a named size, with any field overridden."""
  if size not in GPT2_SIZES:
    raise ValueError(f'unknown GPT-2 size {size!r}; valid sizes: {list(GPT2_SIZES)}')
  fields = {f.name for f in dataclasses.fields(GPT2Config)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown GPT2Config fields {unknown}; valid fields: {sorted(fields)}')
  return GPT2Config(**{**GPT2_SIZES[size], 'vocab_size': vocab_size, **overrides})


def _linear_kw(config: GPT2Config, std: float, rngs: nnx.Rngs) -> dict[str, Any]:
  return dict(dtype=config.compute_dtype, param_dtype=config.storage_dtype,
              kernel_init=nnx.initializers.normal(std), rngs=rngs)


def _residual_std(config: GPT2Config) -> float:
  return config.init_std / math.sqrt(2 * config.n_layers)


def _layer_norm(config: GPT2Config, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(config.d_model, epsilon=config.norm_eps, dtype=config.compute_dtype,
                       param_dtype=config.storage_dtype, rngs=rngs)


class MLP(nnx.Module):
  """``down(gelu(up(x)))`` with the tanh-approximate GELU."""

  def __init__(self, config: GPT2Config, linear_factory: LinearFactory, *, rngs: nnx.Rngs):
    self.up = linear_factory('up', config.d_model, config.d_ff,
                             **_linear_kw(config, config.init_std, rngs))
    self.down = linear_factory('down', config.d_ff, config.d_model,
                               **_linear_kw(config, _residual_std(config), rngs))
    if config.bias:
      attach_bias(self.up, config.storage_dtype)
      attach_bias(self.down, config.storage_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return linear_with_bias(self.down, jax.nn.gelu(linear_with_bias(self.up, x), approximate=True))


def _block(config: GPT2Config, linear_factory: LinearFactory, *, rngs: nnx.Rngs) -> PreNormBlock:
  return PreNormBlock(
      attn_norm=_layer_norm(config, rngs),
      attn=CausalSelfAttention(config.d_model, config.n_heads, linear_factory, dtype=config.compute_dtype,
                               rope_theta=None, q_kw=_linear_kw(config, config.init_std, rngs),
                               o_kw=_linear_kw(config, _residual_std(config), rngs), bias=config.bias),
      mlp_norm=_layer_norm(config, rngs),
      mlp=MLP(config, linear_factory, rngs=rngs),
      dtype=config.compute_dtype)


class GPT2(DecoderLM):
  """GPT-2 decoder. ``model(tokens int32[B, T]) -> logits float32[B, T, vocab]``."""

  def __init__(self, config: GPT2Config, *, linear_factory: LinearFactory | None = None,
               rngs: nnx.Rngs):
    if linear_factory is None:
      linear_factory = LinearFactory()
    self.config = config
    init = nnx.initializers.normal(config.init_std)
    emb_kw = dict(dtype=config.compute_dtype, param_dtype=config.storage_dtype,
                  embedding_init=init, rngs=rngs)
    self.embed = nnx.Embed(config.vocab_size, config.d_model, **emb_kw)
    self.pos_embed = nnx.Embed(config.max_seq_len, config.d_model, **emb_kw)
    self.layers = nnx.List(
        [_block(config, linear_factory, rngs=rngs) for _ in range(config.n_layers)])
    self.final_norm = _layer_norm(config, rngs)
    if not config.tie_embeddings:
      self.head = linear_factory('head', config.d_model, config.vocab_size,
                                 **_linear_kw(config, config.init_std, rngs))

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """The final hidden states [B, T, d_model] (see ``DecoderLM``; ``model(tokens)`` gives the logits)."""
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f'tokens must have shape [batch, seq], got {tokens.shape}')
    if tokens.shape[1] > cfg.max_seq_len:
      raise ValueError(
          f'sequence length {tokens.shape[1]} exceeds max_seq_len {cfg.max_seq_len}')
    if positions is None:
      positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    x = (self.embed(tokens) + self.pos_embed(positions)).astype(cfg.compute_dtype)
    x = run_blocks(self.layers, x, remat=cfg.remat, segment_ids=segment_ids)
    return self.final_norm(x)

