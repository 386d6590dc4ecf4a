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

Checkpoints: :func:`vit_from_pretrained` / :func:`vit_save_pretrained` read and write a
Hugging Face ``ViTForImageClassification`` / ``ViTModel`` directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.models.linear_factory import LinearFactory
from lowrank_jax.models.safetensors_io import SafetensorsReader, write_safetensors
from lowrank_jax.models.transformer import (
    CausalSelfAttention,
    PreNormBlock,
    attach_bias,
    linear_with_bias,
    remat_policy,
    run_blocks,
)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

__all__ = ['ViT', 'ViTConfig', 'VIT_SIZES', 'classification_metrics', 'vit_config',
           'vit_from_pretrained', 'vit_save_pretrained', 'patchify']


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


# --------------------------------------------------------------------------------------------
# Hugging Face checkpoints.
#
# Layouts: torch Linear weights are [out, in] (ours [in, out]); the patch embedding is a
# Conv2d [d, C, p, p] with stride p, i.e. a linear over (channel, row, col)-ordered patches,
# ours is over (row, col, channel). ViTForImageClassification prefixes the encoder with
# `vit.` and adds `classifier`; ViTModel has neither (and may carry an unused `pooler`).

_HF_ARCHS = ('ViTForImageClassification', 'ViTModel')
_HF_ACTS = ('gelu',)  # exact GELU; anything else would silently change the function


def _hf_block_keys(i: int) -> dict[str, tuple[str, str]]:
  """Our block paths -> (HF key, layout) for block i."""
  pre = f'encoder.layer.{i}.'
  keys = {}
  for ours, theirs in (('attn/q', 'attention.attention.query'), ('attn/k', 'attention.attention.key'),
                       ('attn/v', 'attention.attention.value'), ('attn/o', 'attention.output.dense'),
                       ('mlp/up', 'intermediate.dense'), ('mlp/down', 'output.dense')):
    keys[f'layers/{i}/{ours}/kernel'] = (pre + theirs + '.weight', 'linear')
    keys[f'layers/{i}/{ours}/bias'] = (pre + theirs + '.bias', 'plain')
  for ours, theirs in (('attn_norm', 'layernorm_before'), ('mlp_norm', 'layernorm_after')):
    keys[f'layers/{i}/{ours}/scale'] = (pre + theirs + '.weight', 'plain')
    keys[f'layers/{i}/{ours}/bias'] = (pre + theirs + '.bias', 'plain')
  return keys


def _hf_keys(config: ViTConfig, prefix: str) -> dict[str, tuple[str, str]]:
  """Every encoder parameter: our path -> (HF key, layout)."""
  keys = {
      'embed/kernel': ('embeddings.patch_embeddings.projection.weight', 'conv'),
      'embed/bias': ('embeddings.patch_embeddings.projection.bias', 'plain'),
      'cls_token': ('embeddings.cls_token', 'leading_ones'),
      'pos_embed': ('embeddings.position_embeddings', 'leading_ones'),
      'final_norm/scale': ('layernorm.weight', 'plain'),
      'final_norm/bias': ('layernorm.bias', 'plain'),
  }
  for i in range(config.n_layers):
    keys.update(_hf_block_keys(i))
  if not config.qkv_bias:
    keys = {k: v for k, v in keys.items()
            if not (k.endswith('/bias') and k.split('/')[-2] in ('q', 'k', 'v'))}
  return {ours: (prefix + theirs, layout) for ours, (theirs, layout) in keys.items()}


_HEAD_KEYS = {'head/kernel': ('classifier.weight', 'linear'), 'head/bias': ('classifier.bias', 'plain')}


def _from_hf(value: np.ndarray, layout: str, config: ViTConfig) -> np.ndarray:
  if layout == 'linear':
    return value.T
  if layout == 'conv':  # [d, C, p, p] -> [(row, col, C), d]
    return value.transpose(2, 3, 1, 0).reshape(config.patch_dim, config.d_model)
  if layout == 'leading_ones':  # cls [1, 1, d] -> [d]; positions [1, n, d] -> [n, d]
    return value.reshape(value.shape[2:] if value.shape[:2] == (1, 1) else value.shape[1:])
  return value


