"""Hugging Face checkpoints in and out: LLaMA (``LlamaForCausalLM``), GPT-2 (``GPT2LMHeadModel``)
and ViT (``ViTForImageClassification``, or a headless ``ViTModel``).

``from_pretrained(path)`` reads a model directory (``config.json`` plus ``model.safetensors``,
or ``model-0000x-of-0000y.safetensors`` shards with ``model.safetensors.index.json``) and
returns our NNX model, built through the linear factory, so LoRA, multi-head LoRA, VeLoRA
and every optimizer apply to it as to a freshly initialised model: the checkpoint fills
every weight it has (a LoRA layer's base ``kernel`` included), the rest (adapters, VeLoRA
vectors) keep their initialisation.

Memory: tensors are read one at a time into a buffer of their own (no memory map), cast
to the parameter dtype and placed straight into their target sharding with
``jax.make_array_from_callback`` (each device gets only its slice), so the host holds the
model plus about one tensor, never a float32 copy of the whole checkpoint. Leaves the
checkpoint does not provide are initialised by one jitted program whose other outputs the
compiler drops, so no random full-size kernel is ever drawn.

``save_pretrained(model, path)`` writes the same format back, adapters folded into their
kernels (LoRA / ReLoRA: ``W + (alpha/r) A B``; multi-head LoRA: ``W + (s/N) sum_h (A_h B_h -
V_h)``, what the next merge gives), so ``transformers`` loads the result and
``from_pretrained(save_pretrained(m))`` returns ``m``'s weights exactly.

Layouts. HF stores a ``torch.nn.Linear`` weight as ``[out, in]``; our kernels are
``[in, out]`` (transposed on the way in and out). GPT-2's ``Conv1D`` is already
``[in, out]``, and its fused ``c_attn`` ``[d, 3d]`` is split into q, k, v. HF LLaMA
checkpoints store q/k rows in the order its ``rotate_half`` rotary embedding expects,
which is the order :func:`lowrank_jax.nn.apply_rope` uses, so no permutation is needed.
ViT's patch embedding is a ``Conv2d`` ``[d, C, p, p]`` with stride ``p``, i.e. a linear over
(channel, row, col)-ordered patches; ours is a kernel over (row, col, channel)-ordered
patches. Its class token ``[1, 1, d]`` and positions ``[1, n, d]`` lose their leading ones.
``ViTForImageClassification`` prefixes the encoder with ``vit.``; ``ViTModel`` does not and
may carry an unused pooler.

A ViT's classifier is the one replaceable part: ``num_classes`` (an override) different from
the checkpoint's class count, or a headless ``ViTModel``, gives a freshly initialised head.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.models.gpt2 import GPT2, GPT2Config
from lowrank_jax.models.linear_factory import LinearFactory
from lowrank_jax.models.llama import Llama, LlamaConfig
from lowrank_jax.models.safetensors_io import DTYPE_CODES, SafetensorsReader, write_safetensors
from lowrank_jax.models.vit import ViT, ViTConfig

__all__ = ['ARCHITECTURES', 'PretrainedError', 'architecture', 'from_pretrained', 'merged_params',
           'pretrained_config', 'read_hf_config', 'save_pretrained']

CONFIG_FILE = 'config.json'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Files of a model directory that describe its tokenizer / generation, copied on export.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'vocab.json', 'merges.txt', 'generation_config.json')
# Fields of our model configs a caller may choose (per architecture below); everything else
# comes from config.json.
_LM_OVERRIDES = ('dtype', 'param_dtype', 'remat', 'max_seq_len')
_VIT_OVERRIDES = ('dtype', 'param_dtype', 'remat', 'num_classes')
_BF16 = DTYPE_CODES['BF16']


class PretrainedError(ValueError):
  """A model directory that cannot be read as (or written to) a Hugging Face checkpoint."""


# ---------------------------------------------------------------------------
# Architectures: config.json <-> our config, and our parameter path <-> HF tensor name.

# layout: 'copy' (same array), 'linear' (torch [out, in] <-> kernel [in, out]),
# 'fused{j}' (block j of 3 along the last axis: GPT-2's c_attn into q, k, v),
# 'conv{C}' (ViT's Conv2d [d, C, p, p] <-> kernel [(p, p, C), d]),
# 'squeeze{k}' (k leading axes of size 1 dropped: ViT's class token and positions).
Tensors = dict[tuple, tuple[str, str]]


def _get(hf: dict, key: str, default: Any = None, *, required: bool = False) -> Any:
  if required and key not in hf:
    raise PretrainedError(f'config.json has no {key!r}, needed for {hf.get("architectures")}')
  return hf.get(key, default)


def _llama_config(hf: dict, overrides: dict) -> LlamaConfig:
  d, heads = _get(hf, 'hidden_size', required=True), _get(hf, 'num_attention_heads', required=True)
  if _get(hf, 'hidden_act', 'silu') != 'silu':
    raise PretrainedError(f'config.json hidden_act={hf["hidden_act"]!r}: only "silu" (LLaMA) is supported')
  if _get(hf, 'head_dim') not in (None, d // heads):
    raise PretrainedError(f'config.json head_dim={hf["head_dim"]} differs from hidden_size / '
                          f'num_attention_heads = {d // heads}: not supported')
  # transformers < 5 writes rope_theta (+ rope_scaling); 5 writes rope_parameters.
  rope = dict(_get(hf, 'rope_parameters') or {})
  scaling = _get(hf, 'rope_scaling') or ({} if rope.get('rope_type', 'default') == 'default' else rope)
  if scaling:
    raise PretrainedError(f'config.json rope scaling {scaling!r}: scaled rotary embeddings '
                          '(e.g. Llama 3.1 "llama3") are not supported; only plain rope_theta')
  fields = dict(
      vocab_size=_get(hf, 'vocab_size', required=True), d_model=d,
      d_ff=_get(hf, 'intermediate_size', required=True), n_heads=heads,
      n_layers=_get(hf, 'num_hidden_layers', required=True),
      n_kv_heads=_get(hf, 'num_key_value_heads') or heads,
      max_seq_len=_get(hf, 'max_position_embeddings', 2048),
      tie_embeddings=bool(_get(hf, 'tie_word_embeddings', False)),
      rope_theta=float(rope.get('rope_theta', _get(hf, 'rope_theta', 10000.0))), norm_eps=float(_get(hf, 'rms_norm_eps', 1e-6)),
      attention_bias=bool(_get(hf, 'attention_bias', False)), mlp_bias=bool(_get(hf, 'mlp_bias', False)))
  return LlamaConfig(**{**fields, **overrides})


def _llama_to_hf(c: LlamaConfig, base: dict) -> dict:
  return {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': c.vocab_size,
      'hidden_size': c.d_model, 'intermediate_size': c.d_ff, 'num_attention_heads': c.n_heads,
      'num_key_value_heads': c.n_kv_heads or c.n_heads, 'num_hidden_layers': c.n_layers,
      'head_dim': c.head_dim, 'max_position_embeddings': c.max_seq_len, 'rope_theta': c.rope_theta,
      'rms_norm_eps': c.norm_eps, 'tie_word_embeddings': c.tie_embeddings, 'hidden_act': 'silu',
      'attention_bias': c.attention_bias, 'mlp_bias': c.mlp_bias, 'rope_scaling': None,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': c.rope_theta},
  }


def _llama_tensors(c: LlamaConfig) -> Tensors:
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


_GPT2_GELUS = ('gelu_new', 'gelu_pytorch_tanh')  # the tanh approximation our MLP computes


def _gpt2_config(hf: dict, overrides: dict) -> GPT2Config:
  act = _get(hf, 'activation_function', 'gelu_new')
  if act not in _GPT2_GELUS:
    raise PretrainedError(f'config.json activation_function={act!r}: supported {list(_GPT2_GELUS)}')
  for key, ok in (('scale_attn_weights', True), ('scale_attn_by_inverse_layer_idx', False)):
    if bool(_get(hf, key, ok)) != ok:
      raise PretrainedError(f'config.json {key}={hf[key]!r} is not supported (only {ok})')
  d = _get(hf, 'n_embd', required=True)
  fields = dict(
      vocab_size=_get(hf, 'vocab_size', required=True), d_model=d, n_heads=_get(hf, 'n_head', required=True),
      n_layers=_get(hf, 'n_layer', required=True), d_ff=_get(hf, 'n_inner') or 4 * d,
      max_seq_len=_get(hf, 'n_positions', 1024), tie_embeddings=bool(_get(hf, 'tie_word_embeddings', True)),
      norm_eps=float(_get(hf, 'layer_norm_epsilon', 1e-5)), bias=True)
  return GPT2Config(**{**fields, **overrides})


def _gpt2_to_hf(c: GPT2Config, base: dict) -> dict:
  return {
      'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': c.vocab_size,
      'n_embd': c.d_model, 'n_head': c.n_heads, 'n_layer': c.n_layers, 'n_inner': c.d_ff,
      'n_positions': c.max_seq_len, 'n_ctx': c.max_seq_len, 'layer_norm_epsilon': c.norm_eps,
      'activation_function': 'gelu_new', 'tie_word_embeddings': c.tie_embeddings,
      'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0,
  }


def _layer_norm(ours: tuple, theirs: str) -> Tensors:
  """A LayerNorm's scale and bias: HF's ``<theirs>.weight`` and ``<theirs>.bias``."""
  return {(*ours, 'scale'): (f'{theirs}.weight', 'copy'), (*ours, 'bias'): (f'{theirs}.bias', 'copy')}


def _gpt2_tensors(c: GPT2Config) -> Tensors:
  t: Tensors = {('embed', 'embedding'): ('transformer.wte.weight', 'copy'),
                ('pos_embed', 'embedding'): ('transformer.wpe.weight', 'copy'),
                **_layer_norm(('final_norm',), 'transformer.ln_f')}
  for i in range(c.n_layers):
    pre = f'transformer.h.{i}.'
    for ours, theirs in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
      t.update(_layer_norm(('layers', i, ours), pre + theirs))
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


def _vit_class_count(hf: dict) -> int:
  return len(_get(hf, 'id2label') or {}) or int(_get(hf, 'num_labels', 0) or 0)


def _vit_config(hf: dict, overrides: dict) -> ViTConfig:
  if _get(hf, 'hidden_act', 'gelu') != 'gelu':  # anything else would silently change the function
    raise PretrainedError(f'config.json hidden_act={hf["hidden_act"]!r}: only "gelu" (exact) is supported')
  headless = 'ViTForImageClassification' not in (_get(hf, 'architectures') or [])
  overrides = dict(overrides)
  if 'num_classes' not in overrides:
    if headless:
      raise PretrainedError('a ViTModel has no classifier: pass num_classes (the trainer takes it from the data)')
    overrides['num_classes'] = _vit_class_count(hf)
  fields = dict(
      image_size=int(_get(hf, 'image_size', 224)), patch_size=int(_get(hf, 'patch_size', 16)),
      num_channels=int(_get(hf, 'num_channels', 3)), d_model=_get(hf, 'hidden_size', required=True),
      n_heads=_get(hf, 'num_attention_heads', required=True), n_layers=_get(hf, 'num_hidden_layers', required=True),
      d_ff=_get(hf, 'intermediate_size', required=True), qkv_bias=bool(_get(hf, 'qkv_bias', True)),
      norm_eps=float(_get(hf, 'layer_norm_eps', 1e-12)), init_std=float(_get(hf, 'initializer_range', 0.02)))
  return ViTConfig(**{**fields, **overrides})


def _vit_to_hf(c: ViTConfig, base: dict) -> dict:
  hf = {
      'architectures': ['ViTForImageClassification'], 'model_type': 'vit', 'hidden_size': c.d_model,
      'num_hidden_layers': c.n_layers, 'num_attention_heads': c.n_heads, 'intermediate_size': c.d_ff,
      'hidden_act': 'gelu', 'layer_norm_eps': c.norm_eps, 'image_size': c.image_size,
      'patch_size': c.patch_size, 'num_channels': c.num_channels, 'qkv_bias': c.qkv_bias,
      'initializer_range': c.init_std, 'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
  }
  if _vit_class_count(base) != c.num_classes:  # the source's label names only if they still fit
    labels = [f'LABEL_{i}' for i in range(c.num_classes)]
    hf.update(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
  hf['num_labels'] = c.num_classes  # (a source's stale count would contradict id2label)
  return hf


def _vit_tensors(c: ViTConfig) -> Tensors:
  t: Tensors = {('embed', 'kernel'): ('vit.embeddings.patch_embeddings.projection.weight', f'conv{c.num_channels}'),
                ('embed', 'bias'): ('vit.embeddings.patch_embeddings.projection.bias', 'copy'),
                ('cls_token',): ('vit.embeddings.cls_token', 'squeeze2'),
                ('pos_embed',): ('vit.embeddings.position_embeddings', 'squeeze1'),
                **_layer_norm(('final_norm',), 'vit.layernorm'),
                ('head', 'kernel'): ('classifier.weight', 'linear'),
                ('head', 'bias'): ('classifier.bias', 'copy')}
  for i in range(c.n_layers):
    pre = f'vit.encoder.layer.{i}.'
    for ours, theirs in (('attn_norm', 'layernorm_before'), ('mlp_norm', 'layernorm_after')):
      t.update(_layer_norm(('layers', i, ours), pre + theirs))
    for group, name, theirs in (('attn', 'q', 'attention.attention.query'), ('attn', 'k', 'attention.attention.key'),
                                ('attn', 'v', 'attention.attention.value'), ('attn', 'o', 'attention.output.dense'),
                                ('mlp', 'up', 'intermediate.dense'), ('mlp', 'down', 'output.dense')):
      t[('layers', i, group, name, 'kernel')] = (f'{pre}{theirs}.weight', 'linear')
      if c.qkv_bias or name not in ('q', 'k', 'v'):
        t[('layers', i, group, name, 'bias')] = (f'{pre}{theirs}.bias', 'copy')
  return t


_NOTHING = re.compile(r'(?!)')


@dataclasses.dataclass(frozen=True)
class _Arch:
  family: str  # the trainer's model.family
  model_class: type
  config_from_hf: Callable[[dict, dict], Any]
  # (our config, the config.json it came from or {}) -> the config.json keys we set.
  config_to_hf: Callable[[Any, dict], dict]
  tensors: Callable[[Any], Tensors]
  # Names a checkpoint may use for one of ours (GPT-2 hub files were saved without 'transformer.').
  aliases: Callable[[str], tuple[str, ...]]
  # Checkpoint entries that are buffers, not weights (or a tied head saved anyway).
  ignored: re.Pattern
  overrides: tuple[str, ...] = _LM_OVERRIDES
  # Tensors freshly initialised when the checkpoint lacks them or holds another shape (a new head).
  replaceable: re.Pattern = _NOTHING


_VIT = _Arch('vit', ViT, _vit_config, _vit_to_hf, _vit_tensors, lambda n: (n, n.removeprefix('vit.')),
             re.compile(r'^(vit\.)?pooler\.'), _VIT_OVERRIDES, re.compile(r'^classifier\.'))
ARCHITECTURES: dict[str, _Arch] = {
    'LlamaForCausalLM': _Arch('llama', Llama, _llama_config, _llama_to_hf, _llama_tensors, lambda n: (n,),
                              re.compile(r'(rotary_emb\.inv_freq|^lm_head\.weight)$')),
    'GPT2LMHeadModel': _Arch('gpt2', GPT2, _gpt2_config, _gpt2_to_hf, _gpt2_tensors,
                             lambda n: (n, n.removeprefix('transformer.')),
                             re.compile(r'(\.attn\.(masked_)?bias|^lm_head\.weight)$')),
    'ViTForImageClassification': _VIT,
    'ViTModel': _VIT,
}


def _arch_of_model(model: Any) -> tuple[str, _Arch]:
  for name, arch in ARCHITECTURES.items():
    if isinstance(model, arch.model_class):
      return name, arch
  raise PretrainedError(f'save_pretrained: {type(model).__name__} has no Hugging Face format; '
                        f'supported: {sorted({a.model_class.__name__ for a in ARCHITECTURES.values()})}')


# ---------------------------------------------------------------------------
# The model directory.


def read_hf_config(path: str | os.PathLike) -> tuple[str, dict]:
  """(architecture name, config.json) of a model directory, with one clear error when unusable."""
  path = os.path.expanduser(os.fspath(path))
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isdir(path):
    raise PretrainedError(f'{path}: not a model directory (does not exist)')
  if not os.path.isfile(file):
    raise PretrainedError(f'{path}: no {CONFIG_FILE}; a Hugging Face model directory holds config.json '
                          'and model.safetensors (or sharded model-*.safetensors with an index)')
  try:
    with open(file) as f:
      hf = json.load(f)
  except ValueError as e:
    raise PretrainedError(f'{file}: not valid JSON: {e}') from None
  names = hf.get('architectures') or []
  known = [n for n in names if n in ARCHITECTURES]
  if not known:
    raise PretrainedError(f'{file}: architecture {names or hf.get("model_type")!r} is not supported; '
                          f'supported: {list(ARCHITECTURES)}')
  return known[0], hf


class _Checkpoint:
  """Tensor name -> the safetensors file holding it, over one file or an indexed set of shards."""

  def __init__(self, path: str):
    single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
    self.readers: dict[str, SafetensorsReader] = {}
    self.where: dict[str, str] = {}
    if os.path.isfile(index):
      with open(index) as f:
        weight_map = json.load(f).get('weight_map')
      if not isinstance(weight_map, dict):
        raise PretrainedError(f'{index}: no "weight_map"')
      for name, file in weight_map.items():
        full = os.path.join(path, file)
        if full not in self.readers:
          if not os.path.isfile(full):
            raise PretrainedError(f'{index} names shard {file!r} (tensor {name!r}), which is missing')
          self.readers[full] = SafetensorsReader(full)
        if name not in self.readers[full]:
          raise PretrainedError(f'{index} puts tensor {name!r} in {file}, which does not hold it')
        self.where[name] = full
    elif os.path.isfile(single):
      self.readers[single] = SafetensorsReader(single)
      self.where = {name: single for name in self.readers[single].names()}
    else:
      others = sorted(f for f in os.listdir(path) if f.endswith(('.bin', '.pt', '.pth', '.h5', '.msgpack')))
      hint = f' (found {others}: convert them to safetensors first)' if others else ''
      raise PretrainedError(f'{path}: no {SINGLE_FILE} and no {INDEX_FILE}{hint}')

  def shape(self, name: str) -> tuple[int, ...]:
    return self.readers[self.where[name]].shape(name)

  def read(self, name: str) -> np.ndarray:
    return self.readers[self.where[name]].read(name)


def _to_ours(array: np.ndarray, layout: str) -> np.ndarray:
  """An HF tensor in our layout: a view (no copy), except ViT's patch embedding (one small copy)."""
  if layout == 'linear':
    return array.T
  if layout.startswith('fused'):
    j, width = int(layout[5:]), array.shape[-1] // 3
    return array[..., j * width:(j + 1) * width]
  if layout.startswith('conv'):  # [d, C, p, p] -> [(row, col, C), d]
    return array.transpose(2, 3, 1, 0).reshape(-1, array.shape[0])
  if layout.startswith('squeeze'):
    k = int(layout[7:])
    if array.shape[:k] != (1,) * k:
      return array  # (the shape check names the mismatch)
    return array.reshape(array.shape[k:])
  return array


