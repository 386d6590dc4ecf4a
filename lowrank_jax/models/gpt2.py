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
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models.family import Family, register_family
from lowrank_jax.models.hf_format import OVERRIDES, HFFormat, PretrainedError, Tensors, hf_get, layer_norm_tensors
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(ModelConfig):
  vocab_size: int
  d_ff: int | None = None       # MLP width; None -> 4 * d_model
  max_seq_len: int = 1024       # context: number of learned positions
  tie_embeddings: bool = True   # GPT-2 ties the head to the token embedding
  norm_eps: float = 1e-5
  bias: bool = False            # biases on every linear (OpenAI's GPT-2 has them)

  POSITIVE_INTS = ModelConfig.POSITIVE_INTS + ('vocab_size', 'max_seq_len')

  def __post_init__(self):
    if self.d_ff is None:
      object.__setattr__(self, 'd_ff', 4 * self.d_model if is_positive_int(self.d_model) else None)
    super().__post_init__()
    if not isinstance(self.tie_embeddings, bool):
      raise ValueError(f'GPT2Config.tie_embeddings must be a bool, got {self.tie_embeddings!r}')


# name -> (d_model, n_heads, n_layers); d_ff = 4 d_model. OpenAI's sizes;
# 'tiny' is for CPU smoke runs.
GPT2_SIZES: dict[str, dict[str, int]] = {
    'tiny': dict(d_model=128, n_heads=4, n_layers=2),
    '124m': dict(d_model=768, n_heads=12, n_layers=12),
    '350m': dict(d_model=1024, n_heads=16, n_layers=24),
    '774m': dict(d_model=1280, n_heads=20, n_layers=36),
    '1.5b': dict(d_model=1600, n_heads=25, n_layers=48),
}


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
                               o_kw=_linear_kw(config, _residual_std(config), rngs), bias=config.bias,
                               attention=config.attention),
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
    self.check_tokens(tokens)
    if positions is None:
      positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
    x = (self.embed(tokens) + self.pos_embed(positions)).astype(cfg.compute_dtype)
    x = run_blocks(self.layers, x, remat=cfg.remat, segment_ids=segment_ids)
    return self.final_norm(x)



# ---------------------------------------------------------------------------
# Hugging Face `GPT2LMHeadModel`: config.json <-> GPT2Config, parameter path <-> tensor name.
# Its `Conv1D` weights are already [in, out]; the fused `c_attn` [d, 3d] is split into q, k, v.

_GELUS = ('gelu_new', 'gelu_pytorch_tanh')  # the tanh approximation our MLP computes


def _config_from_hf(hf: dict, overrides: dict) -> GPT2Config:
  act = hf_get(hf, 'activation_function', 'gelu_new')
  if act not in _GELUS:
    raise PretrainedError(f'config.json activation_function={act!r}: supported {list(_GELUS)}')
  for key, ok in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False)):
    if bool(hf_get(hf, key, ok)) != ok:
      raise PretrainedError(f'config.json {key}={hf[key]!r} is not supported (only {ok})')
  d = hf_get(hf, 'n_embd', required=True)
  fields = dict(
      vocab_size=hf_get(hf, 'vocab_size', required=True), d_model=d, n_heads=hf_get(hf, 'n_head', required=True),
      n_layers=hf_get(hf, 'n_layer', required=True), d_ff=hf_get(hf, 'n_inner') or 4 * d,
      max_seq_len=hf_get(hf, 'n_positions', 1024), tie_embeddings=bool(hf_get(hf, 'tie_word_embeddings', True)),
      norm_eps=float(hf_get(hf, 'layer_norm_epsilon', 1e-5)), bias=True)
  return GPT2Config(**{**fields, **overrides})


def _config_to_hf(c: GPT2Config, base: dict) -> dict:
  return {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': c.vocab_size,
      'n_embd': c.d_model, 'n_head': c.n_heads, 'n_layer': c.n_layers, 'n_inner': c.d_ff,
      'n_positions': c.max_seq_len, 'n_ctx': c.max_seq_len, 'layer_norm_epsilon': c.norm_eps,
      'activation_function': 'gelu_new', 'tie_word_embeddings': c.tie_embeddings,
      'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0,
  }


def _tensors(c: GPT2Config) -> Tensors:
  t: Tensors = {('embed', 'embedding'): ('transformer.wte.weight', 'copy'),
                ('pos_embed', 'embedding'): ('transformer.wpe.weight', 'copy'),
                **layer_norm_tensors(('final_norm',), 'transformer.ln_f')}
  for i in range(c.n_layers):
    pre = f'transformer.h.{i}.'
    for ours, theirs in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
      t.update(layer_norm_tensors(('layers', i, ours), pre + theirs))
    for leaf in ('kernel', 'bias'):
      hf_leaf = 'weight' if leaf == 'kernel' else 'bias'
      for j, name in enumerate(('q', 'k', 'v')):
        t[('layers', i, 'attn', name, leaf)] = (f'{pre}attn.c_attn.{hf_leaf}', f'fused{j}')
      for group, name, theirs in (('attn', 'o', 'attn.c_proj'), ('mlp', 'up', 'mlp.c_fc'),
                                  ('mlp', 'down', 'mlp.c_proj')):
        t[('layers', i, group, name, leaf)] = (f'{pre}{theirs}.{hf_leaf}', 'copy')  # Conv1D: [in, out]
  if not c.tie_embeddings:
    t[('head', 'kernel')] = ('lm_head.weight', 'linear')
  return t


FAMILY = register_family(Family(
    name='gpt2', title='GPT-2', config_class=GPT2Config, model_class=GPT2, sizes=GPT2_SIZES,
    task='language_model', layer_names=('q', 'k', 'v', 'o', 'up', 'down', 'head'),
    hf=HFFormat(_config_from_hf, _config_to_hf, _tensors, OVERRIDES + ('max_seq_len',),
                aliases=lambda n: (n, n.removeprefix('transformer.')),
                ignored=re.compile(r'(\.attn\.(masked_)?bias|^lm_head\.weight)$')),
    hf_architectures=('GPT2LMHeadModel',)))
gpt2_config = FAMILY.config  # gpt2_config(size, vocab_size, **overrides) -> GPT2Config
