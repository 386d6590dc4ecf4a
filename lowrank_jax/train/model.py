"""config.model -> an NNX model, and the split that lets a plain `jax.jit` step use it.

The model is split once into a graph definition, its parameters and everything
else. Parameters travel as plain nested dicts of arrays (what Optax transforms,
masks and checkpoints see); inside the step they are put back into the NNX state
structure and merged, which costs nothing under jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.nnx as nnx
import jax
import ml_collections

from lowrank_jax import models
from lowrank_jax.train import methods
from lowrank_jax.train.optimizer import MAIN


def padded_vocab(vocab_size: int, multiple: int) -> int:
  return -(-vocab_size // multiple) * multiple


def model_config(config: ml_collections.ConfigDict, vocab_size: int):
  """The model family's config dataclass (`LlamaConfig`, `GPT2Config`) for this run."""
  m = config.model
  _, make_config, _ = models.FAMILIES[m.family]
  return make_config(
      m.size,
      padded_vocab(vocab_size, m.vocab_multiple),
      max_seq_len=config.data.seq_len,
      tie_embeddings=m.tie_embeddings,
      dtype=m.dtype,
      param_dtype=m.param_dtype,
      remat=m.remat,
  )


def linear_factory(config: ml_collections.ConfigDict, phase: str = MAIN) -> models.LinearFactory:
  """Linear kinds per layer: the method's needs first, explicit `model.linear` entries win.

  In a full-rank warm-start phase the method's kinds (e.g. LoRA) are not used yet.
  """
  method = methods.get_method(config.optimizer.name)
  kinds = dict(method.linear_kinds(config) if method.linear_kinds and phase == MAIN else {})
  kinds.update(dict(config.model.linear))
  options = dict(method.linear_options(config) if method.linear_options else {})
  layer_options = {}
  vel = config.model.velora
  for name, size in velora_layers(config).items():
    kind = kinds.get(name, "dense")
    if kind == "dense":  # a dense linear becomes a VeLoRA linear
      kinds[name] = "velora"
      layer_options[name] = {"sub_token_size": size, "scale": float(vel.scale), "v_init": vel.v_init}
    else:  # a LoRA linear compresses its adapter's input
      layer_options[name] = {"velora_sub_token_size": size, "velora_scale": float(vel.scale),
                             "velora_v_init": vel.v_init}
  return models.LinearFactory(kinds, options={k: v for k, v in options.items() if k in kinds.values()},
                              layer_options=layer_options)


def velora_layers(config: ml_collections.ConfigDict) -> dict[str, int]:
  """`model.velora.layers` ("v:8,down:16") as {layer name: sub-token size}."""
  out = {}
  for item in config.model.velora.layers.split(","):
    if not item.strip():
      continue
    name, _, size = item.strip().partition(":")
    out[name.strip()] = int(size) if size.strip() else int(config.model.velora.sub_token_size)
  return out


def linear_in_features(config: ml_collections.ConfigDict, name: str) -> int:
  """The input width of a linear of this config's model family and size."""
  sizes, _, _ = models.FAMILIES[config.model.family]
  dims = sizes[config.model.size]
  d_ff = dims.get("d_ff", 4 * dims["d_model"])  # GPT-2: 4 d
  return d_ff if name == "down" else dims["d_model"]


def build_model(config: ml_collections.ConfigDict, vocab_size: int, *, seed: int, phase: str = MAIN) -> nnx.Module:
  _, _, model_class = models.FAMILIES[config.model.family]
  return model_class(model_config(config, vocab_size), linear_factory=linear_factory(config, phase),
                     rngs=nnx.Rngs(seed))


def abstract_model(config: ml_collections.ConfigDict, vocab_size: int, phase: str = MAIN) -> nnx.Module:
  """The model with ShapeDtypeStructs for arrays: any size, nothing allocated."""
  return nnx.eval_shape(lambda: build_model(config, vocab_size, seed=0, phase=phase))


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
  total = 0

  def visit(node):
    nonlocal total
    if isinstance(node, dict):
      if "lora_a" in node and "kernel" in node:
        total += int(node["kernel"].size)
        total += sum(int(node[k].size) for k in ("lora_v_a", "lora_v_b") if k in node)
      for child in node.values():
        visit(child)

  visit(params)
  return total


@dataclasses.dataclass(frozen=True)
class ModelSplit:
  """How to go from (params dict, rest dict) back to a live model inside jit."""

  graphdef: Any
  params_treedef: Any
  rest_treedef: Any
  eval_graphdef: Any = None  # the model after `.eval()` (e.g. LTE parallel heads: W only)

  def merge(self, params: Any, rest: Any, *, evaluation: bool = False) -> nnx.Module:
    p = jax.tree.unflatten(self.params_treedef, jax.tree.leaves(params))
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
