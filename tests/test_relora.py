"""Tests of lowrank_jax.optim.relora and lowrank_jax.optim.schedules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lowrank_jax.optim.relora import (ReLoRAState, adapted_layer_paths, prune_leaf,
                                      relora)
from lowrank_jax.optim.schedules import jagged_cosine_schedule

S0, S1 = 2.0, 0.5  # LoRA scales of the two adapted layers
SCALES = {'l0': S0, 'blocks/l1': S1}


def _rand(rng, shape, scale=1.0):
  return jnp.asarray(rng.normal(size=shape).astype(np.float32) * scale)


def _params(seed=0):
  """Two adapted layers (one nested), a norm and a plain dense head."""
  rng = np.random.default_rng(seed)
  return {
      'l0': {'kernel': _rand(rng, (8, 6), 0.3), 'lora_a': _rand(rng, (8, 3), 0.3),
             'lora_b': _rand(rng, (3, 6), 0.1)},
      'norm': {'scale': 1.0 + _rand(rng, (6,), 0.1)},
      'blocks': {'l1': {'kernel': _rand(rng, (6, 5), 0.3), 'lora_a': _rand(rng, (6, 2), 0.3),
                        'lora_b': _rand(rng, (2, 5), 0.1)}},
      'head': {'kernel': _rand(rng, (5, 4), 0.3)},
  }


def _weight(layer, scale):
  return layer['kernel'] + scale * layer['lora_a'] @ layer['lora_b']


def _forward(p, x):
  h = x @ _weight(p['l0'], S0)
  h = jnp.tanh(h * p['norm']['scale'])
  h = h @ _weight(p['blocks']['l1'], S1)
  return h @ p['head']['kernel']


def _loss(p, x, y):
  return jnp.mean((_forward(p, x) - y) ** 2)


def _batch(i):
  rng = np.random.default_rng(100 + i)
  return _rand(rng, (16, 8)), _rand(rng, (16, 4))


_grad_fn = jax.jit(jax.grad(_loss))


def _grads(p, i):
  return _grad_fn(p, *_batch(i))


def _trainable(tree):
  """The tree without the adapted kernels (what the inner optimizer should see)."""
  return {
      'l0': {'lora_a': tree['l0']['lora_a'], 'lora_b': tree['l0']['lora_b']},
      'norm': tree['norm'],
      'blocks': {'l1': {'lora_a': tree['blocks']['l1']['lora_a'],
                        'lora_b': tree['blocks']['l1']['lora_b']}},
      'head': tree['head'],
  }


ADAPTER_PATHS = [('l0', 'lora_a'), ('l0', 'lora_b'), ('blocks', 'l1', 'lora_a'),
                 ('blocks', 'l1', 'lora_b')]


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _run(tx, steps, params=None, jit=True):
  params = _params() if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  history = []
  for i in range(steps):
    g = _grads(params, i)
    updates, state = update(g, state, params)
    history.append((params, g, updates, state))
    params = optax.apply_updates(params, updates)
  return params, state, history, update


def _assert_tree_close(a, b, **kw):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# --------------------------------------------------------------------------- #
# Structure, masking and between-merge updates
# --------------------------------------------------------------------------- #


def test_detects_adapted_layers_and_masks_kernels():
  params = _params()
  assert sorted(adapted_layer_paths(params)) == ['blocks/l1', 'l0']
  assert adapted_layer_paths(params, layer_filter=lambda path, node: path != ('l0',)) == [
      'blocks/l1']
  state = relora(optax.adam(1e-2), 4, scale=SCALES).init(params)
  assert isinstance(state, ReLoRAState)
  mu = state.inner_state[0].mu
  assert isinstance(mu['l0']['kernel'], optax.MaskedNode)
  assert isinstance(mu['blocks']['l1']['kernel'], optax.MaskedNode)
  assert mu['head']['kernel'].shape == (5, 4)  # not adapted: trained normally
  assert all(np.size(x) > 0 for x in jax.tree.leaves(state))


def test_inner_state_bytes_exclude_adapted_kernels():
  params = _params()
  n_total = sum(x.size for x in jax.tree.leaves(params))
  n_kernels = 8 * 6 + 6 * 5
  state = relora(optax.adam(1e-2), 4, scale=SCALES).init(params)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  # Adam: mu + nu (float32) over everything but the adapted kernels, 2 int32 counts.
  assert nbytes == 2 * 4 * (n_total - n_kernels) + 4 + 4
  full = sum(x.nbytes for x in jax.tree.leaves(optax.adam(1e-2).init(params)))
  assert full - nbytes == 2 * 4 * n_kernels - 4


def _inner_alone(inner, history):
  """The inner optimizer run alone on the trainable leaves: [(updates, state)] per step."""
  update = jax.jit(inner.update)
  state = inner.init(_trainable(history[0][0]))
  out = []
  for params, g, _, _ in history:
    updates, state = update(_trainable(g), state, _trainable(params))
    out.append((updates, state))
  return out


MERGE_EVERY = 3


@pytest.fixture(scope='module')
def adamw_run():
  """relora(adamw) with merge_every=3, magnitude pruning to 0.5, run for 3 steps."""
  inner = optax.adamw(1e-2, weight_decay=0.1)
  tx = relora(inner, MERGE_EVERY, scale=SCALES, prune='magnitude', prune_ratio=0.5, seed=1)
  params, state, history, update = _run(tx, MERGE_EVERY)
  return dict(params=params, state=state, history=history, update=update,
              reference=_inner_alone(inner, history))


def test_between_merges_matches_inner_alone(adamw_run):
  history, reference = adamw_run['history'], adamw_run['reference']
  for (params, g, updates, state), (ref_updates, ref_state) in zip(
      history[:MERGE_EVERY - 1], reference):
    np.testing.assert_array_equal(updates['l0']['kernel'], 0.0)
    np.testing.assert_array_equal(updates['blocks']['l1']['kernel'], 0.0)
    _assert_tree_close(_trainable(updates), ref_updates, rtol=1e-6, atol=1e-8)
    _assert_tree_close(state.inner_state, ref_state, rtol=1e-6, atol=1e-8)
  assert [int(h[3].count) for h in history] == list(range(1, MERGE_EVERY + 1))


# --------------------------------------------------------------------------- #
# Merge steps
# --------------------------------------------------------------------------- #


def test_merge_step_keeps_the_function_of_the_ordinary_update(adamw_run):
  """On the merge step, f(params + relora updates) == f(params + ordinary updates).

  The ordinary update is the inner optimizer's update of the trainable leaves
  (adapters and non-adapted leaves) with the kernels unchanged, i.e. what the
  step would have done without a merge.
  """
  params, state, update = adamw_run['params'], adamw_run['state'], adamw_run['update']
  before = adamw_run['history'][-1][0]
  ref_updates = adamw_run['reference'][-1][0]
  assert int(state.count) == MERGE_EVERY
  ordinary = jax.tree.map(lambda x: x, before)  # fresh containers
  applied = optax.apply_updates(_trainable(before), ref_updates)
  for path in ADAPTER_PATHS + [('norm', 'scale'), ('head', 'kernel')]:
    _get(ordinary, path[:-1])[path[-1]] = _get(applied, path)
  x = _batch(50)[0]
  np.testing.assert_allclose(np.asarray(_forward(params, x)), np.asarray(_forward(ordinary, x)),
                             rtol=1e-5, atol=1e-6)
  # Non-adapted leaves got exactly the ordinary update.
  _assert_tree_close(params['norm'], ordinary['norm'], rtol=1e-6)
  _assert_tree_close(params['head'], ordinary['head'], rtol=1e-6)
  for path, scale in ((('l0',), S0), (('blocks', 'l1'), S1)):
    new, old = _get(params, path), _get(ordinary, path)
    # Kernel absorbed s A' B' (A', B' after this step's ordinary update), per-layer s.
    np.testing.assert_allclose(np.asarray(new['kernel']), np.asarray(_weight(old, scale)),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(new['lora_b'], 0.0)  # exactly
    # A re-drawn: different, within the Kaiming-uniform bound of its fan-in.
    bound = 1 / math.sqrt(new['lora_a'].shape[0])
    assert np.abs(np.asarray(new['lora_a'])).max() <= bound * (1 + 1e-6)
    assert not np.allclose(np.asarray(new['lora_a']), np.asarray(old['lora_a']))
  # After the merge, ordinary steps resume (kernels frozen again), same executable.
  updates, _ = update(_grads(params, 99), state, params)
  np.testing.assert_array_equal(updates['l0']['kernel'], 0.0)
  assert float(jnp.abs(updates['l0']['lora_b']).max()) > 0
  assert update._cache_size() == 1  # no recompilation across merges


def test_redrawn_a_distribution_and_fresh_draw_each_merge():
  params = {'big': {'kernel': jnp.zeros((64, 16)), 'lora_a': jnp.zeros((64, 32)),
                    'lora_b': jnp.zeros((32, 16))}}
  tx = relora(optax.sgd(0.0), 1, scale=1.0, prune='reset', seed=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  g = jax.tree.map(jnp.zeros_like, params)
  draws = []
  for _ in range(2):
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    draws.append(np.asarray(params['big']['lora_a']).ravel())
  bound = 1 / 8.0
  for a in draws:  # 2048 samples of U(-1/8, 1/8)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.98 * bound
    assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert abs(a.mean()) < 4 * bound / math.sqrt(3 * a.size)
  assert abs(np.corrcoef(draws[0], draws[1])[0, 1]) < 0.1  # independent draws
  # The draw depends on the seed.
  other = relora(optax.sgd(0.0), 1, scale=1.0, prune='reset', seed=4)
  u, _ = other.update(g, other.init(params), params)
  assert not np.allclose(np.asarray(params['big']['lora_a']) + np.asarray(u['big']['lora_a']),
                         draws[-1].reshape(64, 32))


def test_callable_scale_and_missing_scale():
  tx = relora(optax.sgd(0.0), 1, scale=lambda path: SCALES['/'.join(path)])
  params = _params()
  updates, _ = tx.update(_grads(params, 0), tx.init(params), params)
  for path, s in ((('l0',), S0), (('blocks', 'l1'), S1)):
    layer = _get(params, path)
    np.testing.assert_allclose(np.asarray(_get(updates, path)['kernel']),
                               np.asarray(s * layer['lora_a'] @ layer['lora_b']), rtol=1e-6)
  with pytest.raises(ValueError, match='no scale'):
    relora(optax.sgd(0.1), 1, scale={'l0': 1.0}).init(_params())


# --------------------------------------------------------------------------- #
# Pruning
# --------------------------------------------------------------------------- #


def _check_untouched_and_structure(state, ref_state, history):
  before = history[0][3]  # a state from a non-merge step: same structure
  assert jax.tree.structure(state) == jax.tree.structure(before)
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(before), strict=True):
    assert x.shape == y.shape and x.dtype == y.dtype
  adam, ref = state.inner_state[0], ref_state[0]
  assert int(adam.count) == int(ref.count) == len(history)
  for moments, ref_moments in ((adam.mu, ref.mu), (adam.nu, ref.nu)):
    for key in ('norm', 'head'):
      _assert_tree_close(moments[key], ref_moments[key], rtol=1e-6, atol=1e-10)


def test_magnitude_pruning_exact_count(adamw_run):
  """Coordinates are pruned: the largest |mu| survive, and nu is zeroed at the same places."""
  ratio, state, history = 0.5, adamw_run['state'], adamw_run['history']
  ref_state = adamw_run['reference'][-1][1]
  _check_untouched_and_structure(state, ref_state, history)
  mu, nu = state.inner_state[0].mu, state.inner_state[0].nu
  for path in ADAPTER_PATHS:
    got_mu, ref_mu = np.asarray(_get(mu, path)), np.asarray(_get(ref_state[0].mu, path))
    got_nu, ref_nu = np.asarray(_get(nu, path)), np.asarray(_get(ref_state[0].nu, path))
    assert np.all(ref_mu != 0) and np.all(ref_nu != 0)
    kept = got_mu != 0
    assert int(np.sum(~kept)) == int(round(ratio * ref_mu.size))
    np.testing.assert_allclose(got_mu[kept], ref_mu[kept], rtol=1e-6)  # kept values intact
    assert np.abs(ref_mu[kept]).min() >= np.abs(ref_mu[~kept]).max()  # and the largest
    np.testing.assert_array_equal(got_nu != 0, kept)  # the same coordinates in nu
    np.testing.assert_allclose(got_nu[kept], ref_nu[kept], rtol=1e-6)


@pytest.mark.parametrize('prune', ['magnitude', 'random'])
def test_no_update_blow_up_after_a_merge(prune):
  """Right after a merge B = 0, so A's gradient is exactly zero. Had mu survived where nu
  was pruned, Adam would step by mu / eps there; with coordinate pruning every update stays
  within Adam's usual bound of about lr * (1 - b1) / sqrt(1 - b2)."""
  rng = np.random.default_rng(0)
  params = {'l': {'kernel': _rand(rng, (16, 8), 0.1), 'lora_a': _rand(rng, (16, 4), 0.1),
                  'lora_b': jnp.zeros((4, 8))}}
  lr = 1e-2
  tx = relora(optax.adam(lr), 5, scale=1.0, prune=prune, prune_ratio=0.9)
  state = tx.init(params)
  update = jax.jit(tx.update)

  def grads(p):  # a real LoRA gradient: dL/dA = x^T (dy B^T) vanishes when B = 0
    x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
    loss = lambda q: jnp.sum((x @ q['l']['kernel'] + x @ q['l']['lora_a'] @ q['l']['lora_b']) ** 2)
    return jax.grad(loss)(p)

  for step in range(8):  # the merge is on update 5; watch the updates after it
    u, state = update(grads(params), state, params)
    if step >= 5:
      for key in ('lora_a', 'lora_b'):
        assert float(jnp.max(jnp.abs(u['l'][key]))) <= lr * 0.1 / np.sqrt(1 - 0.999) * 1.01, (step, key)
    params = optax.apply_updates(params, u)