def _to_hf(value: np.ndarray, layout: str, config: ViTConfig) -> np.ndarray:
  if layout == 'linear':
    return value.T
  if layout == 'conv':
    p, c = config.patch_size, config.num_channels
    return value.reshape(p, p, c, config.d_model).transpose(3, 2, 0, 1)
  if layout == 'leading_ones':
    return value.reshape((1,) * (3 - value.ndim) + value.shape)
  return value


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f'{path}: not found; a Hugging Face model directory holds '
                            'config.json and model.safetensors (or its sharded index)') from None


def _hf_config(directory: str) -> dict:
  """config.json of a HF ViT directory, checked."""
  hf = _read_json(os.path.join(directory, 'config.json'))
  arch = (hf.get('architectures') or ['ViTModel'])[0]
  if hf.get('model_type') != 'vit' or arch not in _HF_ARCHS:
    raise ValueError(
        f'{directory}/config.json: model_type {hf.get("model_type")!r}, architecture {arch!r}; '
        f'vit_from_pretrained reads model_type "vit" with architectures {list(_HF_ARCHS)}')
  act = hf.get('hidden_act', 'gelu')
  if act not in _HF_ACTS:
    raise ValueError(f'{directory}/config.json: hidden_act {act!r} is not supported; '
                     f'supported: {list(_HF_ACTS)}')
  return hf


def _open_tensors(directory: str):
  """(tensor names, name -> numpy tensor) over model.safetensors or its sharded index."""
  single = os.path.join(directory, 'model.safetensors')
  index = os.path.join(directory, 'model.safetensors.index.json')
  if os.path.isfile(single):
    reader = SafetensorsReader(single)
    return set(reader.names()), reader.read
  if os.path.isfile(index):
    weight_map = _read_json(index)['weight_map']
    readers = {f: SafetensorsReader(os.path.join(directory, f)) for f in set(weight_map.values())}
    return set(weight_map), lambda name: readers[weight_map[name]].read(name)
  found = sorted(os.listdir(directory)) if os.path.isdir(directory) else 'no such directory'
  raise FileNotFoundError(
      f'{directory}: no model.safetensors or model.safetensors.index.json (found: {found}); '
      'convert PyTorch .bin weights to safetensors first')


def vit_from_pretrained(directory: str | os.PathLike, *, num_classes: int | None = None,
                        linear_factory: LinearFactory | None = None, rngs: nnx.Rngs | None = None,
                        **overrides: Any) -> ViT:
  """A :class:`ViT` holding the weights of a Hugging Face ViT directory.

  Args:
    directory: holds ``config.json`` (``model_type: vit``, architecture
      ``ViTForImageClassification`` or ``ViTModel``) and ``model.safetensors`` or a
      sharded ``model.safetensors.index.json``.
    num_classes: classes of the new task. When it differs from the checkpoint's
      ``id2label`` (or the checkpoint is a headless ``ViTModel``), the head is freshly
      initialised; otherwise the checkpoint's classifier is loaded.
    linear_factory: e.g. LoRA kinds; adapters keep their initialisation, the base
      kernels hold the checkpoint's weights.
    rngs: for the parts not in the checkpoint (default ``nnx.Rngs(0)``).
    **overrides: other ``ViTConfig`` fields (``dtype``, ``param_dtype``, ``remat``).

  Raises:
    FileNotFoundError / ValueError naming the file or tensor at fault.
  """
  directory = os.fspath(directory)
  hf = _hf_config(directory)
  names, get = _open_tensors(directory)
  prefix = 'vit.' if any(n.startswith('vit.') for n in names) else ''
  has_head = 'classifier.weight' in names
  ckpt_classes = len(hf.get('id2label') or {}) or int(hf.get('num_labels', 0) or 0)
  if has_head:
    ckpt_classes = int(get('classifier.weight').shape[0])
  if num_classes is None:
    if not has_head:
      raise ValueError(f'{directory} has no classifier (a ViTModel): pass num_classes')
    num_classes = ckpt_classes
  shape = dict(image_size=int(hf.get('image_size', 224)), patch_size=int(hf.get('patch_size', 16)),
               num_channels=int(hf.get('num_channels', 3)), d_model=int(hf['hidden_size']),
               n_heads=int(hf['num_attention_heads']), n_layers=int(hf['num_hidden_layers']),
               d_ff=int(hf['intermediate_size']), qkv_bias=bool(hf.get('qkv_bias', True)),
               norm_eps=float(hf.get('layer_norm_eps', 1e-12)),
               init_std=float(hf.get('initializer_range', 0.02)))
  config = ViTConfig(num_classes=int(num_classes), **{**shape, **overrides})
  model = ViT(config, linear_factory=linear_factory, rngs=rngs or nnx.Rngs(0))
  keys = _hf_keys(config, prefix)
  if has_head and num_classes == ckpt_classes:
    keys.update(_HEAD_KEYS)
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  for ours, (theirs, layout) in keys.items():
    if theirs not in names:
      raise ValueError(f'{directory}: tensor {theirs!r} (for {ours}) is missing from the checkpoint')
    path = tuple(int(p) if p.isdigit() else p for p in ours.split('/'))
    variable = flat[path]
    value = _from_hf(np.asarray(get(theirs)), layout, config)
    if value.shape != variable.shape:
      raise ValueError(f'{directory}: tensor {theirs!r} has shape {get(theirs).shape}, which does '
                       f'not fit {ours} {tuple(variable.shape)} of config.json\'s shape')
    variable.set_value(jnp.asarray(value, variable.dtype))
  nnx.update(model, state)
  return model


