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


def padded_vocab(vocab_size: int, multiple: int) -> int:
  return -(-vocab_size // multiple) * multiple


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> models.LlamaConfig:
  m = config.model
  return models.llama_config(
      m.size,
      padded_vocab(vocab_size, m.vocab_multiple),
      max_seq_len=config.data.seq_len,
      tie_embeddings=m.tie_embeddings,
      dtype=m.dtype,
      param_dtype=m.param_dtype,
      remat=m.remat,
  )


def linear_factory(config: ml_collections.ConfigDict) -> models.LinearFactory:
  """Linear kinds per layer: the method's needs first, explicit `model.linear` entries win."""
  method = methods.get_method(config.optimizer.name)
  kinds = dict(method.linear_kinds(config) if method.linear_kinds else {})
  kinds.update(dict(config.model.linear))
  return models.LinearFactory(kinds)


def build_model(config: ml_collections.ConfigDict, vocab_size: int, *, seed: int) -> nnx.Module:
  return models.Llama(model_config(config, vocab_size), linear_factory=linear_factory(config),
                      rngs=nnx.Rngs(seed))


def abstract_model(config: ml_collections.ConfigDict, vocab_size: int) -> nnx.Module:
  """The model with ShapeDtypeStructs for arrays: any size, nothing allocated."""
  return nnx.eval_shape(lambda: build_model(config, vocab_size, seed=0))


@dataclasses.dataclass(frozen=True)
class ModelSplit:
  """How to go from (params dict, rest dict) back to a live model inside jit."""

  graphdef: Any
  params_treedef: Any
  rest_treedef: Any

  def merge(self, params: Any, rest: Any) -> nnx.Module:
    p = jax.tree.unflatten(self.params_treedef, jax.tree.leaves(params))
    r = jax.tree.unflatten(self.rest_treedef, jax.tree.leaves(rest))
    return nnx.merge(self.graphdef, p, r)

  def rest_of(self, model: nnx.Module) -> Any:
    _, _, rest = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(rest)


def split_model(model: nnx.Module) -> tuple[ModelSplit, Any, Any]:
  """(split, params as a nested dict, rest as a nested dict)."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params_dict, rest_dict = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
  # The dict and the State must flatten to the same leaf order for merge() to be right.
  assert len(jax.tree.leaves(params_dict)) == len(jax.tree.leaves(params))
  split = ModelSplit(graphdef, jax.tree.structure(params), jax.tree.structure(rest))
  return split, params_dict, rest_dict