def test_random_pruning_binomial():
  ratio = 0.3
  params = {'big': {'kernel': jnp.zeros((64, 16)),
                    'lora_a': _rand(np.random.default_rng(0), (64, 32), 0.1),
                    'lora_b': _rand(np.random.default_rng(1), (32, 16), 0.1)},
            'other': jnp.ones((50,))}
  tx = relora(optax.adam(1e-2), 1, scale=1.0, prune='random', prune_ratio=ratio)
  state = tx.init(params)
  g = {'big': {'kernel': jnp.ones((64, 16)), 'lora_a': _rand(np.random.default_rng(2), (64, 32)),
               'lora_b': _rand(np.random.default_rng(3), (32, 16))},
       'other': _rand(np.random.default_rng(4), (50,))}
  _, state = jax.jit(tx.update)(g, state, params)
  ref_updates, ref = optax.adam(1e-2).update(
      {'big': {'lora_a': g['big']['lora_a'], 'lora_b': g['big']['lora_b']}, 'other': g['other']},
      optax.adam(1e-2).init({'big': {'lora_a': params['big']['lora_a'],
                                     'lora_b': params['big']['lora_b']},
                             'other': params['other']}))
  masks = []
  for moments, ref_moments in ((state.inner_state[0].mu, ref[0].mu),
                               (state.inner_state[0].nu, ref[0].nu)):
    np.testing.assert_allclose(moments['other'], ref_moments['other'], rtol=1e-6)
    for key in ('lora_a', 'lora_b'):
      got = np.asarray(moments['big'][key])
      n = got.size
      zeros = int(np.sum(got == 0))
      assert abs(zeros - ratio * n) < 4 * math.sqrt(n * ratio * (1 - ratio))
      kept = got != 0
      np.testing.assert_allclose(got[kept], np.asarray(ref_moments['big'][key])[kept], rtol=1e-6)
      masks.append(kept)
  np.testing.assert_array_equal(masks[0], masks[2])  # one mask per coordinate: mu and nu alike


