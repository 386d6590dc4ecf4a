"""One signature for the subspace methods' factories (private).

GaLore, OSD, APOLLO and Fira each come as a pair: ``scale_by_X``, which names
its own parameters and forwards the subspace core's (``**core``) to
:func:`~lowrank_jax.optim.subspace.scale_by_subspace`, and the optimizer ``X``
= ``chain(scale_by_X(...), add_decayed_weights, scale_by_learning_rate)``.
Rather than copying those parameter lists into every function (where they
drift apart in order and defaults), :func:`method` and :func:`optimizer` build
each public signature from the one it forwards to. The result is a real
:class:`inspect.Signature` (what ``help``, :mod:`inspect`, Sphinx and
``optax.inject_hyperparams`` read), with only :data:`POSITIONAL` passable by
position and every parameter in :data:`ORDER`, the one order all the methods
share.
"""

from __future__ import annotations

import functools
import inspect
import typing
from typing import Any, Callable, Sequence

import optax

from lowrank_jax.optim import subspace

#: The order of the subspace methods' parameters. A factory takes the ones it
#: needs, in this order; a new parameter gets its place here.
ORDER = (
    'learning_rate',
    'rank',
    # The method's own (projector and lift rules).
    'update_proj_gap',
    'scale',
    'scaling',
    'norm_growth_limit',
    'refresh',
    'projector',
    'seed',
    'projector_optimizer',
    'projector_lr',
    'projector_lr_ratio',
    'orthogonality',
    # The subspace core's (scale_by_subspace).
    'proj_type',
    'base_optimizer',
    'moments',
    'projection_mask',
    'projector_dtype',
    'split_refresh',
    # The optimizer's.
    'weight_decay',
    'weight_decay_mask',
)
#: The only parameters that may be passed by position (in this order).
POSITIONAL = ('learning_rate', 'rank')

_KW = inspect.Parameter.KEYWORD_ONLY
_DECAY = (
    inspect.Parameter('weight_decay', _KW, default=0.0, annotation='float'),
    inspect.Parameter('weight_decay_mask', _KW, default=None, annotation='Any'),
)
_DECAY_HINTS = {'weight_decay': float, 'weight_decay_mask': Any}


def _named(fn: Callable) -> list[inspect.Parameter]:
  """``fn``'s parameters but its ``**kwargs``, checked to be written in :data:`ORDER`."""
  params = [p for p in inspect.signature(fn).parameters.values() if p.kind is not p.VAR_KEYWORD]
  names = [p.name for p in params]
  if names != sorted(names, key=_place) or any((p.kind is not _KW) != (p.name in POSITIONAL) for p in params):
    raise TypeError(f'{fn.__name__}{inspect.signature(fn)}: write the parameters in _factory.ORDER, '
                    f'keyword-only but for {POSITIONAL}')
  return params


def _place(name: str) -> int:
  if name not in ORDER:
    raise TypeError(f'parameter {name!r} has no place in _factory.ORDER')
  return ORDER.index(name)


def _public(fn: Callable, params: Sequence[inspect.Parameter], hints: dict[str, Any],
            call: Callable) -> Callable:
  """``fn``'s name and docstring on ``call(arguments)``, with ``params`` (in ORDER) as signature.

  The signature keeps the annotations as written (what ``help`` shows); ``__annotations__``
  holds them evaluated (``hints``, from the modules that wrote them), for ``typing.get_type_hints``.
  """
  sig = inspect.Signature(sorted(params, key=lambda p: _place(p.name)),
                          return_annotation='optax.GradientTransformationExtraArgs')

  @functools.wraps(fn)
  def factory(*args, **kwargs):
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    return call(bound.arguments)

  factory.__signature__ = sig
  factory.__annotations__ = {name: hints[name] for name in sig.parameters if name in hints}
  factory.__annotations__['return'] = optax.GradientTransformationExtraArgs
  return factory


def method(exclude: Sequence[str] = ()) -> Callable[[Callable], Callable]:
  """Decorates a ``scale_by_X(rank, *, <its own parameters>, **core)``.

  The public function takes, after ``fn``'s own parameters, the keyword-only
  parameters of :func:`~lowrank_jax.optim.subspace.scale_by_subspace` that
  ``fn`` does not name, minus ``exclude``; ``fn`` gets them in ``**core``.
  """

  def decorate(fn: Callable) -> Callable:
    own = _named(fn)
    names = {p.name for p in own} | set(exclude)
    core = [p for p in inspect.signature(subspace.scale_by_subspace).parameters.values()
            if p.kind is _KW and p.name not in names]
    hints = {**typing.get_type_hints(subspace.scale_by_subspace), **typing.get_type_hints(fn)}
    return _public(fn, own + core, hints, lambda arguments: fn(**arguments))

  return decorate


def optimizer(scale_by: Callable, **defaults: Any) -> Callable[[Callable], Callable]:
  """Decorates the optimizer of ``scale_by``: ``fn(learning_rate, *, <its own>, **kwargs)``.

  The public function takes ``learning_rate``, then ``scale_by``'s parameters
  (with ``defaults`` in place of its defaults) and ``fn``'s own, then
  ``weight_decay`` and ``weight_decay_mask``, and returns
  ``chain(scale_by(**fn(...)), add_decayed_weights(weight_decay,
  weight_decay_mask), scale_by_learning_rate(learning_rate))``: ``fn`` maps
  its arguments to ``scale_by``'s (``return kwargs`` where they are the same).
  """

  def decorate(fn: Callable) -> Callable:
    own = _named(fn)
    names = {p.name for p in own}
    inherited = inspect.signature(scale_by).parameters
    if set(defaults) - set(inherited):
      raise TypeError(f'{scale_by.__name__} has no parameters {sorted(set(defaults) - set(inherited))}')
    params = own + [p.replace(default=defaults.get(p.name, p.default)) for p in inherited.values()
                    if p.name not in names] + list(_DECAY)
    hints = {**typing.get_type_hints(scale_by), **typing.get_type_hints(fn), **_DECAY_HINTS}

    def call(arguments):
      decay, decay_mask = arguments.pop('weight_decay'), arguments.pop('weight_decay_mask')
      return optax.chain(
          scale_by(**fn(**arguments)),
          optax.add_decayed_weights(decay, decay_mask),
          optax.scale_by_learning_rate(arguments['learning_rate']),
      )

    return _public(fn, params, hints, call)

  return decorate
