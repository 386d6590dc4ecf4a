"""config.model -> an NNX model, and the split that lets a plain `jax.jit` step use it.

The model is split once into a graph definition, its parameters and everything
else. Parameters travel as plain nested dicts of arrays (what Optax transforms,
masks and checkpoints see); inside the step they are put back into the NNX state
structure and merged, which costs nothing under jit.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.nnx as nnx
import jax

from lowrank_jax import models
from lowrank_jax.nn import int8_weight, quantized_base
from lowrank_jax.optim.adapters import adapted_layers, path_names
from lowrank_jax.train.settings import RunConfig
from lowrank_jax.train.errors import ConfigError


def padded_vocab(vocab_size: int, multiple: int) -> int:
  return -(-vocab_size // multiple) * multiple


def pretrained_overrides(run: RunConfig, vocab_size: int) -> dict:
  """What the run chooses of a `model.init_from` checkpoint's config: dtypes, remat, and what the
  task changes (a ViT's class count: the data's; another count than the checkpoint's: a new head)."""
  m = run.model
  return dict(dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat, **run.task.pretrained_options(run, vocab_size))


def model_config(run: RunConfig, vocab_size: int):
  """The model family's config dataclass (`LlamaConfig`, `GPT2Config`, `ViTConfig`) for this run.

  `vocab_size` is the task's (`Task.vocab_size`: the tokenizer's, or the image classes). With
  `model.init_from` it is the checkpoint's config.json, with what the run chooses of it (dtypes,
  remat, a ViT's classes); else the family's size with what the data decides (`Task.model_options`).
  """
  m, task = run.model, run.task
  if m.init_from:
    config = models.pretrained_config(m.init_from, **pretrained_overrides(run, vocab_size))
    task.check_pretrained(run, config)
  else:
    options = task.model_options(run, vocab_size)
    try:
      config = models.get_family(m.family).config(m.size, options.pop("vocab_size"), **options, dtype=m.dtype,
                                                  param_dtype=m.param_dtype, remat=m.remat)
    except ValueError as e:  # (the family's own checks of what the data chose: a ViT's image side)
      raise ConfigError(task.model_options_key, str(e)) from None
  return dataclasses.replace(config, attention=run.attention, **({"n_layers": m.n_layers} if m.n_layers else {}))


def linear_kinds(run: RunConfig) -> dict[str, str]:
  """The kind each layer is built as: the method's needs, then explicit `model.linear` entries win.

  The one place this rule is written; unnamed layers are 'dense'.
  """
  return {**run.method.linears().kinds, **run.model.linear}


def linear_factory(run: RunConfig) -> models.LinearFactory:
  """The linear factory of this run: the method's kinds and options, and VeLoRA on the layers it names.

  VeLoRA turns a dense linear into a VeLoRA linear, and makes a LoRA linear compress its
  adapter's input.
  """
  kinds = linear_kinds(run)
  vel = run.model.velora
  layer_options = {}
  for name, size in vel.sizes.items():
    if kinds.get(name, "dense") == "dense":
      kinds[name] = "velora"
      layer_options[name] = {"sub_token_size": size, "scale": float(vel.scale), "v_init": vel.v_init}
    else:
      layer_options[name] = {"velora_sub_token_size": size, "velora_scale": float(vel.scale),
                             "velora_v_init": vel.v_init}
  options = {k: v for k, v in run.method.linears().options.items() if k in kinds.values()}
  return models.LinearFactory(kinds, options=options, layer_options=layer_options)


def _model_class(run: RunConfig):
  return models.get_family(run.model.resolved_family).model_class


def linear_shapes(run: RunConfig) -> dict[str, tuple[int, int]]:
  """{layer name: (input width, output width)} of the linears this run's model asks its factory for.

  Asked of the model itself (built abstractly, nothing allocated), so no family's
  widths are re-derived here.
  """
  shapes: dict[str, tuple[int, int]] = {}

  class Recorder(models.LinearFactory):
    def __call__(self, name, in_features, out_features, **kwargs):
      shapes[name] = (int(in_features), int(out_features))
      return super().__call__(name, in_features, out_features, **kwargs)

  config = model_config(run, run.model.vocab_multiple)  # (any vocabulary: the shapes asked for are the linears')
  nnx.eval_shape(lambda: _model_class(run)(config, linear_factory=Recorder(), rngs=nnx.Rngs(0)))
  return shapes


def build_model(run: RunConfig, vocab_size: int, *, seed: int) -> nnx.Module:
  """The run's model with fresh weights (`vocab_size`: the task's, see `model_config`)."""
  return _model_class(run)(model_config(run, vocab_size), linear_factory=linear_factory(run), rngs=nnx.Rngs(seed))


def abstract_model(run: RunConfig, vocab_size: int) -> nnx.Module:
  """The model with ShapeDtypeStructs for arrays: any size, nothing allocated."""
  return nnx.eval_shape(lambda: build_model(run, vocab_size, seed=0))


def store_base(run: RunConfig, path: tuple, leaf: Any) -> Any:
  """One parameter as the run stores it under `model.base_bits`: a frozen kernel under a LoRA adapter
  (`<layer>/kernel` of a layer built as 'lora') becomes a `QuantizedBase`; every other leaf is returned
  as it is. `path`: key entries or plain keys (a checkpoint loader's), so loading can quantize each
  tensor as it arrives (`models.from_pretrained(store=...)`)."""
  m = run.model
  keys = path_names(path)
  if (m.base_bits == 16 or len(keys) < 2 or keys[-1] != "kernel" or getattr(leaf, "ndim", 0) != 2
      or quantized_base.is_quantized_base(leaf) or linear_kinds(run).get(keys[-2]) != "lora"):
    return leaf
  return _quantize_base(leaf, m.base_bits, bool(m.base_double_quant))


@functools.partial(jax.jit, static_argnums=(1, 2))  # one compile per kernel shape, also while a checkpoint streams
def _quantize_base(kernel: jax.Array, bits: int, double_quant: bool) -> Any:
  return quantized_base.quantize_base(kernel, bits, double_quant=double_quant, dtype=kernel.dtype)


def pissa_init(run: RunConfig) -> bool:
  """Whether the adapters start as PiSSA's principal components of the base (`optimizer.lora.init`)."""
  return getattr(run.method, "init", None) == "pissa"  # (ReLoRA refuses PiSSA: only LoRA has it)


def store_weights(run: RunConfig, params: Any) -> Any:
  """The params dict as the run stores it: with `model.weight_bits=8` every kernel and the embedding
  become `Int8Weight`s (rounded to nearest once; training rounds stochastically); with
  `model.base_bits` 8 or 4 the frozen kernels under LoRA adapters become `QuantizedBase`s."""
  if run.model.base_bits != 16:
    params = jax.tree_util.tree_map_with_path(lambda path, x: store_base(run, path, x), params,
                                              is_leaf=int8_weight.is_stored)
  if run.model.weight_bits == 16:
    return params
  return int8_weight.quantize_tree(params, run.model.weight_block or None)


def transfer_params(dst: Any, src: Any) -> Any:
  """`dst` with every leaf that `src` has at the same path taken from `src`.

  Moves full-rank weights into a model with adapters: a dense layer's
  `.../q/kernel` becomes the LoRA layer's base `.../q/kernel`, while the
  adapters keep their fresh initialisation.
  """
  by_path = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(src)[0]}
  missing = set(by_path)

  def take(path, leaf):
    key = jax.tree_util.keystr(path)
    if key not in by_path:
      return leaf
    missing.discard(key)
    if tuple(by_path[key].shape) != tuple(leaf.shape):
      raise ValueError(f"parameter {key}: shape {by_path[key].shape} cannot replace {leaf.shape}")
    return by_path[key].astype(leaf.dtype)

  out = jax.tree_util.tree_map_with_path(take, dst)
  if missing:
    raise ValueError(f"parameters with no place in the new model: {sorted(missing)[:5]}")
  return out