def test_reset_pruning():
  inner = optax.adam(1e-2)
  _, state, history, _ = _run(relora(inner, 2, scale=SCALES, prune='reset'), 2)
  ref_state = _inner_alone(inner, history)[-1][1]
  _check_untouched_and_structure(state, ref_state, history)
  for moments in (state.inner_state[0].mu, state.inner_state[0].nu):
    for path in ADAPTER_PATHS:
      np.testing.assert_array_equal(_get(moments, path), 0.0)


def test_prune_leaf_traced_ratio():
  x = jnp.arange(1.0, 11.0) * jnp.array([1, -1] * 5)
  out = jax.jit(lambda r: prune_leaf(x, 'magnitude', r))(0.3)
  np.testing.assert_array_equal(out, np.where(np.abs(np.asarray(x)) > 3, x, 0))
  np.testing.assert_array_equal(prune_leaf(x, 'magnitude', 0.0), x)
  np.testing.assert_array_equal(prune_leaf(x, 'magnitude', 1.0), 0.0)
  with pytest.raises(ValueError):
    prune_leaf(x, 'bogus', 0.5)
  # The paper's 99%: exactly round(0.99 n) zeros, the largest 1% kept.
  y = jnp.asarray(np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32))
  out = np.asarray(prune_leaf(y, 'magnitude', 0.99))
  assert int(np.sum(out == 0)) == round(0.99 * y.size) == 1188
  np.testing.assert_array_equal(np.sort(np.abs(out[out != 0])), np.sort(np.abs(y).ravel())[-12:])


