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
Hugging Face ``ViTForImageClassification`` / ``ViTModel`` directory (``models/pretrained.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.models.linear_factory import LinearFactory
from lowrank_jax.models.transformer import (
    CausalSelfAttention,
    PreNormBlock,
    attach_bias,
    linear_with_bias,
    remat_policy,
    run_blocks,
)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

__all__ = ['ViT', 'ViTConfig', 'VIT_SIZES', 'classification_metrics', 'vit_config', 'patchify']


@dataclasses.dataclass(frozen=True)
class ViTConfig:
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
  init_std: float = 0.02
  dtype: str = 'float32'        # compute dtype
  param_dtype: str = 'float32'  # storage dtype of the parameters
  remat: bool | str = False     # activation checkpointing per block: see transformer.REMAT_POLICIES

  def __post_init__(self):
    for name in ('image_size', 'patch_size', 'num_channels', 'd_model', 'n_heads', 'n_layers',
                 'd_ff', 'num_classes'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f'ViTConfig.{name} must be a positive integer, got {value!r}')
    if self.num_classes < 2:
      raise ValueError(
          f'ViTConfig.num_classes must be at least 2 for classification, got {self.num_classes}')
    if self.image_size % self.patch_size:
      valid = [p for p in range(1, self.image_size + 1) if self.image_size % p == 0]
      raise ValueError(
          f'ViTConfig.image_size ({self.image_size}) must be divisible by patch_size '
          f'({self.patch_size}); patch sizes that divide {self.image_size}: {valid}')
    if self.d_model % self.n_heads:
      raise ValueError(
          f'ViTConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})')
    for name in ('norm_eps', 'init_std'):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f'ViTConfig.{name} must be a positive number, got {value!r}')
    for name in ('dtype', 'param_dtype'):
      value = getattr(self, name)
      if value not in DTYPES:
        raise ValueError(f'ViTConfig.{name} must be one of {list(DTYPES)}, got {value!r}')
    try:
      remat_policy(self.remat)
    except ValueError as e:
      raise ValueError(f'ViTConfig.remat: {e}') from None

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

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return DTYPES[self.param_dtype]


# name -> shape. b16 / l16: ViT-Base/16 and ViT-Large/16 (Dosovitskiy et al., Table 1);
# 'tiny' is for CPU runs on 28 x 28 images (7 x 7 patches of 4 x 4).
VIT_SIZES: dict[str, dict[str, int]] = {
    'tiny': dict(d_model=64, n_heads=4, n_layers=4, d_ff=256, patch_size=4),
    'b16': dict(d_model=768, n_heads=12, n_layers=12, d_ff=3072, patch_size=16),
    'l16': dict(d_model=1024, n_heads=16, n_layers=24, d_ff=4096, patch_size=16),
}


def vit_config(size: str, num_classes: int, **overrides: Any) -> ViTConfig:
  """The ``ViTConfig`` of a named size, with any field overridden."""
  if size not in VIT_SIZES:
    raise ValueError(f'unknown ViT size {size!r}; valid sizes: {list(VIT_SIZES)}')
  fields = {f.name for f in dataclasses.fields(ViTConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f'unknown ViTConfig fields {unknown}; valid fields: {sorted(fields)}')
  return ViTConfig(**{**VIT_SIZES[size], 'num_classes': num_classes, **overrides})


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
                             rope_theta=None, q_kw=kw, causal=False, bias=False)
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