def frozen_kernel_count(params: Any) -> int:
  """Scalars that only merges change: kernels of adapted (LoRA, multi-head LoRA) layers and
  LTE's snapshots of the heads at the last merge (`lora_v_a`, `lora_v_b`)."""
  return sum(int(node[k].size) for _, node in adapted_layers(params)
             for k in ("kernel", "lora_v_a", "lora_v_b") if k in node)


@dataclasses.dataclass(frozen=True)
class ModelSplit:
  """How to go from (params dict, rest dict) back to a live model inside jit."""

  graphdef: Any
  params_treedef: Any
  rest_treedef: Any
  eval_graphdef: Any = None  # the model after `.eval()` (e.g. LTE parallel heads: W only)

  def merge(self, params: Any, rest: Any, *, evaluation: bool = False) -> nnx.Module:
    # An int8 weight stands where its float array stood: one leaf of the NNX state.
    p = jax.tree.unflatten(self.params_treedef, jax.tree.leaves(params, is_leaf=int8_weight.is_stored))
    r = jax.tree.unflatten(self.rest_treedef, jax.tree.leaves(rest))
    graphdef = self.eval_graphdef if evaluation and self.eval_graphdef is not None else self.graphdef
    return nnx.merge(graphdef, p, r)

  def rest_of(self, model: nnx.Module) -> Any:
    _, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(rest)


def split_model(model: nnx.Module) -> tuple[ModelSplit, Any, Any]:
  """(split, params as a nested dict, rest as a nested dict)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params_dict, rest_dict = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  # The dict and the State must flatten to the same leaf order for merge() to be right.
  assert len(jax.tree.leaves(params_dict)) == len(jax.tree.leaves(params))
  model.eval()  # layers with train/eval behaviour (deterministic flags) record it in the graph
  eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
  model.train()
  split = ModelSplit(graphdef, jax.tree.structure(params), jax.tree.structure(rest), eval_graphdef)
  return split, params_dict, rest_dict
