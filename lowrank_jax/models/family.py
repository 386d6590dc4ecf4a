"""The model-family registry: one :class:`Family` record per model module.

A family module (``llama.py``, ``gpt2.py``, ``vit.py``) defines its config (a
:class:`~lowrank_jax.models.transformer.ModelConfig`), its sizes table, its model class and
its Hugging Face format, and ends with ``register_family(Family(...))``. Everything that
chooses a model (the trainer's ``model.family``, ``from_pretrained``'s config.json
``architectures``, the linear factory's layer names) asks this registry, so adding a family
is one file and one import line in ``models/__init__.py``.

This module imports no model code, so every other module of ``models`` may import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lowrank_jax.models.hf_format import HFFormat

__all__ = ['TASKS', 'Family', 'family_names', 'family_of_architecture', 'get_family', 'hf_architectures',
           'layer_names', 'register_family', 'registered_families']

# What a family's model maps its input to, and the count its config builder takes after the size:
# 'language_model': tokens [B, T] -> next-token logits [B, T, vocab_size];
# 'classification': images [B, H, W, C] -> class logits [B, num_classes].
TASKS = {'language_model': 'vocab_size', 'classification': 'num_classes'}


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
  """Everything the library knows about one model family."""
  name: str                     # the trainer's model.family
  title: str                    # how messages name it ('LLaMA')
  config_class: type            # a ModelConfig subclass
  model_class: type             # model_class(config, *, linear_factory, rngs)
  sizes: Mapping[str, Mapping[str, Any]]  # size name -> config fields (the shape)
  task: str                     # a key of TASKS
  layer_names: tuple[str, ...]  # every name the model may ask its linear factory for
  hf: HFFormat | None = None    # its Hugging Face checkpoint format, if it has one
  # config.json `architectures` read with `hf`; the first is the one written.
  hf_architectures: tuple[str, ...] = ()

  def __post_init__(self):
    if self.task not in TASKS:
      raise ValueError(f'family {self.name!r}: task must be one of {list(TASKS)}, got {self.task!r}')
    if not self.sizes:
      raise ValueError(f'family {self.name!r}: no sizes')
    if (self.hf is None) != (not self.hf_architectures):
      raise ValueError(f'family {self.name!r}: hf and hf_architectures go together')

  def config(self, size: str, outputs: int, /, **overrides: Any) -> Any:
    """The config of a named size; ``outputs`` is its ``TASKS[task]`` field (the vocabulary or
    the class count); any other field overridden."""
    if size not in self.sizes:
      raise ValueError(f'unknown {self.title} size {size!r}; valid sizes: {list(self.sizes)}')
    fields = {f.name for f in dataclasses.fields(self.config_class)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f'unknown {self.config_class.__name__} fields {unknown}; valid fields: {sorted(fields)}')
    return self.config_class(**{**self.sizes[size], TASKS[self.task]: outputs, **overrides})


_FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
  """Makes ``family`` selectable by its name (and its HF architectures); returns it."""
  if family.name in _FAMILIES:
    raise ValueError(f'model family {family.name!r} is already registered')
  taken = {a for a in family.hf_architectures if a in hf_architectures()}
  if taken:
    raise ValueError(f'model family {family.name!r}: HF architectures {sorted(taken)} are already registered')
  _FAMILIES[family.name] = family
  return family


def family_names() -> tuple[str, ...]:
  """The registered families' names, in registration order."""
  return tuple(_FAMILIES)


def registered_families() -> tuple[Family, ...]:
  return tuple(_FAMILIES.values())


def get_family(name: str) -> Family:
  if name not in _FAMILIES:
    raise ValueError(f'unknown model family {name!r}; valid families: {list(_FAMILIES)}')
  return _FAMILIES[name]


def hf_architectures() -> tuple[str, ...]:
  """Every config.json ``architectures`` name some family reads."""
  return tuple(a for f in _FAMILIES.values() for a in f.hf_architectures)


def family_of_architecture(architecture: str) -> Family:
  """The family that reads a Hugging Face architecture (``'LlamaForCausalLM'``, ...)."""
  for family in _FAMILIES.values():
    if architecture in family.hf_architectures:
      return family
  raise ValueError(f'Hugging Face architecture {architecture!r} is not supported; '
                   f'supported: {list(hf_architectures())}')


def layer_names() -> tuple[str, ...]:
  """Every layer name some family's model asks its linear factory for (first-seen order)."""
  return tuple(dict.fromkeys(n for f in _FAMILIES.values() for n in f.layer_names))