# --------------------------------------------------------------------------- #
# Composition with other Optax wrappers, checkpoints, errors
# --------------------------------------------------------------------------- #


def test_inside_chain_with_clipping():
  tx = optax.chain(optax.clip_by_global_norm(1.0), relora(optax.adam(1e-2), 2, scale=SCALES))
  params, state, history, _ = _run(tx, 3)
  for i, (_, _, updates, _) in enumerate(history):
    merged = i == 1
    assert (float(jnp.abs(updates['l0']['kernel']).max()) > 0) == merged
  np.testing.assert_array_equal(history[1][0]['l0']['lora_b'] + history[1][2]['l0']['lora_b'], 0)
  assert int(state[1].count) == 3


def test_under_multisteps():
  k, merge_every = 2, 2
  tx = optax.MultiSteps(relora(optax.adam(1e-2), merge_every, scale=SCALES), k)
  _, _, history, _ = _run(tx, 2 * k * merge_every)
  kernel_moved = [bool(float(jnp.abs(u['l0']['kernel']).max()) > 0) for _, _, u, _ in history]
  # Real steps on micro-steps 2, 4, 6, 8; merges on real steps 2 and 4.
  assert kernel_moved == [False, False, False, True, False, False, False, True]
  final_state = history[-1][3]
  assert int(final_state.inner_opt_state.count) == 2 * merge_every
  np.testing.assert_array_equal(history[3][0]['l0']['lora_b'] + history[3][2]['l0']['lora_b'], 0)


