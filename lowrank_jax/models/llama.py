"""LLaMA (as in the GaLore paper's configs) in Flax NNX.

Every linear layer is built through a :class:`LinearFactory`, keyed by the
layer names ``q, k, v, o`` (attention), ``gate, up, down`` (SwiGLU MLP) and
``head`` (output projection), so LoRA-style linears can be swapped in per layer
name without touching this file. The end of the file maps the model to Hugging Face's
``LlamaForCausalLM`` (``from_pretrained`` / ``save_pretrained``) and registers the family.

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
import re
from typing import Any

import jax
import numpy as np
from flax import nnx

from lowrank_jax import nn
from lowrank_jax.models.family import Family, register_family
from lowrank_jax.models.hf_format import OVERRIDES, HFFormat, PretrainedError, Tensors, hf_get
from lowrank_jax.models.linear_factory import LinearFactory
from lowrank_jax.models.transformer import (
    CausalSelfAttention,
    DecoderLM,
    ModelConfig,
    PreNormBlock,
    attach_bias,
    is_positive_int,
    linear_with_bias,
    run_blocks,
)
from lowrank_jax.nn.rope import Llama3RopeScaling


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(ModelConfig):
  vocab_size: int
  max_seq_len: int = 2048
  tie_embeddings: bool = False
  rope_theta: float = 10000.0
  rope_scaling: Llama3RopeScaling | None = None  # Llama 3.1+ frequency scaling (HF rope_type "llama3")
  norm_eps: float = 1e-6
  n_kv_heads: int | None = None  # grouped-query attention: k/v heads (None: n_heads)
  attention_bias: bool = False  # biases on q, k, v, o (HF `attention_bias`)
  mlp_bias: bool = False        # biases on gate, up, down (HF `mlp_bias`)

  POSITIVE_INTS = ModelConfig.POSITIVE_INTS + ('vocab_size', 'max_seq_len')
  POSITIVE_NUMBERS = ModelConfig.POSITIVE_NUMBERS + ('rope_theta',)

  def __post_init__(self):
    super().__post_init__()
    if self.head_dim % 2:
      raise ValueError(
          f'LlamaConfig.d_model / n_heads = {self.head_dim} (head dim) must be even for '
          'rotary embeddings')
    if self.n_kv_heads is not None and (
        not is_positive_int(self.n_kv_heads) or self.n_heads % self.n_kv_heads):
      raise ValueError(f'LlamaConfig.n_kv_heads must be a positive divisor of n_heads '
                       f'({self.n_heads}) or None, got {self.n_kv_heads!r}')
    if not isinstance(self.rope_scaling, (Llama3RopeScaling, type(None))):
      raise ValueError(f'LlamaConfig.rope_scaling must be a Llama3RopeScaling or None, got {self.rope_scaling!r}')


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
                               rope_theta=config.rope_theta, rope_scaling=config.rope_scaling, q_kw=kw,
                               bias=config.attention_bias, n_kv_heads=config.n_kv_heads,
                               attention=config.attention),
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
    self.check_tokens(tokens)
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


# ---------------------------------------------------------------------------
# Hugging Face `LlamaForCausalLM`: config.json <-> LlamaConfig, parameter path <-> tensor name.


def _config_from_hf(hf: dict, overrides: dict) -> LlamaConfig:
  d, heads = hf_get(hf, 'hidden_size', required=True), hf_get(hf, 'num_attention_heads', required=True)
  if hf_get(hf, 'hidden_act', 'silu') != 'silu':
    raise PretrainedError(f'config.json hidden_act={hf["hidden_act"]!r}: only "silu" (LLaMA) is supported')
  if hf_get(hf, 'head_dim') not in (None, d // heads):
    raise PretrainedError(f'config.json head_dim={hf["head_dim"]} differs from hidden_size / '
                          f'num_attention_heads = {d // heads}: not supported')
  # transformers < 5 writes rope_theta (+ rope_scaling); 5 writes rope_parameters.
  rope = dict(hf_get(hf, 'rope_parameters') or {})
  scaling = hf_get(hf, 'rope_scaling') or rope
  fields = dict(
      vocab_size=hf_get(hf, 'vocab_size', required=True), d_model=d,
      d_ff=hf_get(hf, 'intermediate_size', required=True), n_heads=heads,
      n_layers=hf_get(hf, 'num_hidden_layers', required=True),
      n_kv_heads=hf_get(hf, 'num_key_value_heads') or heads,
      max_seq_len=hf_get(hf, 'max_position_embeddings', 2048),
      tie_embeddings=bool(hf_get(hf, 'tie_word_embeddings', False)),
      rope_theta=float(rope.get('rope_theta', hf_get(hf, 'rope_theta', 10000.0))),
      rope_scaling=_rope_scaling_from_hf(scaling),
      norm_eps=float(hf_get(hf, 'rms_norm_eps', 1e-6)),
      attention_bias=bool(hf_get(hf, 'attention_bias', False)), mlp_bias=bool(hf_get(hf, 'mlp_bias', False)))
  return LlamaConfig(**{**fields, **overrides})


def _rope_scaling_from_hf(scaling: dict) -> Llama3RopeScaling | None:
  kind = scaling.get('rope_type', scaling.get('type', 'default'))  # 'type': older config.json files
  if kind == 'default':
    return None
  if kind != 'llama3':
    raise PretrainedError(f'config.json rope scaling type {kind!r} is not supported '
                          '(only "llama3", Llama 3.1 to 3.3, and none)')
  fields = [f.name for f in dataclasses.fields(Llama3RopeScaling)]
  if missing := [name for name in fields if name not in scaling]:
    raise PretrainedError(f'config.json rope scaling "llama3" has no {missing[0]!r}')
  try:
    return Llama3RopeScaling(**{name: scaling[name] for name in fields})
  except ValueError as e:
    raise PretrainedError(f'config.json rope scaling: {e}') from None


def _rope_scaling_to_hf(c: LlamaConfig) -> dict | None:
  if c.rope_scaling is None:
    return None
  return {'rope_type': 'llama3', **dataclasses.asdict(c.rope_scaling)}


def _config_to_hf(c: LlamaConfig, base: dict) -> dict:
  scaling = _rope_scaling_to_hf(c)
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': c.vocab_size,
      'hidden_size': c.d_model, 'intermediate_size': c.d_ff, 'num_attention_heads': c.n_heads,
      'num_key_value_heads': c.n_kv_heads or c.n_heads, 'num_hidden_layers': c.n_layers,
      'head_dim': c.head_dim, 'max_position_embeddings': c.max_seq_len, 'rope_theta': c.rope_theta,
      'rms_norm_eps': c.norm_eps, 'tie_word_embeddings': c.tie_embeddings, 'hidden_act': 'silu',
      'attention_bias': c.attention_bias, 'mlp_bias': c.mlp_bias, 'rope_scaling': scaling,
      'rope_parameters': {**(scaling or {'rope_type': 'default'}), 'rope_theta': c.rope_theta},
  }


def _tensors(c: LlamaConfig) -> Tensors:
  t: Tensors = {('embed', 'embedding'): ('model.embed_tokens.weight', 'copy'),
                ('final_norm', 'scale'): ('model.norm.weight', 'copy')}
  for i in range(c.n_layers):
    pre = f'model.layers.{i}.'
    t[('layers', i, 'attn_norm', 'scale')] = (pre + 'input_layernorm.weight', 'copy')
    t[('layers', i, 'mlp_norm', 'scale')] = (pre + 'post_attention_layernorm.weight', 'copy')
    for group, names, bias in (('attn', ('q', 'k', 'v', 'o'), c.attention_bias),
                               ('mlp', ('gate', 'up', 'down'), c.mlp_bias)):
      hf_group = 'self_attn' if group == 'attn' else 'mlp'
      for name in names:
        hf_name = f'{pre}{hf_group}.{name}_proj.'
        t[('layers', i, group, name, 'kernel')] = (hf_name + 'weight', 'linear')
        if bias:
          t[('layers', i, group, name, 'bias')] = (hf_name + 'bias', 'copy')
  if not c.tie_embeddings:
    t[('head', 'kernel')] = ('lm_head.weight', 'linear')
  return t


FAMILY = register_family(Family(
    name='llama', title='LLaMA', config_class=LlamaConfig, model_class=Llama, sizes=LLAMA_SIZES,
    task='language_model', layer_names=('q', 'k', 'v', 'o', 'gate', 'up', 'down', 'head'),
    hf=HFFormat(_config_from_hf, _config_to_hf, _tensors, OVERRIDES + ('max_seq_len',),
                ignored=re.compile(r'(rotary_emb\.inv_freq|^lm_head\.weight)$')),
    hf_architectures=('LlamaForCausalLM',)))
llama_config = FAMILY.config  # llama_config(size, vocab_size, **overrides) -> LlamaConfig
