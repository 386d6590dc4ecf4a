"""Tests of APOLLO / APOLLO-Mini (lowrank_jax.optim.apollo) against the paper's equations."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lowrank_jax import optim
from lowrank_jax.optim import subspace

KEY = jax.random.PRNGKey(0)
# A wide and a tall matrix ('std' compresses the 'in' side of the first, the
# 'out' side of the second) and an unprojected vector.
PARAMS = {'a': jnp.zeros((8, 12)), 'b': jnp.zeros((12, 8)), 'n': jnp.zeros((12,))}
SELECT = {'a': True, 'b': True, 'n': False}
SIDES = {'a': 'in', 'b': 'out'}
LEAF_INDEX = {'a': 0, 'b': 1}  # flatten order


def _grads(n, seed=0, scale_by_step=True):
  out = []
  for t in range(n):
    k = jax.random.fold_in(KEY, 1000 * seed + t)
    ks = jax.random.split(k, 3)
    # Growing gradients at some steps so that the norm-growth limiter acts.
    f = (1.0 + 0.5 * (t % 2)) if scale_by_step else 1.0
    out.append({name: f * jax.random.normal(kk, x.shape) for kk, (name, x) in zip(ks, PARAMS.items())})
  return out


def _run(opt, grads, params=PARAMS):
  state = opt.init(params)
  upd = jax.jit(opt.update)
  outs, states = [], [state]
  for g in grads:
    u, state = upd(g, state, params)
    outs.append(u)
    states.append(state)
  return outs, states, upd


def _projector(seed, epoch, name, rank):
  """The paper's projector, drawn here without the library: i.i.d. N(0, 1/r) entries, (d, r) for the
  compressed side's size d. Its standard normals are JAX's, from the documented key
  fold_in(fold_in(PRNGKey(seed), epoch), 2 * leaf index + side index); the 1/sqrt(r) scale is the paper's.
  (test_gaussian_projector_is_n_0_1_over_r checks the library's own draw has that distribution.)"""
  shape = PARAMS[name].shape
  d = shape[0] if SIDES[name] == 'in' else shape[1]
  k = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), epoch), 2 * LEAF_INDEX[name])
  return np.asarray(jax.random.normal(k, (d, rank), jnp.float32), np.float64) / np.sqrt(rank)


def test_gaussian_projector_is_n_0_1_over_r():
  """The draw's defining properties, statistically: entries N(0, 1/r) (mean, variance, Gaussian fourth
  moment), uncorrelated columns, E ||P^T x||^2 = ||x||^2 (Johnson-Lindenstrauss), shape and dtype."""
  d, r = 2048, 16
  p = np.asarray(subspace.gaussian_projector(jax.random.PRNGKey(1), (d, r)), np.float64)
  assert p.shape == (d, r)
  n = p.size
  assert abs(p.mean()) < 4 * np.sqrt(1 / r / n)
  var = p.var()
  assert abs(var * r - 1) < 4 * np.sqrt(2 / n), var * r  # the variance is 1/r, not 1/d or 1
  assert abs(np.mean(p**4) / var**2 - 3) < 0.15  # Gaussian kurtosis
  gram = p.T @ p / d * r  # ~ I for independent N(0, 1/r) columns
  assert np.max(np.abs(gram - np.eye(r))) < 6 / np.sqrt(d)
  x = np.random.default_rng(0).standard_normal(d)
  draws = np.asarray(subspace.gaussian_projector(jax.random.PRNGKey(2), (256, d, r)), np.float64)
  ratios = np.sum(np.square(np.einsum('bdr,d->br', draws, x)), axis=1) / np.sum(x**2)
  assert abs(ratios.mean() - 1) < 4 * np.sqrt(2 / r / 256)  # each ratio ~ chi2(r) / r
  assert not np.allclose(draws[0], draws[1])  # batch entries are independent draws
  assert subspace.gaussian_projector(jax.random.PRNGKey(1), (4, 2), jnp.bfloat16).dtype == jnp.bfloat16


def _norm(x, axis=None):
  return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=axis is not None))