def test_inject_hyperparams_inner_and_outer():
  # Inner: the moments are found inside InjectHyperparamsState and pruned.
  inner = optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(1e-2, 0, 10))
  _, state, _, _ = _run(relora(inner, 2, scale=SCALES, prune='reset'), 2)
  adam = state.inner_state.inner_state[0]
  np.testing.assert_array_equal(adam.mu['l0']['lora_a'], 0.0)
  assert float(jnp.abs(adam.mu['head']['kernel']).max()) > 0
  assert 'learning_rate' in state.inner_state.hyperparams
  # Outer: numeric arguments become (traced) hyperparameters, changeable at run time.
  tx = optax.inject_hyperparams(relora, static_args=('prune',))(
      optax.adam(1e-2), merge_every=3, scale=1.0, prune='magnitude', prune_ratio=0.5)
  params = _params()
  state = tx.init(params)
  assert set(state.hyperparams) == {'merge_every', 'scale', 'prune_ratio', 'seed'}
  state.hyperparams['merge_every'] = jnp.asarray(2)  # merge after 2 steps instead of 3
  update = jax.jit(tx.update)
  for i in range(2):
    updates, state = update(_grads(params, i), state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(params['l0']['lora_b'], 0.0)
  mu = np.asarray(state.inner_state.inner_state[0].mu['l0']['lora_a'])
  assert int(np.sum(mu == 0)) == mu.size // 2
  assert update._cache_size() == 1


def test_orbax_round_trip(tmp_path):
  _, state, _, _ = _run(relora(optax.adamw(1e-2), 2, scale=SCALES), 3)
  assert all(np.size(x) > 0 for x in jax.tree.leaves(state))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'state', state)
  ckpt.wait_until_finished()
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = ckpt.restore(tmp_path / 'state', target)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def test_errors():
  with pytest.raises(ValueError, match='prune'):
    relora(optax.sgd(0.1), 2, scale=1.0, prune='bogus')
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match='merge_every'):
      relora(optax.sgd(0.1), bad, scale=1.0)
  with pytest.raises(ValueError, match='prune_ratio'):
    relora(optax.sgd(0.1), 2, scale=1.0, prune_ratio=1.5)
  tx = relora(optax.sgd(0.1), 2, scale=1.0)
  with pytest.raises(ValueError, match='no adapted layer'):
    tx.init({'w': jnp.ones((2, 2))})
  params = _params()
  with pytest.raises(ValueError, match='needs params'):
    tx.update(params, tx.init(params))
  bad = _params()
  bad['l0']['lora_b'] = jnp.zeros((4, 6))
  with pytest.raises(ValueError, match='inconsistent shapes'):
    tx.init(bad)