def _ours_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
  """The shape `_to_ours` gives a tensor of `shape`, without reading it."""
  empty = np.lib.stride_tricks.as_strided(np.zeros(1, np.bool_), shape, (0,) * len(shape))
  return tuple(_to_ours(empty, layout).shape)


def _path_str(path: tuple) -> str:
  return '/'.join(str(p) for p in path)


def _sharding_for(sharding: Any, path: tuple, abstract: jax.ShapeDtypeStruct) -> Any:
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    return sharding
  return sharding(_path_str(path), abstract)


def _cast(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
  """`block` ready to assign into `dtype`: bfloat16 -> float32 by a bit shift (exact, and far
  faster than the elementwise conversion); other pairs are cast by the assignment."""
  if block.dtype == _BF16 and dtype == np.float32:
    return (block.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  return block


def _host_copy(view: np.ndarray, dtype: Any) -> np.ndarray:
  """A C-contiguous copy of `view` in `dtype`, made block by block.

  Blocks along the axis the source is contiguous in keep a transposed copy cache-friendly
  (several times faster than one strided copy) and bound the temporaries of the cast.
  """
  dtype = np.dtype(dtype)
  out = np.empty(view.shape, dtype)
  if view.ndim != 2:
    out[...] = _cast(view, dtype)
    return out
  axis = 1 if abs(view.strides[0]) < abs(view.strides[1]) else 0  # transposed view: by columns
  step = max(1, (1 << 18) // max(1, view.shape[1 - axis]))
  for start in range(0, view.shape[axis], step):
    index = (slice(None), slice(start, start + step)) if axis else (slice(start, start + step),)
    out[index] = _cast(view[index], dtype)
  return out


def _place(view: np.ndarray, dtype: Any, sharding: Any) -> jax.Array:
  """The array in `dtype`, each device receiving only its slice of `view`."""
  if sharding is None:
    return jax.device_put(_host_copy(view, dtype))
  return jax.make_array_from_callback(view.shape, sharding, lambda index: _host_copy(view[index], dtype))


def architecture(path: str | os.PathLike) -> _Arch:
  """How a model directory is read: its family (``'llama'``, ``'gpt2'``, ``'vit'``), model class, tensors."""
  return ARCHITECTURES[read_hf_config(path)[0]]


def pretrained_config(path: str | os.PathLike, **overrides: Any) -> Any:
  """Our model config (``LlamaConfig`` / ``GPT2Config`` / ``ViTConfig``) for a model directory's config.json.

  Needs no weights: enough to build the abstract model (memory reports, compiling ahead).
  ``overrides`` as :func:`from_pretrained`'s. The model class is ``architecture(path).model_class``.
  """
  path = os.path.expanduser(os.fspath(path))
  arch_name, hf = read_hf_config(path)
  arch = ARCHITECTURES[arch_name]
  unknown = sorted(set(overrides) - set(arch.overrides))
  if unknown:
    raise PretrainedError(f'from_pretrained: {unknown} cannot be overridden for {arch_name} (they come from '
                          f'{CONFIG_FILE}); valid overrides: {list(arch.overrides)}')
  try:
    return arch.config_from_hf(hf, overrides)
  except (TypeError, ValueError) as e:
    raise PretrainedError(f'{os.path.join(path, CONFIG_FILE)}: {e}') from None



def from_pretrained(path: str | os.PathLike, *, linear_factory: LinearFactory | None = None,
                    sharding: Any = None, seed: int = 0, **overrides: Any) -> nnx.Module:
  """Our NNX model with the weights of a Hugging Face model directory.

  Args:
    path: directory with ``config.json`` and ``model.safetensors`` (or shards + index).
    linear_factory: builds the linears (LoRA / VeLoRA / multi-head LoRA kinds); the
      checkpoint fills each layer's base ``kernel`` (and ``bias``), adapters keep their init.
    sharding: where each parameter goes: None (the default device), one
      ``jax.sharding.Sharding`` for all, or ``f(path: str, abstract: ShapeDtypeStruct) ->
      Sharding`` (e.g. FSDP: split the largest axis over the mesh); each device reads
      only its slice.
    seed: initialises what the checkpoint does not hold (adapters, VeLoRA vectors).
    **overrides: our config fields to choose: ``dtype`` (compute), ``param_dtype``
      (storage; the checkpoint is cast tensor by tensor), ``remat``; ``max_seq_len``
      (LLaMA, GPT-2); ``num_classes`` (ViT: required for a headless ``ViTModel``; a count
      other than the checkpoint's gives a fresh head). Both dtypes default to float32.

  Returns:
    ``Llama``, ``GPT2`` or ``ViT``; ``model.config`` is the config read from ``config.json``.

  Raises:
    PretrainedError: unsupported architecture or config, missing files, a missing,
      unexpected or mis-shaped tensor (the message names it).

  Example::

    model = from_pretrained('~/llama-1b', param_dtype='bfloat16', dtype='bfloat16',
                            linear_factory=LinearFactory({'q': 'lora', 'v': 'lora'}))
  """
  path = os.path.expanduser(os.fspath(path))
  arch_name, _ = read_hf_config(path)
  arch = ARCHITECTURES[arch_name]
  config = pretrained_config(path, **overrides)
  factory = linear_factory or LinearFactory()
  build = lambda: arch.model_class(config, linear_factory=factory, rngs=nnx.Rngs(seed))  # noqa: E731
  graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
  flat = list(nnx.to_flat_state(abstract_state))
  tensors = arch.tensors(config)
  ckpt = _Checkpoint(path)

  # Resolve every tensor before reading any, so a bad checkpoint fails at once.
  ours_of: dict[str, list[tuple]] = {}  # checkpoint name -> our paths it fills
  resolved: dict[tuple, tuple[str, str]] = {}
  for our_path, (hf_name, layout) in tensors.items():
    name = next((n for n in arch.aliases(hf_name) if n in ckpt.where), None)
    if name is None and arch.replaceable.search(hf_name):
      continue  # a new head: initialised below
    if name is None:
      raise PretrainedError(f'{path}: tensor {hf_name!r} is missing from the checkpoint (needed for '
                            f'{_path_str(our_path)} of {arch_name} with this config.json)')
    resolved[our_path] = (name, layout)
    ours_of.setdefault(name, []).append(our_path)
  abstract = {p: v.get_value() for p, v in flat}
  for our_path, (name, layout) in list(resolved.items()):  # a head of another class count is replaced
    if arch.replaceable.search(name) and _ours_shape(ckpt.shape(name), layout) != tuple(abstract[our_path].shape):
      del resolved[our_path]
      ours_of.pop(name, None)
  unused = sorted(n for n in ckpt.where
                  if n not in ours_of and not arch.ignored.search(n) and not arch.replaceable.search(n))
  if unused:
    raise PretrainedError(f'{path}: unexpected tensor {unused[0]!r} ({len(unused)} in all) is not part of '
                          f'{arch_name} with this config.json')
  for our_path, (name, layout) in resolved.items():
    want = tuple(abstract[our_path].shape)
    if _ours_shape(ckpt.shape(name), layout) != want:
      raise PretrainedError(f'{path}: tensor {name!r} has shape {tuple(ckpt.shape(name))}, but '
                            f'config.json needs {want} for {_path_str(our_path)} ({layout} layout)')

  fresh_paths = [p for p, _ in flat if p not in resolved]

  def init_fresh():
    state = dict(nnx.to_flat_state(nnx.state(build())))
    return [state[p].get_value() for p in fresh_paths]

  out_shardings = None
  if sharding is not None:
    out_shardings = [_sharding_for(sharding, p, abstract[p]) for p in fresh_paths]
  values = {}
  if fresh_paths:  # (tracing the model's construction costs seconds: only when needed)
    values = dict(zip(fresh_paths, jax.jit(init_fresh, out_shardings=out_shardings)()))
  for name, paths in ours_of.items():
    array = ckpt.read(name)
    for our_path in paths:
      target = abstract[our_path]
      values[our_path] = _place(_to_ours(array, resolved[our_path][1]), target.dtype,
                                _sharding_for(sharding, our_path, target))
    del array
  state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat])
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------
# Export.


def _folded_kernel(module: nnx.Module) -> jax.Array:
  """``kernel`` plus the adapters' pending contribution, in float32.

  LoRA / ReLoRA (``lora_a`` [in, r], ``lora_b`` [r, out]): ``W + scale A B``. Multi-head
  LoRA (``[N, in, r]``, ``[N, r, out]``, snapshots ``lora_v_a`` / ``lora_v_b``): ``W +
  (scale / N) sum_h (A_h B_h - V_h)``, the kernel its next merge would produce.
  """
  f32 = lambda name: getattr(module, name)[...].astype(jnp.float32)  # noqa: E731
  a, b = f32('lora_a'), f32('lora_b')
  if a.ndim == 2:
    return f32('kernel') + module.scale * (a @ b)
  delta = jnp.einsum('nir,nro->io', a, b)
  if hasattr(module, 'lora_v_a'):
    delta = delta - jnp.einsum('nir,nro->io', f32('lora_v_a'), f32('lora_v_b'))
  return f32('kernel') + (module.scale / a.shape[0]) * delta


def merged_params(model: nnx.Module) -> dict[tuple, jax.Array]:
  """Parameter path -> array, with every adapted layer's adapters folded into its ``kernel``."""
  out = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for path, module in nnx.iter_modules(model):
    if hasattr(module, 'lora_a') and hasattr(module, 'kernel'):
      kernel = module.kernel[...]
      out[(*path, 'kernel')] = _folded_kernel(module).astype(kernel.dtype)
  return out


def _host(array: jax.Array) -> np.ndarray:
  if not array.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    array = multihost_utils.process_allgather(array, tiled=True)
  return np.asarray(jax.device_get(array))


def _to_hf(parts: list[np.ndarray], layout: str) -> np.ndarray:
  if layout == 'linear':
    return parts[0].T
  if layout.startswith('fused'):
    return np.concatenate(parts, axis=-1)
  if layout.startswith('conv'):  # [(row, col, C), d] -> [d, C, p, p]
    channels = int(layout[4:])
    side = int(round((parts[0].shape[0] // channels) ** 0.5))
    return parts[0].reshape(side, side, channels, -1).transpose(3, 2, 0, 1)
  if layout.startswith('squeeze'):
    return parts[0].reshape((1,) * int(layout[7:]) + parts[0].shape)
  return parts[0]


def read_existing(path: str | os.PathLike) -> list[str]:
  """The checkpoint files (config.json, weights, index) already in `path`."""
  path = os.path.expanduser(os.fspath(path))
  return [f for f in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE) if os.path.exists(os.path.join(path, f))]


def save_pretrained(model: nnx.Module, path: str | os.PathLike, *, dtype: str | None = None,
                    source: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 2**30,
                    overwrite: bool = False, config_updates: dict | None = None) -> str:
  """Writes ``model`` as a Hugging Face model directory; returns the path.

  Args:
    model: ``Llama``, ``GPT2`` or ``ViT`` (any linear kinds: adapters are folded into the
      kernels; a ViT is written as ``ViTForImageClassification``).
    path: the directory to write (created).
    dtype: storage dtype of the tensors (``'float32'`` / ``'bfloat16'``); default the
      model's ``param_dtype``, which makes ``from_pretrained`` an exact round trip.
    source: the model directory this model was loaded from: its tokenizer and generation
      files are copied, and its config.json keys we do not set (token ids, ...) are kept.
    max_shard_bytes: larger checkpoints are split into ``model-0000x-of-0000y.safetensors``
      shards with an index, as ``transformers`` writes them.
    overwrite: replace the model files of an existing checkpoint at ``path``.
    config_updates: more config.json keys to write (e.g. a ViT's ``id2label`` class names).

  A bias-free GPT-2 (as this library pre-trains it) is written with zero biases, which
  ``GPT2LMHeadModel`` requires.
  """
  _, arch = _arch_of_model(model)
  path = os.path.expanduser(os.fspath(path))
  existing = read_existing(path)
  if existing and not overwrite:
    raise PretrainedError(f'{path} already holds a checkpoint ({existing}); choose a new directory or pass '
                          'overwrite=True')
  config = model.config
  dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
  if dtype.name not in ('float32', 'bfloat16', 'float16'):
    raise PretrainedError(f'save_pretrained: dtype must be float32, bfloat16 or float16, got {dtype}')
  params = merged_params(model)
  tensors = arch.tensors(config)
  by_name: dict[str, list[tuple]] = {}
  for our_path, (name, _) in tensors.items():
    by_name.setdefault(name, []).append(our_path)

  def our_array(our_path: tuple) -> np.ndarray:
    if our_path in params:
      return _host(params[our_path]).astype(dtype)
    if our_path[-1] == 'bias':  # bias-free GPT-2 exported to HF's biased layout
      kernel = params[(*our_path[:-1], 'kernel')]
      return np.zeros(kernel.shape[-1:], dtype)
    raise PretrainedError(f'save_pretrained: the model has no parameter {_path_str(our_path)}')

  def shape_of(name: str) -> tuple[int, ...]:
    shapes = []
    for our_path in by_name[name]:
      leaf = params.get(our_path)
      shapes.append(tuple(leaf.shape) if leaf is not None else tuple(params[(*our_path[:-1], 'kernel')].shape[-1:]))
    layout = tensors[by_name[name][0]][1]
    if layout.startswith('fused'):
      return (*shapes[0][:-1], sum(s[-1] for s in shapes))
    empty = np.lib.stride_tricks.as_strided(np.zeros(1, np.bool_), shapes[0], (0,) * len(shapes[0]))
    return tuple(_to_hf([empty], layout).shape)

  def produce(name: str) -> np.ndarray:
    ours = sorted(by_name[name], key=lambda p: tensors[p][1])  # fused0, fused1, fused2
    return _to_hf([our_array(p) for p in ours], tensors[ours[0]][1])

  specs = [(name, shape_of(name), dtype) for name in by_name]
  shards, current, size = [], [], 0
  for spec in specs:
    nbytes = int(np.prod(spec[1], dtype=np.int64)) * dtype.itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(spec)
    size += nbytes
  shards.append(current)

  hf_config = {}
  if source is not None:
    _, hf_config = read_hf_config(source)
  hf_config.update(arch.config_to_hf(config, dict(hf_config)))
  hf_config.update(config_updates or {})
  hf_config['torch_dtype'] = dtype.name
  hf_config.pop('quantization_config', None)
  if jax.process_index() != 0:
    return path
  os.makedirs(path, exist_ok=True)
  if overwrite:
    for f in os.listdir(path):
      if re.fullmatch(r'model(-\d+-of-\d+)?\.safetensors(\.index\.json)?', f):
        os.remove(os.path.join(path, f))
  files = ([SINGLE_FILE] if len(shards) == 1 else
           [f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors' for k in range(len(shards))])
  total = 0
  for file, shard in zip(files, shards):
    total += write_safetensors(os.path.join(path, file), shard, produce)
  if len(shards) > 1:
    index = {'metadata': {'total_size': total},
             'weight_map': {name: file for file, shard in zip(files, shards) for name, _, _ in shard}}
    with open(os.path.join(path, INDEX_FILE), 'w') as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(path, CONFIG_FILE), 'w') as f:
    json.dump(hf_config, f, indent=2)
  if source is not None:
    source = os.path.expanduser(os.fspath(source))
    for file in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(source, file)) and os.path.abspath(source) != os.path.abspath(path):
        shutil.copyfile(os.path.join(source, file), os.path.join(path, file))
  return path