def _effective_kernel(layer: nnx.Module) -> np.ndarray:
  """The layer's kernel with its adapters folded in (LoRA / ReLoRA: ``kernel + scale A B``).

  A multi-head LoRA layer is saved as its last merged kernel, the function the trainer
  evaluates.
  """
  kernel = np.asarray(layer.kernel[...], np.float32)
  delta = getattr(layer, 'delta', None)
  return kernel + np.asarray(delta(), np.float32) if callable(delta) else kernel


def vit_save_pretrained(model: ViT, directory: str | os.PathLike, *,
                        labels: list[str] | None = None, overwrite: bool = False) -> None:
  """Writes ``model`` as a Hugging Face ``ViTForImageClassification`` directory.

  ``config.json`` and ``model.safetensors`` in float32 whatever the storage dtype.
  LoRA adapters are merged into the kernels. Refuses to overwrite an existing checkpoint
  unless ``overwrite=True``.
  """
  directory = os.fspath(directory)
  config = model.config
  target = os.path.join(directory, 'model.safetensors')
  if os.path.exists(target) and not overwrite:
    raise FileExistsError(f'{target} exists; pass overwrite=True to replace it')
  if labels is not None and len(labels) != config.num_classes:
    raise ValueError(f'labels has {len(labels)} names for {config.num_classes} classes')
  labels = labels or [f'LABEL_{i}' for i in range(config.num_classes)]
  modules = {'/'.join(map(str, path)): m for path, m in nnx.iter_graph(model)
             if isinstance(m, nnx.Module)}
  flat = {'/'.join(map(str, path)): v for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  tensors = {}
  for ours, (theirs, layout) in {**_hf_keys(config, 'vit.'), **_HEAD_KEYS}.items():
    if ours.endswith('/kernel') and ours != 'embed/kernel':
      value = _effective_kernel(modules[ours.rsplit('/', 1)[0]])
    else:
      value = np.asarray(flat[ours][...], np.float32)
    tensors[theirs] = np.ascontiguousarray(_to_hf(value, layout, config))
  hf = {
      'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
      'hidden_size': config.d_model, 'num_hidden_layers': config.n_layers,
      'num_attention_heads': config.n_heads, 'intermediate_size': config.d_ff,
      'hidden_act': 'gelu', 'layer_norm_eps': config.norm_eps, 'image_size': config.image_size,
      'patch_size': config.patch_size, 'num_channels': config.num_channels,
      'qkv_bias': config.qkv_bias, 'initializer_range': config.init_std,
      'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
      'id2label': {str(i): name for i, name in enumerate(labels)},
      'label2id': {name: i for i, name in enumerate(labels)},
      'torch_dtype': 'float32',
  }
  os.makedirs(directory, exist_ok=True)
  write_safetensors(target, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(hf, f, indent=2)


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