# --------------------------------------------------------------------------- #
# Jagged cosine schedule
# --------------------------------------------------------------------------- #


def _reference_schedule(t, peak, total, warmup, every, ramp, min_ratio):
  if t < warmup:
    return peak * t / warmup
  progress = min(max((t - warmup) / (total - warmup), 0.0), 1.0)
  cosine = peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
  restart = (t // every) * every
  if restart >= every and t - restart < ramp:
    return cosine * (t - restart) / ramp
  return cosine


@pytest.mark.parametrize('warmup,every,ramp', [(10, 25, 5), (30, 25, 10), (0, 40, 0)])
def test_jagged_cosine_schedule(warmup, every, ramp):
  peak, total, min_ratio = 1e-3, 100, 0.1
  sched = jagged_cosine_schedule(peak, total, warmup, every, ramp, min_ratio)
  steps = np.arange(0, 130)
  values = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(steps)))
  expected = [_reference_schedule(int(t), peak, total, warmup, every, ramp, min_ratio)
              for t in steps]
  np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-9)
  if warmup:
    assert float(sched(0)) == 0.0  # warmup from 0
    np.testing.assert_allclose(values[:warmup], peak * steps[:warmup] / warmup, rtol=1e-6)
  for r in range(every, 130, every):
    if r >= warmup and ramp > 0:
      assert values[r] == 0.0  # drop to 0 at each restart, then a rising ramp
      assert np.all(np.diff(values[r:r + ramp + 1]) > 0)
  # Outside the ramps: the global cosine, at its minimum from total_steps on.
  in_ramp = (steps >= every) & (steps % every < ramp)
  np.testing.assert_allclose(values[(steps >= total) & ~in_ramp], peak * min_ratio, rtol=1e-5)
  assert float(jax.jit(sched)(jnp.int32(total - 1))) > peak * min_ratio


