"""Vision Transformer (Dosovitskiy et al., 2021) in Flax NNX, built through the linear factory.

``model(images float[B, H, W, C]) -> logits float32[B, num_classes]``. The image is cut
into ``patch_size`` squares, each flattened (row, column, channel) and projected to
``d_model``; a learned class token is prepended, learned positions are added, then
pre-norm blocks ``x + attn(ln(x))``, ``x + mlp(ln(x))`` with bidirectional attention
and an exact-GELU MLP, a final LayerNorm, and the head reads the class token.

Every linear of the blocks and the head comes from a :class:`LinearFactory` under the
names ``q, k, v, o`` (attention), ``up`` (d -> d_ff), ``down`` (d_ff -> d) and
``head``, so LoRA, VeLoRA, multi-head LoRA and every optimizer method apply per layer
name exactly as for LLaMA and GPT-2. Unlike those, a ViT keeps its biases (its
published checkpoints have them): each gets one beside its kernel
(:func:`~lowrank_jax.models.transformer.attach_bias`).

Parameter paths (``nnx.state(model, nnx.Param)``)::

  embed/{kernel,bias}                  [p*p*C, d_model], [d_model]   patch embedding
  cls_token                            [d_model]
  pos_embed                            [1 + (H/p)*(W/p), d_model]
  layers/{i}/attn_norm/{scale,bias}    [d_model]
  layers/{i}/attn/{q,k,v,o}/kernel     [d_model, d_model]   (+ bias [d_model])
  layers/{i}/mlp_norm/{scale,bias}     [d_model]
  layers/{i}/mlp/up/{kernel,bias}      [d_model, d_ff], [d_ff]
  layers/{i}/mlp/down/{kernel,bias}    [d_ff, d_model], [d_model]
  final_norm/{scale,bias}              [d_model]
  head/{kernel,bias}                   [d_model, num_classes], [num_classes]

The patch embedding is named ``embed`` as the other models' token embedding, so
GaLore's default selection leaves it full-rank like theirs. Initialisation as Hugging
Face's ViT: weights, class token and positions from a normal of std ``init_std``
truncated at two std; biases 0; LayerNorm scale 1, bias 0. No dropout.

Checkpoints: :func:`lowrank_jax.models.from_pretrained` / ``save_pretrained`` read and write a
Hugging Face ``ViTForImageClassification`` / ``ViTModel`` directory; the tensor map is at the end
of this file, the family's registry record last.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.models.family import Family, register_family
from lowrank_jax.models.hf_format import OVERRIDES, HFFormat, PretrainedError, Tensors, hf_get, layer_norm_tensors
from lowrank_jax.models.linear_factory import LinearFactory
from lowrank_jax.models.transformer import (
    CausalSelfAttention,
    ModelConfig,
    PreNormBlock,
    attach_bias,
    linear_with_bias,
    run_blocks,
)

__all__ = ['ViT', 'ViTConfig', 'VIT_SIZES', 'classification_metrics', 'vit_config', 'patchify']


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViTConfig(ModelConfig):
  num_classes: int
  image_size: int = 224         # square images of image_size x image_size pixels
  patch_size: int = 16
  num_channels: int = 3
  d_model: int = 768
  n_heads: int = 12
  n_layers: int = 12
  d_ff: int = 3072
  qkv_bias: bool = True         # biases on q, k, v (o, MLP, head and embedding always have one)
  norm_eps: float = 1e-12       # Hugging Face ViT's layer_norm_eps

  POSITIVE_INTS = ModelConfig.POSITIVE_INTS + ('image_size', 'patch_size', 'num_channels', 'num_classes')

  def __post_init__(self):
    super().__post_init__()
    if self.num_classes < 2:
      raise ValueError(
          f'ViTConfig.num_classes must be at least 2 for classification, got {self.num_classes}')
    if self.image_size % self.patch_size:
      valid = [p for p in range(1, self.image_size + 1) if self.image_size % p == 0]
      raise ValueError(
          f'ViTConfig.image_size ({self.image_size}) must be divisible by patch_size '
          f'({self.patch_size}); patch sizes that divide {self.image_size}: {valid}')

  @property
  def grid(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Sequence length: the class token and one token per patch."""
    return 1 + self.grid * self.grid

  @property
  def patch_dim(self) -> int:
    return self.patch_size * self.patch_size * self.num_channels


# name -> shape. b16 / l16: ViT-Base/16 and ViT-Large/16 (Dosovitskiy et al., Table 1);
# 'tiny' is for CPU runs on 28 x 28 images (7 x 7 patches of 4 x 4).
VIT_SIZES: dict[str, dict[str, int]] = {
    'tiny': dict(d_model=64, n_heads=4, n_layers=4, d_ff=256, patch_size=4),
    'b16': dict(d_model=768, n_heads=12, n_layers=12, d_ff=3072, patch_size=16),
    'l16': dict(d_model=1024, n_heads=16, n_layers=24, d_ff=4096, patch_size=16),
}


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """``[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C]``, patches row-major, each (row, col, channel)."""
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def _init(config: ViTConfig):
  return nnx.initializers.truncated_normal(stddev=config.init_std)


