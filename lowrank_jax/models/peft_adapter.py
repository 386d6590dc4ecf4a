"""LoRA adapters in the Hugging Face PEFT format, in and out.

A PEFT LoRA adapter is a directory with ``adapter_config.json`` (``peft_type: "LORA"``, ``r``,
``lora_alpha``, ``target_modules``, ...) and ``adapter_model.safetensors`` holding, per adapted
module of the ``transformers`` model, ``base_model.model.<module>.lora_A.weight`` [r, in] and
``.lora_B.weight`` [out, r] (DoRA adds ``.lora_magnitude_vector`` [out]). PEFT computes

    W' = W + s B A,   s = lora_alpha / r   (use_rslora: lora_alpha / sqrt(r))

on the torch weight W [out, in] (GPT-2's ``Conv1D`` stores W^T; PEFT then sets
``fan_in_fan_out`` and uses the transposed product, with the same A and B shapes). Our
:class:`~lowrank_jax.nn.LoRALinear` computes ``kernel + scale lora_a lora_b`` on ``kernel`` [in, out], so
``lora_A = lora_a^T`` and ``lora_B = lora_b^T``; r and alpha carry over unchanged. DoRA (both
sides): ``W' = m / ||W + s B A||_row (W + s B A)``, one magnitude per output, the same vector.

Module names come from each family's Hugging Face tensor table (``Family.hf.tensors``, the one
``from_pretrained`` reads): a kernel stored as ``model.layers.0.self_attn.q_proj.weight`` is the
module ``model.layers.0.self_attn.q_proj``.

GPT-2's fused ``c_attn``. PEFT adapts the Conv1D ``c_attn`` [d, 3d] as one module (A [R, d],
B [3d, R]); our q, k, v are three layers. :func:`save_adapter` writes them as one adapter of
rank ``R = r_q + r_k + r_v`` (the adapted ones only): A stacks ``a_q^T, a_k^T, a_v^T`` and B is
block diagonal (k's rows zero when k is not adapted), which is exactly the three adapters; a
``rank_pattern`` / ``alpha_pattern`` entry keeps PEFT's scale for c_attn equal to ours. Reading
a c_attn adapter of rank R back is exact in two cases:

* B has that block layout (every adapter :func:`save_adapter` writes): each layer gets its own
  block back, at its own rank r;
* otherwise (an adapter PEFT trained) every adapted layer of q, k, v must have rank R: then
  ``a_x = A^T`` and ``b_x`` = the x-rows of B for each x, again exactly PEFT's function.

So an adapter we write reads back at its rank r; one PEFT trained on c_attn with rank R needs
``optimizer.lora.rank = R`` (and the alpha giving PEFT's scale at that rank). A block whose
layer the model does not adapt must be zero in B (DoRA: its magnitude equal to the base
columns' norms).

Reading takes the adapted modules from the tensors, rank and alpha from ``r`` / ``lora_alpha``
and the patterns (matched as PEFT matches them), and ignores what only matters for training
(``lora_dropout``, a plain ``init_lora_weights``): our settings decide those.

Not supported (one :class:`PeftAdapterError` line each): other PEFT methods than LoRA, LoRA on
embeddings or convolutions, ``modules_to_save``, biases (``bias``, ``lora_bias``),
``layers_to_transform`` / ``layer_replication``, ``target_parameters``, trainable tokens,
initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA: convert them
with PEFT's ``path_initial_model_for_weight_conversion`` first), ``.bin`` weights, multi-head
LoRA layers.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from lowrank_jax.models.pretrained import _family_of_model, _host
from lowrank_jax.models.safetensors_io import SafetensorsReader, write_safetensors

__all__ = ['PeftAdapterError', 'existing_adapter', 'load_adapter', 'read_adapter_config', 'save_adapter']

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
SUFFIXES = {'.lora_A.weight': 'A', '.lora_B.weight': 'B', '.lora_magnitude_vector': 'm'}
# Our settings that decide the adapters (named in the errors).
LAYERS, RANK, ALPHA = 'optimizer.lora.layers', 'optimizer.lora.rank', 'optimizer.lora.alpha'
VARIANT, RANK_SCALING = 'optimizer.lora.variant', 'optimizer.lora.rank_scaling'

# adapter_config.json keys of features we lack, with the values that mean "not used".
_NEUTRAL: dict[str, tuple] = {
    'bias': ('none',), 'lora_bias': (False, None), 'modules_to_save': (None, []),
    'layers_to_transform': (None, []), 'layer_replication': (None, []), 'target_parameters': (None, []),
    'trainable_token_indices': (None, [], {}), 'use_qalora': (False, None), 'use_bdlora': (False, None),
    'alora_invocation_tokens': (None, []), 'arrow_config': (None,), 'velora_config': (None,),
    'monteclora_config': (None,), 'kasa_config': (None,), 'megatron_config': (None,),
}
# Keys that do not change the function an adapter computes from its tensors (the tensors say
# which modules are adapted; init configs only matter before training; dropout only in training).
_HARMLESS = frozenset((
    'peft_type', 'task_type', 'r', 'lora_alpha', 'target_modules', 'rank_pattern', 'alpha_pattern',
    'use_dora', 'use_rslora', 'init_lora_weights', 'base_model_name_or_path', 'revision',
    'inference_mode', 'peft_version', 'auto_mapping', 'lora_dropout', 'fan_in_fan_out', 'exclude_modules',
    'layers_pattern', 'ensure_weight_tying', 'loftq_config', 'eva_config', 'corda_config', 'lora_ga_config',
    'qalora_group_size', 'megatron_core', 'runtime_config'))
# init_lora_weights that rewrite the base weights: the adapter alone does not reproduce the model.
_BASE_CHANGING_INITS = ('pissa', 'olora', 'corda', 'loftq', 'lora_ga')


class PeftAdapterError(ValueError):
  """A PEFT adapter directory that cannot be written from, or read into, a model (one line)."""


# ---------------------------------------------------------------------------
# The model's modules in Hugging Face terms.


@dataclasses.dataclass(frozen=True)
class _Module:
  """One module of the ``transformers`` model that holds a linear weight."""
  name: str                            # 'model.layers.0.self_attn.q_proj'
  conv1d: bool                         # GPT-2 Conv1D (PEFT's fan_in_fan_out)
  parts: tuple[tuple[str, Any], ...]   # (our layer name, our layer) per block of the out axis

  @property
  def adapted(self) -> list[tuple[int, str, Any]]:
    return [(j, name, layer) for j, (name, layer) in enumerate(self.parts) if _is_lora(layer)]


def _is_lora(layer: Any) -> bool:
  lora_a, lora_b = getattr(layer, 'lora_a', None), getattr(layer, 'lora_b', None)
  return lora_a is not None and lora_b is not None and lora_a[...].ndim == 2


def _is_adapter(layer: Any) -> bool:
  """Any adapter at all (multi-head LoRA's 3-D factors included)."""
  return getattr(layer, 'lora_a', None) is not None


def _modules(model: nnx.Module) -> dict[str, _Module]:
  """Every linear module of the HF model, from the family's tensor table, in its order."""
  config = model.config
  layers = dict(nnx.iter_modules(model))
  blocks: dict[str, dict[int, tuple[str, Any]]] = {}
  conv1d: dict[str, bool] = {}
  for our_path, (hf_name, layout) in _family_of_model(model).hf.tensors(config).items():
    if our_path[-1] != 'kernel' or our_path[:-1] not in layers:
      continue
    layer = layers[our_path[:-1]]
    module = hf_name.removesuffix('.weight')
    if layout.startswith('fused'):
      j = int(layout[5:])
    elif layout in ('linear', 'copy'):
      j = 0
    else:  # a convolution (ViT's patches): PEFT adapts those with other tensor shapes
      if _is_adapter(layer):
        raise PeftAdapterError(f'layer {"/".join(map(str, our_path[:-1]))} ({layout} layout) has no PEFT LoRA '
                               f'equivalent here; leave {our_path[-2]!r} out of {LAYERS}')
      continue
    blocks.setdefault(module, {})[j] = (str(our_path[-2]), layer)
    conv1d[module] = layout != 'linear'
  return {name: _Module(name, conv1d[name], tuple(parts[j] for j in sorted(parts)))
          for name, parts in blocks.items()}


def _variant(layer: Any) -> str:
  return getattr(layer, 'variant', 'lora')


def _rslora(layer: Any) -> bool:
  return getattr(layer, 'rank_scaling', 'alpha_over_r') == 'rslora'


def _alpha_for(scale: float, rank: int, rslora: bool) -> float:
  """PEFT's lora_alpha giving ``scale`` at ``rank``."""
  return scale * (math.sqrt(rank) if rslora else rank)


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def _suffixes(name: str) -> list[str]:
  """'a.b.c' -> ['c', 'b.c', 'a.b.c']: the names PEFT's target_modules / patterns match it by."""
  parts = name.split('.')
  return ['.'.join(parts[-k:]) for k in range(1, len(parts) + 1)]


def _matches(suffix: str, name: str) -> bool:
  return name == suffix or name.endswith('.' + suffix)


def _shortest_keys(chosen: list[str], among: list[str]) -> list[str]:
  """For each name of ``chosen``, its shortest suffix that matches no name of ``among`` outside
  ``chosen`` (deduplicated, in order)."""
  chosen_set, keys = set(chosen), []
  for name in chosen:
    key = next(s for s in _suffixes(name) if all(n in chosen_set for n in among if _matches(s, n)))
    if key not in keys:
      keys.append(key)
  return keys


# ---------------------------------------------------------------------------
# Export.


def _f32(variable: Any) -> np.ndarray:
  return _host(variable[...]).astype(np.float32)


def _export_module(module: _Module) -> dict[str, Any]:
  """The PEFT tensors of one adapted module: {'A', 'B', 'm' (or None), 'rank', 'alpha'}."""
  adapted = module.adapted
  if len(module.parts) == 1:
    layer = adapted[0][2]
    a, b = _host(layer.lora_a[...]), _host(layer.lora_b[...])
    m = getattr(layer, 'lora_magnitude', None)
    return {'A': a.T, 'B': b.T, 'm': None if m is None else _host(m[...]),
            'rank': int(layer.rank), 'alpha': float(layer.alpha)}
  # Fused (c_attn): one adapter of rank sum(r_x), B block diagonal. A shared scale s keeps the
  # blocks bit-exact; a layer of another scale has the ratio folded into its block of B.
  scale, rslora = float(adapted[0][2].scale), _rslora(adapted[0][2])
  rank = sum(int(layer.rank) for _, _, layer in adapted)
  outs = [int(layer.out_features) for _, layer in module.parts]
  dtype = np.result_type(*(_host(layer.lora_b[...]).dtype for _, _, layer in adapted))
  a_rows, b = [], np.zeros((sum(outs), rank), dtype)
  col = 0
  for j, _, layer in adapted:
    r, row = int(layer.rank), sum(outs[:j])
    a_rows.append(_host(layer.lora_a[...]).T)
    block = _host(layer.lora_b[...]).T
    if float(layer.scale) != scale:
      block = (block.astype(np.float32) * np.float32(float(layer.scale) / scale))
    b[row:row + outs[j], col:col + r] = block.astype(dtype)
    col += r
  m = None
  if _variant(adapted[0][2]) == 'dora':
    # An unadapted block's magnitude is its base columns' norm: PEFT's m / ||W|| is then 1.
    mags = []
    for j, (_, layer) in enumerate(module.parts):
      if _is_lora(layer):
        mags.append(_f32(layer.lora_magnitude))
      else:
        mags.append(np.linalg.norm(_f32(layer.kernel), axis=0))
    m_dtype = _host(adapted[0][2].lora_magnitude[...]).dtype
    m = np.concatenate(mags).astype(m_dtype)
  return {'A': np.concatenate(a_rows, axis=0).astype(dtype), 'B': b, 'm': m, 'rank': rank,
          'alpha': _alpha_for(scale, rank, rslora)}


def existing_adapter(path: str | os.PathLike) -> list[str]:
  """The adapter files (config, weights) already in ``path`` (empty: nothing to overwrite)."""
  path = os.path.expanduser(os.fspath(path))
  return [f for f in (CONFIG_FILE, WEIGHTS_FILE, 'adapter_model.bin') if os.path.exists(os.path.join(path, f))]


def save_adapter(model: nnx.Module, path: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 overwrite: bool = False) -> str:
  """Writes the model's LoRA adapters as a PEFT adapter directory; returns the path.

  ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)`` then
  computes what ``model`` computes (the base being the checkpoint ``model`` was loaded from,
  or ``save_pretrained`` of ``model`` before training).

  Args:
    model: a ``Llama`` or ``GPT2`` (any family with a Hugging Face format) with ``'lora'``
      layers (LoRA, rsLoRA or DoRA). The adapters are written relative to the model's current
      kernels: after ReLoRA merges or a PiSSA init those are no longer the checkpoint's, and the
      adapter alone does not give the trained model (``save_pretrained`` writes it whole).
    path: the directory to write (created): ``adapter_config.json`` and
      ``adapter_model.safetensors``, tensors in the adapters' parameter dtype.
    base_model_name_or_path: written into the config (what ``AutoPeftModel`` loads the base from).
    overwrite: replace an adapter already in ``path`` (otherwise that is an error: nothing
      trained is overwritten silently).

  Raises:
    PeftAdapterError: no LoRA layers, multi-head LoRA layers, layers that mix variants or rank
      scalings (PEFT has one ``use_dora`` / ``use_rslora`` per adapter), an existing adapter.
  """
  path = os.path.expanduser(os.fspath(path))
  family = _family_of_model(model)
  modules = _modules(model)
  for module in modules.values():
    for name, layer in module.parts:
      if _is_adapter(layer) and not _is_lora(layer):
        raise PeftAdapterError(f'save_adapter: layer {name!r} of {module.name} is a multi-head LoRA layer, which '
                               'PEFT has no format for; save_pretrained folds it into the weights')
  adapted = [m for m in modules.values() if m.adapted]
  if not adapted:
    raise PeftAdapterError(f'save_adapter: the model has no LoRA layers (set {LAYERS} and optimizer.name=lora)')
  layers = [layer for m in adapted for _, _, layer in m.adapted]
  variants, rslora = {_variant(x) for x in layers}, {_rslora(x) for x in layers}
  if len(variants) > 1 or len(rslora) > 1:
    raise PeftAdapterError(f'save_adapter: the LoRA layers mix variants {sorted(variants)} or rank scalings; a '
                           f'PEFT adapter has one use_dora and one use_rslora ({VARIANT}, {RANK_SCALING})')
  existing = existing_adapter(path)
  if existing and not overwrite:
    raise PeftAdapterError(f'{path} already holds an adapter ({existing}); choose a new directory or pass '
                           'overwrite=True')

  tensors = {m.name: _export_module(m) for m in adapted}
  names = [m.name for m in adapted]
  # The most common (rank, alpha) of the unfused modules (our settings' rank and alpha) is the
  # default; the others go to rank_pattern / alpha_pattern, keyed by the shortest module-name
  # suffix that singles out modules sharing the value.
  plain = [m.name for m in adapted if len(m.parts) == 1] or names
  counts = collections.Counter((tensors[n]['rank'], tensors[n]['alpha']) for n in plain)
  rank, alpha = counts.most_common(1)[0][0]
  patterns: dict[str, dict[str, Any]] = {'rank': {}, 'alpha': {}}
  for field, default in (('rank', rank), ('alpha', alpha)):
    for name in names:
      value = tensors[name][field]
      if value != default:
        same = [n for n in names if tensors[n][field] == value]
        key = next(s for s in _suffixes(name) if all(n in same for n in names if _matches(s, n)))
        patterns[field][key] = _number(value)
  dropouts = collections.Counter(float(getattr(x, 'dropout_rate', 0.0)) for x in layers)
  config = {
      'peft_type': 'LORA',
      'task_type': 'CAUSAL_LM' if family.task == 'language_model' else None,
      'base_model_name_or_path': base_model_name_or_path,
      'revision': None,
      'inference_mode': True,
      'r': rank,
      'lora_alpha': _number(alpha),
      'target_modules': _shortest_keys(names, list(modules)),
      'exclude_modules': None,
      'rank_pattern': patterns['rank'],
      'alpha_pattern': patterns['alpha'],
      'lora_dropout': dropouts.most_common(1)[0][0],
      'bias': 'none',
      'lora_bias': False,
      'fan_in_fan_out': any(m.conv1d for m in adapted),
      'use_rslora': rslora.pop(),
      'use_dora': variants.pop() == 'dora',
      'init_lora_weights': True,
      'modules_to_save': None,
      'layers_to_transform': None,
      'layers_pattern': None,
      'layer_replication': None,
      'target_parameters': None,
      'trainable_token_indices': None,
  }
  arrays = {}
  for name in names:
    for suffix, key in SUFFIXES.items():
      if tensors[name][key] is not None:
        arrays[PREFIX + name + suffix] = np.ascontiguousarray(tensors[name][key])
  if jax.process_index() != 0:
    return path
  os.makedirs(path, exist_ok=True)
  if overwrite and os.path.exists(os.path.join(path, 'adapter_model.bin')):
    os.remove(os.path.join(path, 'adapter_model.bin'))  # a stale older adapter, not beside the new one
  write_safetensors(os.path.join(path, WEIGHTS_FILE), [(n, a.shape, a.dtype) for n, a in arrays.items()],
                    arrays.__getitem__)
  with open(os.path.join(path, CONFIG_FILE) + '.tmp', 'w') as f:
    json.dump(config, f, indent=2)
  os.replace(os.path.join(path, CONFIG_FILE) + '.tmp', os.path.join(path, CONFIG_FILE))
  return path


# ---------------------------------------------------------------------------
# Import.


def read_adapter_config(path: str | os.PathLike) -> dict:
  """``adapter_config.json`` of an adapter directory, with one clear error when it is unusable."""
  path = os.path.expanduser(os.fspath(path))
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isdir(path):
    raise PeftAdapterError(f'{path}: not an adapter directory (does not exist)')
  if not os.path.isfile(file):
    raise PeftAdapterError(f'{path}: no {CONFIG_FILE}; a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE}')
  try:
    with open(file) as f:
      config = json.load(f)
  except ValueError as e:
    raise PeftAdapterError(f'{file}: not valid JSON: {e}') from None
  if not isinstance(config, dict):
    raise PeftAdapterError(f'{file}: not a JSON object')
  return config


def _check_config(config: dict, file: str) -> None:
  """Every adapter_config.json setting we cannot reproduce is an error naming it."""
  peft_type = config.get('peft_type')
  if peft_type != 'LORA':
    raise PeftAdapterError(f'{file}: peft_type={peft_type!r} is not supported; supported: "LORA"')
  if config.get('task_type') not in (None, 'CAUSAL_LM'):
    raise PeftAdapterError(f'{file}: task_type={config["task_type"]!r} is not supported; supported: "CAUSAL_LM"')
  for key, neutral in _NEUTRAL.items():
    if key in config and config[key] not in neutral:
      raise PeftAdapterError(f'{file}: {key}={config[key]!r} is not supported (only {neutral[0]!r})')
  init = config.get('init_lora_weights', True)
  if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
    raise PeftAdapterError(f'{file}: init_lora_weights={init!r} changes the base weights, so the adapter alone does '
                           'not give the trained model; convert it to plain LoRA with PEFT\'s save_pretrained('
                           'path_initial_model_for_weight_conversion=...) first')
  for key, value in config.items():
    if key not in _HARMLESS and key not in _NEUTRAL and value not in (None, False, [], {}, 0, ''):
      raise PeftAdapterError(f'{file}: {key}={value!r} is not supported by this reader')
  if not isinstance(config.get('r'), int) or isinstance(config.get('r'), bool) or config['r'] <= 0:
    raise PeftAdapterError(f'{file}: r={config.get("r")!r} must be a positive integer')
  if not isinstance(config.get('lora_alpha', 8), (int, float)):
    raise PeftAdapterError(f'{file}: lora_alpha={config["lora_alpha"]!r} must be a number')


def _pattern_value(pattern: dict, name: str, default: Any) -> Any:
  """PEFT's ``get_pattern_key``: the first key that matches the end of the module name."""
  for key, value in (pattern or {}).items():
    if re.match(rf'(.*\.)?({key})$', name):
      return value
  return default


def _read_tensors(path: str) -> tuple[SafetensorsReader, dict[str, dict[str, str]]]:
  """The weights file and, per module, its tensor names by kind ('A', 'B', 'm')."""
  file = os.path.join(path, WEIGHTS_FILE)
  if not os.path.isfile(file):
    bins = [f for f in os.listdir(path) if f.endswith(('.bin', '.pt', '.pth'))]
    hint = (f' (found {bins}: convert them to safetensors first, e.g. PEFT save_pretrained(safe_serialization=True))'
            if bins else '')
    raise PeftAdapterError(f'{path}: no {WEIGHTS_FILE}{hint}')
  try:
    reader = SafetensorsReader(file)
  except ValueError as e:
    raise PeftAdapterError(str(e)) from None
  by_module: dict[str, dict[str, str]] = {}
  for key in reader.names():
    suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
    if suffix is None or not key.startswith(PREFIX):
      raise PeftAdapterError(f'{file}: tensor {key!r} is not a LoRA factor (base_model.model.<module>.lora_A.weight '
                             '/ lora_B.weight / lora_magnitude_vector); embeddings, biases and modules_to_save are not '
                             'supported')
    by_module.setdefault(key[len(PREFIX):-len(suffix)], {})[SUFFIXES[suffix]] = key
  if not by_module:
    raise PeftAdapterError(f'{file}: holds no tensors')
  return reader, by_module


def _settings_hint(layer_names: list[str]) -> str:
  return f'{LAYERS} (now without {", ".join(repr(n) for n in layer_names)})'


def load_adapter(model: nnx.Module, path: str | os.PathLike) -> None:
  """Reads a PEFT LoRA adapter directory into the model's LoRA layers, in place.

  The directory may come from :func:`save_adapter` or from PEFT's ``save_pretrained``. The
  model must adapt exactly the adapter's modules, with its rank, scale and variant: everything
  is checked before anything is assigned, so a failed load leaves the model unchanged.
  Factors are cast to the layers' parameter dtype and keep the layers' shardings.

  Raises:
    PeftAdapterError: one line naming the key, module or setting for each unsupported case
      (see the module docstring), e.g. a rank the model's layers do not have
      (``optimizer.lora.rank``), or a module the model does not adapt (``optimizer.lora.layers``).
  """
  path = os.path.expanduser(os.fspath(path))
  config = read_adapter_config(path)
  file = os.path.join(path, CONFIG_FILE)
  _check_config(config, file)
  reader, by_module = _read_tensors(path)
  weights = os.path.join(path, WEIGHTS_FILE)
  modules = _modules(model)
  adapted = [m for m in modules.values() if m.adapted]
  adapted_names = _shortest_keys([m.name for m in adapted], list(modules)) if adapted else []
  use_dora, use_rslora = bool(config.get('use_dora', False)), bool(config.get('use_rslora', False))

  targets = config.get('target_modules')
  if isinstance(targets, list):
    for target in targets:
      if not any(_matches(target, name) for name in modules):
        raise PeftAdapterError(f'{file}: target module {target!r} is not a linear module of this model; the model '
                               f'adapts {adapted_names}')
  assigned: list[tuple[Any, str, np.ndarray]] = []  # (layer, attribute, value)
  for name, kinds in by_module.items():
    if name not in modules:
      raise PeftAdapterError(f'{weights}: module {name!r} is not a linear module of this model; the model adapts '
                             f'{adapted_names}')
    module = modules[name]
    for kind in ('A', 'B'):
      if kind not in kinds:
        raise PeftAdapterError(f'{weights}: module {name!r} has no lora_{kind}.weight')
    if use_dora != ('m' in kinds):
      raise PeftAdapterError(f'{weights}: module {name!r} {"lacks" if use_dora else "has"} lora_magnitude_vector '
                             f'but {CONFIG_FILE} says use_dora={use_dora}')
    if not module.adapted:
      raise PeftAdapterError(f'{weights}: module {name!r} is adapted, but the model\'s layer '
                             f'{"/".join(n for n, _ in module.parts)} is not LoRA: add it to '
                             f'{_settings_hint([n for n, _ in module.parts])}')
    first = module.adapted[0][2]
    if use_dora != (_variant(first) == 'dora'):
      raise PeftAdapterError(f'{file}: use_dora={use_dora} but the model\'s LoRA layers are {_variant(first)!r}: set '
                             f'{VARIANT}={"dora" if use_dora else "lora"}')
    if use_rslora != _rslora(first):
      raise PeftAdapterError(f'{file}: use_rslora={use_rslora} but the model\'s layers scale by '
                             f'{getattr(first, "rank_scaling", "alpha_over_r")!r}: set {RANK_SCALING}='
                             f'{"rslora" if use_rslora else "alpha_over_r"}')
    rank = int(_pattern_value(config.get('rank_pattern'), name, config['r']))
    alpha = float(_pattern_value(config.get('alpha_pattern'), name, config.get('lora_alpha', 8)))
    scale = alpha / (math.sqrt(rank) if use_rslora else rank)
    a, b = reader.read(kinds['A']), reader.read(kinds['B'])
    m = reader.read(kinds['m']) if 'm' in kinds else None
    outs = [int(layer.out_features) for _, layer in module.parts]
    in_features = int(module.parts[0][1].in_features)
    want = {'A': (rank, in_features), 'B': (sum(outs), rank), 'm': (sum(outs),)}
    for kind, array in (('A', a), ('B', b), ('m', m)):
      if array is not None and tuple(array.shape) != want[kind]:
        raise PeftAdapterError(f'{weights}: tensor {kinds[kind]!r} has shape {tuple(array.shape)}; rank {rank} '
                               f'({CONFIG_FILE}) and the model need {want[kind]}')
    assigned += _import_module(module, a, b, m, rank=rank, alpha=alpha, scale=scale, rslora=use_rslora,
                               where=f'{weights}: module {name!r}')
  loaded = {id(layer) for layer, _, _ in assigned}
  missed = [(m.name, n) for m in adapted for _, n, layer in m.adapted if id(layer) not in loaded]
  if missed:
    names = sorted({n for _, n in missed})
    raise PeftAdapterError(f'{path}: the model adapts {missed[0][0]!r} ({len(missed)} layers in all), which the '
                           f'adapter does not: remove {", ".join(repr(n) for n in names)} from {LAYERS}')
  for layer, attribute, value in assigned:
    variable = getattr(layer, attribute)
    old = variable[...]
    new = jnp.asarray(value.astype(np.float32)).astype(old.dtype)
    sharding = getattr(old, 'sharding', None)
    variable[...] = jax.device_put(new, sharding) if sharding is not None else new


def _import_module(module: _Module, a: np.ndarray, b: np.ndarray, m: np.ndarray | None, *, rank: int,
                   alpha: float, scale: float, rslora: bool, where: str) -> list[tuple[Any, str, np.ndarray]]:
  """(layer, attribute, value) for the layers of one module, after checking rank and scale."""
  outs = [int(layer.out_features) for _, layer in module.parts]
  rows = [slice(sum(outs[:j]), sum(outs[:j + 1])) for j in range(len(outs))]
  adapted = module.adapted
  b_blocks = [b[r] for r in rows]
  for j, (name, layer) in enumerate(module.parts):
    if not _is_lora(layer) and np.any(b_blocks[j]):
      raise PeftAdapterError(f'{where} changes the {name!r} block, which the model does not adapt: add it to '
                             f'{_settings_hint([name])}')
  # Which rank components belong to each adapted layer: its own block of columns (the layout
  # save_adapter writes), or all of them (one PEFT adapter read as one per layer, same rank).
  ranks = [int(layer.rank) for _, _, layer in adapted]
  starts = np.cumsum([0] + ranks)
  blocks = sum(ranks) == rank and all(
      not np.any(np.delete(b_blocks[j], np.s_[starts[k]:starts[k + 1]], axis=1))
      for k, (j, _, _) in enumerate(adapted))
  if blocks:
    cols = [slice(starts[k], starts[k + 1]) for k in range(len(adapted))]
  elif all(r == rank for r in ranks):
    cols = [slice(0, rank)] * len(adapted)
  else:
    have = sorted({(n, int(layer.rank)) for _, n, layer in adapted})
    exact = ' (one adapter of a fused module becomes, exactly, one per layer of the same rank)' if len(outs) > 1 else ''
    raise PeftAdapterError(f'{where} has rank {rank}, but the model\'s LoRA layers have ranks {have}: set '
                           f'{RANK}={rank}{exact}')
  out = []
  for k, (j, name, layer) in enumerate(adapted):
    b_x = b_blocks[j][:, cols[k]]
    if blocks and k > 0 and float(layer.scale) != float(adapted[0][2].scale):
      # save_adapter folded this layer's scale ratio to the first one into its block: unfold it.
      b_x = b_x.astype(np.float32) * np.float32(scale / float(layer.scale))
    elif not math.isclose(float(layer.scale), scale, rel_tol=1e-6):
      r = cols[k].stop - cols[k].start
      raise PeftAdapterError(f'{where} has scale {scale:g} (lora_alpha {alpha:g}, rank {rank}), but the model\'s '
                             f'layer {name!r} scales by {float(layer.scale):g}: set {ALPHA}='
                             f'{_number(round(_alpha_for(scale, r, rslora), 9))}')
    out.append((layer, 'lora_a', a[cols[k]].T))
    out.append((layer, 'lora_b', b_x.T))
    if m is not None:
      out.append((layer, 'lora_magnitude', m[rows[j]]))
  if m is not None:
    for j, (name, layer) in enumerate(module.parts):
      if not _is_lora(layer):  # must leave the block unchanged: m = ||W|| column by column
        norm = np.linalg.norm(_f32(layer.kernel), axis=0)
        if not np.allclose(m[rows[j]].astype(np.float32), norm, rtol=4 * float(ml_dtypes.finfo(m.dtype).eps), atol=0):
          raise PeftAdapterError(f'{where} rescales the {name!r} block (DoRA magnitude), which the model does '
                                 f'not adapt: add it to {_settings_hint([name])}')
  return out
