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

Each family's module maps its config to config.json and its parameters to HF tensor names (its
``Family.hf``, an ``HFFormat``); this file is the machinery they share.

Layouts. HF stores a ``torch.nn.Linear`` weight as ``[out, in]``; our kernels are ``[in, out]``
(transposed on the way in and out). GPT-2's ``Conv1D`` is already
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

import json
import os
import re
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.models.family import Family, family_of_architecture, hf_architectures, registered_families
from lowrank_jax.models.hf_format import PretrainedError
from lowrank_jax.models.linear_factory import LinearFactory
from lowrank_jax.models.safetensors_io import DTYPE_CODES, SafetensorsReader, write_safetensors

__all__ = ['PretrainedError', 'family_of', 'from_pretrained', 'merged_params', 'pretrained_config',
           'read_hf_config', 'save_pretrained']

CONFIG_FILE = 'config.json'
SINGLE_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
# Files of a model directory that describe its tokenizer / generation, copied on export.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'tokenizer.model',
                   'vocab.json', 'merges.txt', 'generation_config.json')
_BF16 = DTYPE_CODES['BF16']


def _family_of_model(model: Any) -> Family:
  """The family of one of our models that has a Hugging Face format."""
  for family in registered_families():
    if family.hf is not None and isinstance(model, family.model_class):
      return family
  raise PretrainedError(f'save_pretrained: {type(model).__name__} has no Hugging Face format; supported: '
                        f'{sorted(f.model_class.__name__ for f in registered_families() if f.hf is not None)}')


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
  known = [n for n in names if n in hf_architectures()]
  if not known:
    raise PretrainedError(f'{file}: architecture {names or hf.get("model_type")!r} is not supported; '
                          f'supported: {list(hf_architectures())}')
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


def family_of(path: str | os.PathLike) -> Family:
  """The family that reads a model directory (its ``name``, ``model_class``, ``task``, ``hf`` format)."""
  return family_of_architecture(read_hf_config(path)[0])


def pretrained_config(path: str | os.PathLike, **overrides: Any) -> Any:
  """Our model config (``LlamaConfig`` / ``GPT2Config`` / ``ViTConfig``) for a model directory's config.json.

  Needs no weights: enough to build the abstract model (memory reports, compiling ahead).
  ``overrides`` as :func:`from_pretrained`'s. The model class is ``family_of(path).model_class``.
  """
  path = os.path.expanduser(os.fspath(path))
  arch_name, hf = read_hf_config(path)
  hf_format = family_of_architecture(arch_name).hf
  unknown = sorted(set(overrides) - set(hf_format.overrides))
  if unknown:
    raise PretrainedError(f'from_pretrained: {unknown} cannot be overridden for {arch_name} (they come from '
                          f'{CONFIG_FILE}); valid overrides: {list(hf_format.overrides)}')
  try:
    return hf_format.config_from_hf(hf, overrides)
  except (TypeError, ValueError) as e:
    raise PretrainedError(f'{os.path.join(path, CONFIG_FILE)}: {e}') from None



def from_pretrained(path: str | os.PathLike, *, linear_factory: LinearFactory | None = None,
                    sharding: Any = None, seed: int = 0, store: Callable[[tuple, jax.Array], Any] | None = None,
                    **overrides: Any) -> nnx.Module:
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
    store: ``f(path: tuple, array) -> value``, applied to each parameter as soon as it is placed, so
      the model is stored that way without ever being whole in its loaded form: the trainer
      quantizes the frozen base kernels under LoRA adapters here (``model.base_bits``: QLoRA),
      and a 7B checkpoint never sits in host memory in bf16.
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
  family = family_of_architecture(arch_name)
  hf_format = family.hf
  config = pretrained_config(path, **overrides)
  factory = linear_factory or LinearFactory()
  build = lambda: family.model_class(config, linear_factory=factory, rngs=nnx.Rngs(seed))  # noqa: E731
  graphdef, abstract_state = nnx.split(nnx.eval_shape(build))
  flat = list(nnx.to_flat_state(abstract_state))
  tensors = hf_format.tensors(config)
  ckpt = _Checkpoint(path)

  # Resolve every tensor before reading any, so a bad checkpoint fails at once.
  ours_of: dict[str, list[tuple]] = {}  # checkpoint name -> our paths it fills
  resolved: dict[tuple, tuple[str, str]] = {}
  for our_path, (hf_name, layout) in tensors.items():
    name = next((n for n in hf_format.aliases(hf_name) if n in ckpt.where), None)
    if name is None and hf_format.replaceable.search(hf_name):
      continue  # a new head: initialised below
    if name is None:
      raise PretrainedError(f'{path}: tensor {hf_name!r} is missing from the checkpoint (needed for '
                            f'{_path_str(our_path)} of {arch_name} with this config.json)')
    resolved[our_path] = (name, layout)
    ours_of.setdefault(name, []).append(our_path)
  abstract = {p: v.get_value() for p, v in flat}
  for our_path, (name, layout) in list(resolved.items()):  # a head of another class count is replaced
    if hf_format.replaceable.search(name) and _ours_shape(ckpt.shape(name), layout) != tuple(abstract[our_path].shape):
      del resolved[our_path]
      ours_of.pop(name, None)
  unused = sorted(n for n in ckpt.where
                  if n not in ours_of and not hf_format.ignored.search(n) and not hf_format.replaceable.search(n))
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
  if store is not None:
    values = {p: store(p, v) for p, v in values.items()}
  for name, paths in ours_of.items():
    array = ckpt.read(name)
    for our_path in paths:
      target = abstract[our_path]
      placed = _place(_to_ours(array, resolved[our_path][1]), target.dtype, _sharding_for(sharding, our_path, target))
      values[our_path] = placed if store is None else store(our_path, placed)
      del placed
    del array
  state = nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat])
  return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------
# Export.


def _folded_kernel(module: nnx.Module) -> jax.Array:
  """``kernel`` plus the adapters' pending contribution, in float32.

  LoRA / ReLoRA (``lora_a`` [in, r], ``lora_b`` [r, out]): ``W + scale A B``. Multi-head
  LoRA (``[N, in, r]``, ``[N, r, out]``, snapshots ``lora_v_a`` / ``lora_v_b``): ``W +
  (scale / N) sum_h (A_h B_h - V_h)``, the kernel its next merge would produce. A layer that knows
  its own (``merged_kernel``: LoRA's variants, DoRA's magnitudes) says it.
  """
  if hasattr(module, 'merged_kernel'):
    return module.merged_kernel()
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
  hf_format = _family_of_model(model).hf
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
  tensors = hf_format.tensors(config)
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
  hf_config.update(hf_format.config_to_hf(config, dict(hf_config)))
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
