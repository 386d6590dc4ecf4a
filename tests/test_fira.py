"""Tests of Fira (lowrank_jax.optim.fira) against the paper's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import optim

KEY = jax.random.PRNGKey(1)
PARAMS = {'a': jnp.zeros((8, 12)), 'b': jnp.zeros((12, 8)), 'n': jnp.zeros((12,))}
SELECT = {'a': True, 'b': True, 'n': False}


def _grads(n):
  out = []
  for t in range(n):
    ks = jax.random.split(jax.random.fold_in(KEY, t), 3)
    f = 1.0 + 0.5 * (t % 2)  # growing every other step: the limiter acts
    out.append({k: f * jax.random.normal(kk, x.shape) for kk, (k, x) in zip(ks, PARAMS.items())})
  return out


def _norm(x, axis=None):
  return np.sqrt(np.sum(np.square(x), axis=axis, keepdims=axis is not None))


def fira_reference(grads, projectors, *, scale, scaling, gamma, lr, b1=0.9, b2=0.999, eps=1e-8):
  """Fira (Chen et al. 2024, Algorithm 1) in float64 numpy for one matrix, given P_t."""
  mu = nu = 0.0
  prev = None
  out = []
  for t, (g, pr) in enumerate(zip(grads, projectors), start=1):
    g = np.asarray(g, np.float64)
    side, p = next(iter(pr.items()))
    p = np.asarray(p, np.float64)
    r = p.T @ g if side == 'in' else g @ p
    mu = b1 * mu + (1 - b1) * r
    nu = b2 * nu + (1 - b2) * r**2
    n = (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps)
    back = (lambda x: p @ x) if side == 'in' else (lambda x: x @ p.T)
    if scaling == 'tensor':
      phi = _norm(n) / _norm(r)
    else:
      phi = _norm(n, 0 if side == 'in' else 1) / _norm(r, 0 if side == 'in' else 1)
    s = (g - back(r)) * phi  # the out-of-subspace gradient, norm-scaled
    norm = _norm(s)
    if prev is not None and norm > gamma * prev:
      s = s * gamma * prev / norm
      norm = gamma * prev
    prev = norm
    out.append(-lr * (scale * back(n) + s))
  return out


@pytest.mark.parametrize('scaling', ['channel', 'tensor'])
def test_fira_follows_the_paper_across_refreshes(scaling):
  lr, scale = 0.1, 0.25
  opt = optim.fira(lr, rank=3, update_proj_gap=2, scale=scale, scaling=scaling, projection_mask=SELECT)
  grads = _grads(5)  # SVD refreshes at steps 0, 2, 4
  state = opt.init(PARAMS)
  upd = jax.jit(opt.update)
  updates, projs = [], []
  for g in grads:
    u, state = upd(g, state, PARAMS)
    updates.append(u)
    projs.append(state[0].projector)
  for name in ('a', 'b'):
    ref = fira_reference([g[name] for g in grads], [p[name] for p in projs], scale=scale,
                         scaling=scaling, gamma=1.01, lr=lr)
    for t, (u, e) in enumerate(zip(updates, ref)):
      np.testing.assert_allclose(u[name], e, rtol=2e-4, atol=1e-6, err_msg=f'{name} step {t}')
  # The projector is GaLore's: the SVD of the gradient at refresh steps.
  u_svd = np.linalg.svd(np.asarray(grads[2]['a']))[0][:, :3]
  np.testing.assert_allclose(np.abs(u_svd.T @ np.asarray(projs[2]['a']['in'])), np.eye(3), atol=1e-4)


def test_fira_without_residual_is_galore():
  # A full-rank projector leaves no residual: Fira's update is GaLore's.
  grads = _grads(3)
  kw = dict(rank=8, update_proj_gap=2, scale=0.25, projection_mask=SELECT)
  f, g = optim.fira(0.1, **kw), optim.galore(0.1, **kw)
  sf, sg = f.init(PARAMS), g.init(PARAMS)
  for gr in grads:
    uf, sf = jax.jit(f.update)(gr, sf, PARAMS)
    ug, sg = jax.jit(g.update)(gr, sg, PARAMS)
    for x, y in zip(jax.tree.leaves(uf), jax.tree.leaves(ug)):
      np.testing.assert_allclose(x, y, atol=2e-6)


def test_tiny_mlp_trains():
  from tests.test_galore import train
  losses = train(optim.fira(2e-2, rank=4, update_proj_gap=10))
  assert losses[-1] < 0.5 * losses[0], losses[::10]
