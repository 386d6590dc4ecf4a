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
  """The documented draw: fold_in(fold_in(key(seed), epoch), 2 * leaf index + side index)."""
  shape = PARAMS[name].shape
  d = shape[0] if SIDES[name] == 'in' else shape[1]
  k = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), epoch), 2 * LEAF_INDEX[name])
  return np.asarray(subspace.gaussian_projector(k, (d, rank)), np.float64)


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
  grads = _grads(4, scale_by_step=False)
  opts = {
      'inject': optax.inject_hyperparams(optim.apollo, static_args=('rank',))(
          learning_rate=optax.linear_schedule(1e-2, 1e-3, 10), rank=3, update_proj_gap=2),
      'multisteps': optax.MultiSteps(optim.apollo_mini(1e-2), every_k_schedule=2),
      'apply_if_finite': optax.apply_if_finite(optim.apollo(1e-2, rank=3, moments='reset'), 3),
  }
  for name, opt in opts.items():
    updates, _, upd = _run(opt, grads)
    assert upd._cache_size() == 1, name
    assert all(bool(jnp.all(jnp.isfinite(x))) for u in updates for x in jax.tree.leaves(u)), name
    assert any(float(jnp.max(jnp.abs(u['a']))) > 0 for u in updates), name
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