def apollo_reference(grads, name, *, rank, gap, scale, scaling, gamma, lr, seed,
                     b1=0.9, b2=0.999, eps=1e-8):
  """APOLLO (Zhu et al. 2024, Algorithm 1) in float64 numpy for one matrix."""
  side = SIDES[name]
  mu = nu = 0.0
  prev = None
  out = []
  for t, g in enumerate(grads, start=1):
    g = np.asarray(g[name], np.float64)
    p = _projector(seed, (t - 1) // gap, name, rank)
    r = p.T @ g if side == 'in' else g @ p
    mu = b1 * mu + (1 - b1) * r
    nu = b2 * nu + (1 - b2) * r**2
    n = (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
    if scaling == 'tensor':
      s = _norm(n) / _norm(r)
    else:  # per channel: the uncompressed side
      axis = 0 if side == 'in' else 1
      s = _norm(n, axis) / _norm(r, axis)
    gt = g * s
    norm = _norm(gt)
    if prev is not None and norm > gamma * prev:
      gt = gt * gamma * prev / norm
      norm = gamma * prev
    prev = norm
    out.append(-lr * scale * gt)
  return out


@pytest.mark.parametrize('scaling,rank,scale', [('channel', 3, 1.0), ('tensor', 1, 128**0.5)])
def test_apollo_follows_the_paper_across_redraws(scaling, rank, scale):
  lr, gap, seed = 0.1, 2, 3
  opt = optim.apollo(lr, rank=rank, update_proj_gap=gap, scale=scale, scaling=scaling, seed=seed,
                     projection_mask=SELECT)
  grads = _grads(5)  # re-draws at steps 2 and 4
  updates, states, upd = _run(opt, grads)
  assert upd._cache_size() == 1
  for name in ('a', 'b'):
    ref = apollo_reference(grads, name, rank=rank, gap=gap, scale=scale, scaling=scaling,
                           gamma=1.01, lr=lr, seed=seed)
    for t, (u, e) in enumerate(zip(updates, ref)):
      np.testing.assert_allclose(u[name], e, rtol=2e-4, atol=1e-7, err_msg=f'{name} step {t}')
  # The unprojected leaf gets plain Adam.
  adam, _, _ = _run(optax.adam(lr), grads)
  np.testing.assert_allclose(updates[-1]['n'], adam[-1]['n'], rtol=1e-5)
  # The limiter acted (the gradients grow by 1.5x every other step).
  ratios = [float(_norm(np.asarray(updates[t + 1]['a'])) / _norm(np.asarray(updates[t]['a'])))
            for t in range(4)]
  assert max(ratios) <= 1.01 + 1e-4, ratios


def test_apollo_mini_state_is_rank_one_and_no_projector_is_stored():
  st = optim.apollo_mini(1e-2, projection_mask=SELECT).init(PARAMS)[0]
  assert st.lowrank_state.mu['a'].shape == (1, 12) and st.lowrank_state.mu['b'].shape == (12, 1)
  # No projector: placeholders (one scalar per leaf) and a uint32[2] key.
  assert all(x.shape == () for x in jax.tree.leaves(st.projector))
  assert st.projector_state.shape == (2,) and st.projector_state.dtype == jnp.uint32


def _roundtrip(tmp_path, state):
  path = os.path.join(tmp_path, 'opt_state')
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
    ckpt.wait_until_finished()
    return ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, state))


def test_projector_reproducible_from_seed_across_checkpoint(tmp_path):
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optim.apollo(1e-2, rank=3, update_proj_gap=2, seed=7, projection_mask=SELECT))
  grads = _grads(5)
  updates, states, upd = _run(opt, grads)
  restored = _roundtrip(tmp_path, states[3])  # mid-way; step 4 re-draws
  assert all(x.size > 0 for x in jax.tree.leaves(restored))
  state = restored
  for t in (3, 4):
    u, state = upd(grads[t], state, PARAMS)
    for x, y in zip(jax.tree.leaves(u), jax.tree.leaves(updates[t])):
      np.testing.assert_array_equal(x, y)
  # The seed is what makes the projector: another seed gives other updates.
  other, _, _ = _run(optax.chain(optax.clip_by_global_norm(1.0),
                                 optim.apollo(1e-2, rank=3, update_proj_gap=2, seed=8,
                                              projection_mask=SELECT)), grads[:1])
  assert not np.allclose(other[0]['a'], updates[0]['a'])


def test_optax_compositions_under_jit():
  """Under optax's wrappers, with the matrices projected (the default mask projects no leaf named 'a' or
  'b'), each wrapper computes what optax defines: inject_hyperparams the updates of the schedule passed
  directly; MultiSteps(2) zeros, then the inner optimizer's step on the mean of the last two gradients;
  apply_if_finite, all gradients finite, the inner optimizer's updates. One compilation each."""
  grads = _grads(4, scale_by_step=False)
  sched = optax.linear_schedule(1e-2, 1e-3, 10)
  kw = dict(projection_mask=SELECT)
  opts = {
      'inject': optax.inject_hyperparams(optim.apollo, static_args=('rank',))(
          learning_rate=sched, rank=3, update_proj_gap=2, **kw),
      'multisteps': optax.MultiSteps(optim.apollo_mini(1e-2, **kw), every_k_schedule=2),
      'apply_if_finite': optax.apply_if_finite(optim.apollo(1e-2, rank=3, moments='reset', **kw), 3),
  }
  mean2 = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
  expected = {
      'inject': _run(optim.apollo(sched, rank=3, update_proj_gap=2, **kw), grads)[0],
      'multisteps': [u for step in _run(optim.apollo_mini(1e-2, **kw), mean2)[0]
                     for u in (jax.tree.map(jnp.zeros_like, step), step)],
      'apply_if_finite': _run(optim.apollo(1e-2, rank=3, moments='reset', **kw), grads)[0],
  }
  for name, opt in opts.items():
    updates, _, upd = _run(opt, grads)
    assert upd._cache_size() == 1, name
    assert all(bool(jnp.all(jnp.isfinite(x))) for u in updates for x in jax.tree.leaves(u)), name
    assert any(float(jnp.max(jnp.abs(u['a']))) > 0 for u in updates), name
    for t, (u, e) in enumerate(zip(updates, expected[name])):
      for k in PARAMS:
        np.testing.assert_allclose(u[k], e[k], rtol=1e-5, atol=1e-9, err_msg=f'{name} step {t} {k}')
  with pytest.raises(ValueError, match='static'):
    opt = optax.inject_hyperparams(optim.apollo)(learning_rate=1e-2, rank=3)
    jax.jit(opt.update)(grads[0], opt.init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match='one-sided'):
    opt = optim.apollo(1e-2, rank=3, proj_type='full', projection_mask=SELECT)
    opt.update(grads[0], opt.init(PARAMS), PARAMS)


@pytest.mark.parametrize('name', ['apollo', 'apollo_mini'])
def test_tiny_mlp_trains(name):
  from tests.test_galore import train
  opt = optim.apollo(1e-2, rank=4, update_proj_gap=20) if name == 'apollo' else optim.apollo_mini(1e-2)
  losses = train(opt)
  assert losses[-1] < 0.5 * losses[0], losses[::10]