def test_jagged_cosine_ramp_is_linear_times_cosine():
  sched = jagged_cosine_schedule(1.0, 1000, 50, 200, 20, 0.0)
  for k in (1, 2, 3):
    for j in range(20):
      t = 200 * k + j
      progress = (t - 50) / 950
      cosine = 0.5 * (1 + math.cos(math.pi * progress))
      assert float(sched(t)) == pytest.approx(cosine * j / 20, rel=1e-5, abs=1e-7)
    assert float(sched(200 * k + 20)) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * (200 * k + 20 - 50) / 950)), rel=1e-5)


def test_jagged_cosine_validation():
  with pytest.raises(ValueError):
    jagged_cosine_schedule(1.0, 100, 100, 10, 2)  # warmup >= total
  with pytest.raises(ValueError):
    jagged_cosine_schedule(1.0, 100, 10, 10, 11)  # ramp longer than a cycle
  with pytest.raises(ValueError):
    jagged_cosine_schedule(1.0, 100, 10, 0, 0)
  with pytest.raises(ValueError):
    jagged_cosine_schedule(1.0, 100, 10, 10, 2, min_ratio=1.5)


# --------------------------------------------------------------------------- #
# End to end: LoRALinear layers in the LLaMA model, the trainer's jitted step
# --------------------------------------------------------------------------- #


def test_llama_with_lora_layers_end_to_end():
  from flax import nnx

  from lowrank_jax.models.linear_factory import LinearFactory, register_linear_kind
  from lowrank_jax.models.llama import Llama, llama_config
  from lowrank_jax.nn.lora import LoRALinear
  from lowrank_jax.train.model import split_model
  from lowrank_jax.train.step import TrainState, make_train_step

  register_linear_kind('test_lora', LoRALinear)
  rank, alpha = 4, 8.0
  factory = LinearFactory({'q': 'test_lora', 'v': 'test_lora', 'up': 'test_lora'},
                          {'test_lora': {'rank': rank, 'alpha': alpha}})
  config = llama_config('tiny', 64, d_model=32, d_ff=64, n_heads=2, n_layers=1, max_seq_len=8)
  model = Llama(config, linear_factory=factory, rngs=nnx.Rngs(0))
  split, params, rest = split_model(model)
  assert sorted(adapted_layer_paths(params)) == [
      'layers/0/attn/q', 'layers/0/attn/v', 'layers/0/mlp/up']
  schedule = optax.constant_schedule(1e-2)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   relora(optax.adam(schedule), 2, scale=alpha / rank))
  state = TrainState(jnp.zeros([], jnp.int32), params, rest, tx.init(params),
                     jax.random.key_data(jax.random.PRNGKey(0)))
  step = jax.jit(make_train_step(split, tx, schedule))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 2, 8), 0, 64)
  q = lambda s: s.params['layers'][0]['attn']['q']
  kernel0 = np.asarray(q(state)['kernel'])
  losses = []
  for i in range(3):
    prev = state
    state, metrics = step(state, tokens)
    losses.append(float(metrics['loss']))
    if i == 0:  # ordinary step: kernel frozen, adapters and the rest train
      np.testing.assert_array_equal(q(state)['kernel'], kernel0)
      assert float(jnp.abs(q(state)['lora_b']).max()) > 0
      assert not np.allclose(state.params['embed']['embedding'], prev.params['embed']['embedding'])
    if i == 1:  # merge step
      assert not np.allclose(q(state)['kernel'], kernel0)
      np.testing.assert_array_equal(q(state)['lora_b'], 0.0)
  assert all(np.isfinite(losses))
  assert losses[-1] < losses[0]
