"""The optim factories' signatures: few positional arguments, one shared keyword order."""

import inspect
import itertools
import typing

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import optim
from lowrank_jax.optim import _factory, subspace
from lowrank_jax.optim.apollo import MINI_SCALE

SCALE_BY = {
    'galore': optim.scale_by_galore,
    'osd': optim.scale_by_osd,
    'apollo': optim.scale_by_apollo,
    'fira': optim.scale_by_fira,
}
OPTIMIZERS = {
    'galore': optim.galore,
    'osd': optim.osd,
    'apollo': optim.apollo,
    'apollo_mini': optim.apollo_mini,
    'fira': optim.fira,
}
SUBSPACE_FACTORIES = [*SCALE_BY.values(), *OPTIMIZERS.values()]
PARAMS = {'w': jnp.ones((8, 12)), 'b': jnp.zeros((12,))}
MASK = {'w': True, 'b': False}


def _names(fn, kinds=None):
  return [p.name for p in inspect.signature(fn).parameters.values() if kinds is None or p.kind in kinds]


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@pytest.mark.parametrize('fn', SUBSPACE_FACTORIES, ids=lambda f: f.__name__)
def test_only_learning_rate_and_rank_by_position(fn):
  positional = _names(fn, _POSITIONAL)
  assert positional == (['rank'] if fn.__name__.startswith('scale_by_') else ['learning_rate', 'rank'])
  others = [p for p in inspect.signature(fn).parameters.values() if p.name not in positional]
  assert others and all(p.kind is p.KEYWORD_ONLY for p in others)
  args = [1e-2] * (len(positional) - 1) + [4]  # learning rate (optimizers), rank
  fn(*args, projection_mask=MASK).init(PARAMS)  # the allowed positionals work
  with pytest.raises(TypeError):
    fn(*args, 10)  # one past them (update_proj_gap, scale, ... in the old orders) does not


def test_other_factories_reject_positional_tails():
  with pytest.raises(TypeError):
    optim.quantize_state(optax.adamw(1e-3), 8, 256)
  optim.quantize_state(optax.adamw(1e-3), 8, block_size=256)
  rules = (subspace.DecompositionRefresh(2), subspace.ProjectBack(1.0))
  with pytest.raises(TypeError):
    optim.scale_by_subspace(*rules, optax.identity())
  optim.scale_by_subspace(*rules, base_optimizer=optax.identity())


def test_subspace_factories_share_one_keyword_order():
  sigs = {fn.__name__: _names(fn) for fn in SUBSPACE_FACTORIES + [optim.scale_by_subspace]}
  for (a, na), (b, nb) in itertools.combinations(sigs.items(), 2):
    common = [n for n in na if n in nb]
    assert common == [n for n in nb if n in na], (a, b)
  # ... which is the documented one, the subspace core's parameters last but the weight decay.
  core = _names(optim.scale_by_subspace, (inspect.Parameter.KEYWORD_ONLY,))
  for fn in SUBSPACE_FACTORIES:
    names = [n for n in _names(fn) if n not in ('weight_decay', 'weight_decay_mask')]
    assert names == sorted(names, key=_factory.ORDER.index), fn.__name__
    tail = [n for n in core if n in names and n != 'rank']
    assert names[-len(tail):] == tail, fn.__name__


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_optimizer_forwards_its_scale_by_signature(name):
  opt_params = inspect.signature(OPTIMIZERS[name]).parameters
  scale_by = SCALE_BY['apollo' if name == 'apollo_mini' else name]
  changed = {'osd': {'projector_lr'}, 'apollo_mini': {'rank', 'scale', 'scaling'}}.get(name, set())
  for p in inspect.signature(scale_by).parameters.values():
    q = opt_params[p.name]
    assert q.kind is p.kind, p.name
    if p.name in changed:
      assert q.default != p.default, p.name
    else:
      assert (q.annotation, q.default) == (p.annotation, p.default), p.name
  assert list(opt_params)[0] == 'learning_rate'
  assert list(opt_params)[-2:] == ['weight_decay', 'weight_decay_mask']
  hints = typing.get_type_hints(OPTIMIZERS[name])  # annotations resolve outside their modules
  assert hints['rank'] is int and hints['return'] is optax.GradientTransformationExtraArgs
  assert OPTIMIZERS[name].__doc__ and OPTIMIZERS[name].__name__ == name


def test_removed_deprecated_names():
  with pytest.raises(TypeError):
    optim.galore(1e-2, rank=4, base=optax.identity())
  with pytest.raises(TypeError):
    optim.scale_by_osd(rank=4, mask=MASK)
  with pytest.raises(TypeError):
    optim.scale_by_osd(rank=4, moments='reset')  # OSD has no refreshes for a moment policy


def _updates(tx, steps=3):
  state = tx.init(PARAMS)
  out = []
  for i in range(steps):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(i), x.shape), PARAMS)
    u, state = jax.jit(tx.update)(g, state, PARAMS)
    out.append(u)
  return out


def test_optimizer_is_the_chain_and_mini_is_apollo_with_its_defaults():
  kw = dict(rank=3, update_proj_gap=2, projection_mask=MASK)
  chained = optax.chain(optim.scale_by_fira(**kw), optax.add_decayed_weights(0.1),
                        optax.scale_by_learning_rate(1e-2))
  mini = optim.apollo(1e-2, rank=1, scale=MINI_SCALE, scaling='tensor', projection_mask=MASK)
  pairs = [(optim.fira(1e-2, weight_decay=0.1, **kw), chained),
           (optim.apollo_mini(1e-2, projection_mask=MASK), mini)]
  for a, b in pairs:
    for ua, ub in zip(_updates(a), _updates(b)):
      for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
        np.testing.assert_array_equal(x, y)


def test_factory_checks_the_order_when_a_method_is_written():
  with pytest.raises(TypeError, match='ORDER'):
    @_factory.method()
    def scale_by_bad(rank=1, *, scale=1.0, update_proj_gap=2, **core):  # scale before the gap
      del rank, scale, update_proj_gap, core
  with pytest.raises(TypeError, match='no place'):
    @_factory.method()
    def scale_by_new(rank=1, *, novel=0, **core):
      del rank, novel, core