def _linear(config: ViTConfig, factory: LinearFactory, name: str, n_in: int, n_out: int,
            rngs: nnx.Rngs, bias: bool = True) -> nnx.Module:
  layer = factory(name, n_in, n_out, dtype=config.compute_dtype, param_dtype=config.storage_dtype,
                  kernel_init=_init(config), rngs=rngs)
  return attach_bias(layer, config.storage_dtype) if bias else layer


def _layer_norm(config: ViTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(config.d_model, epsilon=config.norm_eps, dtype=config.compute_dtype,
                       param_dtype=config.storage_dtype, rngs=rngs)


class MLP(nnx.Module):
  """``down(gelu(up(x)))`` with the exact (erf) GELU, both linears with biases."""

  def __init__(self, config: ViTConfig, factory: LinearFactory, *, rngs: nnx.Rngs):
    self.up = _linear(config, factory, 'up', config.d_model, config.d_ff, rngs)
    self.down = _linear(config, factory, 'down', config.d_ff, config.d_model, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return linear_with_bias(self.down, jax.nn.gelu(linear_with_bias(self.up, x), approximate=False))


def _block(config: ViTConfig, factory: LinearFactory, *, rngs: nnx.Rngs) -> PreNormBlock:
  kw = dict(dtype=config.compute_dtype, param_dtype=config.storage_dtype,
            kernel_init=_init(config), rngs=rngs)
  attn = CausalSelfAttention(config.d_model, config.n_heads, factory, dtype=config.compute_dtype,
                             rope_theta=None, q_kw=kw, causal=False, bias=False, attention=config.attention)
  for layer in ((attn.q, attn.k, attn.v) if config.qkv_bias else ()) + (attn.o,):
    attach_bias(layer, config.storage_dtype)
  return PreNormBlock(attn_norm=_layer_norm(config, rngs), attn=attn,
                      mlp_norm=_layer_norm(config, rngs), mlp=MLP(config, factory, rngs=rngs),
                      dtype=config.compute_dtype)


class ViT(nnx.Module):
  """Vision Transformer classifier. ``model(images [B, H, W, C]) -> logits float32[B, classes]``.

  Images are channels-last floats, already normalised (see ``lowrank_jax.data.images``).
  """

  def __init__(self, config: ViTConfig, *, linear_factory: LinearFactory | None = None,
               rngs: nnx.Rngs):
    factory = linear_factory or LinearFactory()
    self.config = config
    d, dt = config.d_model, config.storage_dtype
    self.embed = nnx.Linear(config.patch_dim, d, dtype=config.compute_dtype, param_dtype=dt,
                            kernel_init=_init(config), rngs=rngs)
    self.cls_token = nnx.Param(_init(config)(rngs.params(), (d,), dt))
    self.pos_embed = nnx.Param(_init(config)(rngs.params(), (config.num_tokens, d), dt))
    self.layers = nnx.List([_block(config, factory, rngs=rngs) for _ in range(config.n_layers)])
    self.final_norm = _layer_norm(config, rngs)
    self.head = _linear(config, factory, 'head', d, config.num_classes, rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    cfg = self.config
    expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f'images must have shape [batch, {", ".join(map(str, expected))}] '
                       f'(channels last), got {tuple(images.shape)}')
    x = self.embed(patchify(images.astype(cfg.compute_dtype), cfg.patch_size))
    cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (x.shape[0], 1, cfg.d_model))
    x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
    x = run_blocks(self.layers, x.astype(cfg.compute_dtype), remat=cfg.remat)
    x = self.final_norm(x[:, 0])
    return linear_with_bias(self.head, x).astype(jnp.float32)


def classification_metrics(logits: jax.Array, labels: jax.Array,
                           mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums over a batch: ``loss`` (cross-entropy, nats), ``correct`` (argmax hits), ``count``.

  Sums, not means, so batches (and devices, and a padded last eval batch with ``mask``
  0 on padding) combine exactly: accuracy = sum(correct) / sum(count), mean loss =
  sum(loss) / sum(count). ``logits`` [B, K] (any float dtype; computed in float32),
  ``labels`` int [B], ``mask`` [B] of 0/1 or None (all count).
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  weight = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  hit = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return {'loss': jnp.sum(nll * weight), 'correct': jnp.sum(hit * weight), 'count': jnp.sum(weight)}


# ---------------------------------------------------------------------------
# Hugging Face `ViTForImageClassification` (or a headless `ViTModel`): config.json <-> ViTConfig,
# parameter path <-> tensor name. The classifier is the one replaceable part: a class count
# other than the checkpoint's, or a headless `ViTModel`, gives a freshly initialised head.


def _class_count(hf: dict) -> int:
  return len(hf_get(hf, 'id2label') or {}) or int(hf_get(hf, 'num_labels', 0) or 0)


def _config_from_hf(hf: dict, overrides: dict) -> ViTConfig:
  if hf_get(hf, 'hidden_act', 'gelu') != 'gelu':  # anything else would silently change the function
    raise PretrainedError(f'config.json hidden_act={hf["hidden_act"]!r}: only "gelu" (exact) is supported')
  headless = 'ViTForImageClassification' not in (hf_get(hf, 'architectures') or [])
  overrides = dict(overrides)
  if 'num_classes' not in overrides:
    if headless:
      raise PretrainedError('a ViTModel has no classifier: pass num_classes (the trainer takes it from the data)')
    overrides['num_classes'] = _class_count(hf)
  fields = dict(
      image_size=int(hf_get(hf, 'image_size', 224)), patch_size=int(hf_get(hf, 'patch_size', 16)),
      num_channels=int(hf_get(hf, 'num_channels', 3)), d_model=hf_get(hf, 'hidden_size', required=True),
      n_heads=hf_get(hf, 'num_attention_heads', required=True),
      n_layers=hf_get(hf, 'num_hidden_layers', required=True),
      d_ff=hf_get(hf, 'intermediate_size', required=True), qkv_bias=bool(hf_get(hf, 'qkv_bias', True)),
      norm_eps=float(hf_get(hf, 'layer_norm_eps', 1e-12)), init_std=float(hf_get(hf, 'initializer_range', 0.02)))
  return ViTConfig(**{**fields, **overrides})


def _config_to_hf(c: ViTConfig, base: dict) -> dict:
  hf = {
      'architectures': ['ViTForImageClassification'], 'model_type': 'vit', 'hidden_size': c.d_model,
      'num_hidden_layers': c.n_layers, 'num_attention_heads': c.n_heads, 'intermediate_size': c.d_ff,
      'hidden_act': 'gelu', 'layer_norm_eps': c.norm_eps, 'image_size': c.image_size,
      'patch_size': c.patch_size, 'num_channels': c.num_channels, 'qkv_bias': c.qkv_bias,
      'initializer_range': c.init_std, 'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
  }
  if _class_count(base) != c.num_classes:  # the source's label names only if they still fit
    labels = [f'LABEL_{i}' for i in range(c.num_classes)]
    hf.update(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
  hf['num_labels'] = c.num_classes  # (a source's stale count would contradict id2label)
  return hf


def _tensors(c: ViTConfig) -> Tensors:
  t: Tensors = {('embed', 'kernel'): ('vit.embeddings.patch_embeddings.projection.weight', f'conv{c.num_channels}'),
                ('embed', 'bias'): ('vit.embeddings.patch_embeddings.projection.bias', 'copy'),
                ('cls_token',): ('vit.embeddings.cls_token', 'squeeze2'),
                ('pos_embed',): ('vit.embeddings.position_embeddings', 'squeeze1'),
                **layer_norm_tensors(('final_norm',), 'vit.layernorm'),
                ('head', 'kernel'): ('classifier.weight', 'linear'),
                ('head', 'bias'): ('classifier.bias', 'copy')}
  for i in range(c.n_layers):
    pre = f'vit.encoder.layer.{i}.'
    for ours, theirs in (('attn_norm', 'layernorm_before'), ('mlp_norm', 'layernorm_after')):
      t.update(layer_norm_tensors(('layers', i, ours), pre + theirs))
    for group, name, theirs in (('attn', 'q', 'attention.attention.query'), ('attn', 'k', 'attention.attention.key'),
                                ('attn', 'v', 'attention.attention.value'), ('attn', 'o', 'attention.output.dense'),
                                ('mlp', 'up', 'intermediate.dense'), ('mlp', 'down', 'output.dense')):
      t[('layers', i, group, name, 'kernel')] = (f'{pre}{theirs}.weight', 'linear')
      if c.qkv_bias or name not in ('q', 'k', 'v'):
        t[('layers', i, group, name, 'bias')] = (f'{pre}{theirs}.bias', 'copy')
  return t


FAMILY = register_family(Family(
    name='vit', title='ViT', config_class=ViTConfig, model_class=ViT, sizes=VIT_SIZES,
    task='classification', layer_names=('q', 'k', 'v', 'o', 'up', 'down', 'head'),
    hf=HFFormat(_config_from_hf, _config_to_hf, _tensors, OVERRIDES + ('num_classes',),
                aliases=lambda n: (n, n.removeprefix('vit.')), ignored=re.compile(r'^(vit\.)?pooler\.'),
                replaceable=re.compile(r'^classifier\.')),
    hf_architectures=('ViTForImageClassification', 'ViTModel')))
vit_config = FAMILY.config  # vit_config(size, num_classes, **overrides) -> ViTConfig
