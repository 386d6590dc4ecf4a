"""One factory for every linear layer of a model, keyed by layer name.

A model asks ``factory(name, in_features, out_features, dtype=..., param_dtype=...,
kernel_init=..., rngs=...)`` for each of its linears; the factory picks the
*kind* configured for that layer name ('dense' by default) and calls the kind's
builder with the per-kind extra options. New kinds (LoRA, multi-head LoRA,
VeLoRA, ...) are added with :func:`register_linear_kind`, without touching the
model code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx

from lowrank_jax import nn
from lowrank_jax.models.family import layer_names

DEFAULT_KIND = 'dense'

# builder(in_features, out_features, *, dtype, param_dtype, kernel_init, rngs,
#         **options) -> nnx.Module
LinearBuilder = Callable[..., nnx.Module]

_REGISTRY: dict[str, LinearBuilder] = {}


def register_linear_kind(kind: str, builder: LinearBuilder, *,
                         overwrite: bool = False) -> None:
  """Registers ``builder`` under ``kind``.

  Re-registering the same builder is a no-op; registering a different builder
  under an existing kind raises ``ValueError`` unless ``overwrite=True``.
  """
  if not isinstance(kind, str) or not kind:
    raise ValueError(f'linear kind must be a non-empty string, got {kind!r}')
  if not callable(builder):
    raise ValueError(f'builder for linear kind {kind!r} must be callable, got {builder!r}')
  existing = _REGISTRY.get(kind)
  if existing is not None and existing is not builder and not overwrite:
    raise ValueError(
        f'linear kind {kind!r} is already registered (to {existing!r}); '
        'pass overwrite=True to replace it')
  _REGISTRY[kind] = builder


def linear_kinds() -> tuple[str, ...]:
  """The registered linear kinds, sorted."""
  return tuple(sorted(_REGISTRY))


def get_linear_builder(kind: str) -> LinearBuilder:
  try:
    return _REGISTRY[kind]
  except KeyError:
    raise ValueError(
        f'unknown linear kind {kind!r}; valid kinds: {list(linear_kinds())}') from None


register_linear_kind('dense', nn.Dense)
register_linear_kind('lora', nn.LoRALinear)
register_linear_kind('velora', nn.VeLoRALinear)
register_linear_kind('mhlora', nn.MultiHeadLoRALinear)


class LinearFactory:
  """Builds the linear layer for each layer name.

  Args:
    kinds: layer name -> kind. Names not given use ``'dense'``. Names must be in
      ``layer_names()`` (any registered family's) and kinds must be registered
      (see ``linear_kinds()``).
    options: kind -> extra keyword arguments passed to that kind's builder
      (e.g. ``{'lora': {'rank': 8, 'alpha': 16}}``). Kinds must be registered.
    layer_options: layer name -> keyword arguments for that layer only, applied
      over its kind's options (e.g. ``{'down': {'sub_token_size': 16}}``).

  Both are validated here, so a bad configuration fails before any model is
  built.
  """

  def __init__(self,
               kinds: Mapping[str, str] | None = None,
               options: Mapping[str, Mapping[str, Any]] | None = None,
               layer_options: Mapping[str, Mapping[str, Any]] | None = None):
    names = layer_names()
    kinds = dict(kinds or {})
    layer_options = {k: dict(v) for k, v in (layer_options or {}).items()}
    for name in layer_options:
      if name not in names:
        raise ValueError(f'unknown layer name {name!r} in layer options; valid layer names: {list(names)}')
    options = {k: dict(v) for k, v in (options or {}).items()}
    for name, kind in kinds.items():
      if name not in names:
        raise ValueError(f'unknown layer name {name!r} in linear kinds; valid layer names: {list(names)}')
      if kind not in _REGISTRY:
        raise ValueError(
            f'unknown linear kind {kind!r} for layer {name!r}; valid kinds: '
            f'{list(linear_kinds())}')
    for kind, opts in options.items():
      if kind not in _REGISTRY:
        raise ValueError(
            f'unknown linear kind {kind!r} in linear options; valid kinds: '
            f'{list(linear_kinds())}')
      if not isinstance(opts, Mapping):
        raise ValueError(f'options for linear kind {kind!r} must be a mapping, got {opts!r}')
    self.kinds: dict[str, str] = {name: kinds.get(name, DEFAULT_KIND) for name in names}
    self.options: dict[str, dict[str, Any]] = options
    self.layer_options: dict[str, dict[str, Any]] = layer_options

  def kind_of(self, name: str) -> str:
    """The kind that ``name`` will be built as."""
    if name not in self.kinds:
      raise ValueError(f'unknown layer name {name!r}; valid layer names: {list(self.kinds)}')
    return self.kinds[name]

  def __call__(self, name: str, in_features: int, out_features: int, *,
               dtype, param_dtype, kernel_init, rngs: nnx.Rngs) -> nnx.Module:
    kind = self.kind_of(name)
    builder = get_linear_builder(kind)
    return builder(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                   kernel_init=kernel_init, rngs=rngs,
                   **{**self.options.get(kind, {}), **self.layer_options.get(name, {})})

  def __repr__(self) -> str:
    non_default = {n: k for n, k in self.kinds.items() if k != DEFAULT_KIND}
    return f'LinearFactory(kinds={non_default}, options={self.options})'
