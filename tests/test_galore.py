"""Tests of scale_by_galore / galore."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lowrank_jax import optim
from lowrank_jax.optim import projection as P

KEY = jax.random.PRNGKey(0)


def _normal_like(key, tree):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten(
      [jax.random.normal(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)]
  )


def _run(opt, params, grads_seq, jit=True):
  """Applies opt to a sequence of gradient trees; returns updates and states."""
  state = opt.init(params)
  upd = jax.jit(opt.update) if jit else opt.update
  updates, states = [], [state]
  for g in grads_seq:
    u, state = upd(g, state, params)
    updates.append(u)
    states.append(state)
  return updates, states, upd


def _grads(params, n, seed=0):
  return [_normal_like(jax.random.fold_in(KEY, seed * 1000 + i), params) for i in range(n)]


def _size(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# rho = 1: rank = full size with an identity base follows the full-rank path.


def test_full_rank_identity_base_follows_full_rank_trajectory():
  target = jax.random.normal(KEY, (6, 10))
  loss = lambda p: jnp.sum((p['w'] - target) ** 2) + jnp.sum(p['b'] ** 2)
  params0 = {'w': jnp.zeros((6, 10)), 'b': jnp.ones((6,))}
  mask = {'w': True, 'b': False}

  def trajectory(opt, steps=6):
    p, s = params0, opt.init(params0)
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p))
    out = []
    for _ in range(steps):
      u, s = step(p, s)
      p = optax.apply_updates(p, u)
      out.append(p)
    return out

  ref = trajectory(optax.sgd(0.1))
  # std with rank = min dim: P is square orthogonal, so P P^T = I at any gap.
  gal = trajectory(
      optim.galore(0.1, rank=10, update_proj_gap=4, base_optimizer=optax.identity(), projection_mask=mask)
  )
  for a, b in zip(ref, gal):
    np.testing.assert_allclose(a['w'], b['w'], atol=1e-5)
    np.testing.assert_allclose(a['b'], b['b'], atol=1e-6)
  # Adam is not rotation invariant: GaLore-Adam at full rank is not Adam.
  ref_adam = trajectory(optax.adam(0.1))
  gal_adam = trajectory(optim.galore(0.1, rank=10, update_proj_gap=4, projection_mask=mask))
  diff = float(jnp.max(jnp.abs(ref_adam[-1]['w'] - gal_adam[-1]['w'])))
  assert diff > 1e-2, diff
  # The unprojected leaf still gets plain Adam.
  np.testing.assert_allclose(ref_adam[-1]['b'], gal_adam[-1]['b'], atol=1e-6)


@pytest.mark.parametrize('proj_type', ['reverse_std', 'left', 'right', 'full'])
def test_full_rank_identity_base_refresh_every_step_is_exact(proj_type):
  # Refreshed on the current gradient, a rank-min(m, n) projector spans the
  # gradient's column/row space, so every side reproduces G exactly.
  params = {'w': jnp.zeros((6, 10))}
  grads = _grads(params, 3)
  opt = optim.scale_by_galore(
      rank=6, update_proj_gap=1, proj_type=proj_type, base_optimizer=optax.identity(),
      projection_mask={'w': True},
  )
  updates, _, _ = _run(opt, params, grads)
  for u, g in zip(updates, grads):
    np.testing.assert_allclose(u['w'], g['w'], atol=1e-5)


# ---------------------------------------------------------------------------
# Subspace and layout properties.


@pytest.mark.parametrize('proj_type', ['std', 'reverse_std', 'left', 'right', 'full'])
def test_update_lies_in_projector_subspace(proj_type):
  params = {'a': jnp.zeros((8, 12)), 'b': jnp.zeros((12, 8))}
  opt = optim.scale_by_galore(rank=3, update_proj_gap=2, proj_type=proj_type, projection_mask=lambda p: jax.tree.map(lambda _: True, p))
  updates, states, _ = _run(opt, params, _grads(params, 3))
  for u, s in zip(updates, states[1:]):
    for name in ('a', 'b'):
      pr = s.projector[name]
      x = u[name]
      if 'in' in pr:
        x = x - pr['in'] @ (pr['in'].T @ x)
      if 'out' in pr:
        x = x - (x @ pr['out']) @ pr['out'].T
      if proj_type == 'full':  # P^T U Q = U up to the two projections
        x = u[name] - pr['in'] @ (pr['in'].T @ u[name] @ pr['out']) @ pr['out'].T
      assert float(jnp.max(jnp.abs(x))) < 1e-5 * float(jnp.max(jnp.abs(u[name])))


@pytest.mark.parametrize('proj_type', ['std', 'reverse_std', 'left', 'right', 'full'])
def test_flax_and_torch_layouts_give_transposed_updates(proj_type):
  # The same logical matrices stored (in, out) as in Flax and (out, in) as in
  # PyTorch; includes a square one (tie-break).
  shapes = {'tall': (12, 8), 'wide': (8, 12), 'square': (8, 8)}
  flax = {k: jnp.zeros(s) for k, s in shapes.items()}
  torch = {k: jnp.zeros(s[::-1]) for k, s in shapes.items()}
  g_flax = _grads(flax, 3)
  g_torch = [jax.tree.map(lambda x: x.T, g) for g in g_flax]
  common = dict(rank=3, update_proj_gap=2, proj_type=proj_type)
  u_flax, s_flax, _ = _run(
      optim.scale_by_galore(**common, projection_mask=jax.tree.map(lambda _: True, flax)), flax, g_flax
  )
  u_torch, s_torch, _ = _run(
      optim.scale_by_galore(
          **common, projection_mask=jax.tree.map(lambda _: optim.MatrixAxes(1, 0), torch)
      ),
      torch,
      g_torch,
  )
  for uf, ut in zip(u_flax, u_torch):
    for k in shapes:
      np.testing.assert_allclose(uf[k], ut[k].T, atol=2e-5)
  # Same sides chosen in both layouts.
  for k in shapes:
    assert s_flax[-1].projector[k].keys() == s_torch[-1].projector[k].keys()
  if proj_type == 'std':
    assert list(s_flax[-1].projector['square']) == ['in']


def test_stacked_kernel_matches_separate_kernels():
  stacked = {'k': jnp.zeros((2, 8, 12))}
  separate = {'l0': jnp.zeros((8, 12)), 'l1': jnp.zeros((8, 12))}
  gs = _grads(stacked, 3)
  gsep = [{'l0': g['k'][0], 'l1': g['k'][1]} for g in gs]
  kw = dict(rank=3, update_proj_gap=2)
  u1, s1, _ = _run(optim.scale_by_galore(**kw, projection_mask={'k': optim.MatrixAxes()}), stacked, gs)
  u2, _, _ = _run(optim.scale_by_galore(**kw, projection_mask={'l0': True, 'l1': True}), separate, gsep)
  assert s1[-1].projector['k']['in'].shape == (2, 8, 3)
  for a, b in zip(u1, u2):
    np.testing.assert_allclose(a['k'][0], b['l0'], atol=2e-5)
    np.testing.assert_allclose(a['k'][1], b['l1'], atol=2e-5)


def _np_svd_in(g, rank):
  """The top-`rank` left singular vectors of g, float64 numpy."""
  return np.linalg.svd(np.asarray(g, np.float64))[0][:, :rank]


def galore_reference(mats, rank, base, refresh_every):
  """GaLore (Zhao et al. 2024, Algorithm 1) for one matrix compressed on its rows: P = the top-`rank` left
  singular vectors of G_t at t = 0, refresh_every, ... (numpy SVD, float64); update_t = P base(P^T G_t),
  `base` an Optax transform run by Optax on the low-rank gradients. Any sign of P's columns gives the
  same updates (for sign-equivariant bases: Adam, Lion, factored RMS)."""
  state, out = None, []
  for t, g in enumerate(mats):
    g = np.asarray(g, np.float64)
    if t % refresh_every == 0:
      p = _np_svd_in(g, rank)
    low = jnp.asarray(p.T @ g, jnp.float32)
    state = base.init(low) if state is None else state
    n, state = base.update(low, state, low)  # params: factored RMS reads their shapes
    out.append(p @ np.asarray(n, np.float64))
  return out


def test_head_axes_kernel():
  # (embed, heads, head_dim) attention kernel viewed as (embed, heads*head_dim): GaLore on that matrix.
  params = {'q': jnp.zeros((8, 2, 6))}
  opt = optim.scale_by_galore(rank=3, update_proj_gap=2, projection_mask={'q': optim.MatrixAxes(0, (1, 2))})
  grads = _grads(params, 3)  # a refresh at steps 0 and 2
  updates, states, _ = _run(opt, params, grads)
  mats = [np.asarray(g['q']).reshape(8, 12) for g in grads]
  ref = galore_reference(mats, 3, optax.scale_by_adam(), refresh_every=2)
  for t, (u, e) in enumerate(zip(updates, ref)):
    assert u['q'].shape == (8, 2, 6)
    np.testing.assert_allclose(np.asarray(u['q']).reshape(8, 12), e, rtol=1e-4, atol=1e-6, err_msg=f'step {t}')
  p = np.asarray(states[-1].projector['q']['in'], np.float64)
  assert p.shape == (8, 3)
  np.testing.assert_allclose(np.abs(p.T @ _np_svd_in(mats[2], 3)), np.eye(3), atol=1e-5)  # up to signs


# ---------------------------------------------------------------------------
# State.


@pytest.mark.parametrize(
    'proj_type,proj_size,moment_size',
    [
        # leaf (in, out) = (8, 12) and (12, 8), rank 3; sizes summed over both.
        ('std', 8 * 3 * 2, 2 * 3 * 12 * 2),  # compress min: r x max moments
        ('reverse_std', 12 * 3 * 2, 2 * 3 * 8 * 2),  # compress max: r x min
        ('right', 8 * 3 + 12 * 3, 2 * (3 * 12 + 3 * 8)),  # compress in
        ('left', 12 * 3 + 8 * 3, 2 * (8 * 3 + 12 * 3)),  # compress out
        ('full', 2 * (8 * 3 + 12 * 3), 2 * 3 * 3 * 2),  # r x r
    ],
)
def test_state_sizes(proj_type, proj_size, moment_size):
  params = {
      'a': {'kernel': jnp.zeros((8, 12))},
      'b': {'kernel': jnp.zeros((12, 8))},
      'n': {'scale': jnp.zeros((12,))},
  }
  opt = optim.scale_by_galore(rank=3, proj_type=proj_type)
  st = opt.init(params)
  projected = [st.projector['a']['kernel'], st.projector['b']['kernel']]
  assert _size(projected) == proj_size
  low = st.lowrank_state
  assert _size([low.mu['a'], low.mu['b'], low.nu['a'], low.nu['b']]) == moment_size
  # Everything else is one scalar per leaf and instance, plus counts.
  n_placeholders = 1 + 2 + 2 * 2  # projector + low-rank mu/nu + dense mu/nu
  dense = 2 * 12
  assert _size(st) == 1 + proj_size + moment_size + dense + n_placeholders + 2
  assert all(x.size > 0 for x in jax.tree.leaves(st))


def test_default_mask_and_rank_rule():
  params = {
      'layers': {'0': {'attn': {'q': {'kernel': jnp.zeros((16, 16))}},
                       'mlp': {'up': {'kernel': jnp.zeros((16, 4))}}}},
      'embed': {'embedding': jnp.zeros((50, 16))},
      'head': {'kernel': jnp.zeros((16, 50))},
  }
  st = optim.scale_by_galore(rank=8).init(params)
  assert isinstance(st.projector['layers']['0']['attn']['q']['kernel'], dict)
  assert st.projector['layers']['0']['mlp']['up']['kernel'].shape == ()  # 4 < rank
  assert st.projector['head']['kernel'].shape == ()
  assert st.projector['embed']['embedding'].shape == ()


def test_projector_orthonormal_and_refresh_period():
  params = {'a': jnp.zeros((10, 16)), 'b': jnp.zeros((16, 10))}
  gap = 3
  for refresh in ('svd', 'randomized'):
    opt = optim.scale_by_galore(
        rank=4, update_proj_gap=gap, refresh=refresh, projection_mask={'a': True, 'b': True}
    )
    _, states, upd = _run(opt, params, _grads(params, 2 * gap + 2))
    assert upd._cache_size() == 1  # no recompilation across refreshes
    for t in range(len(states) - 1):
      before, after = states[t].projector, states[t + 1].projector
      changed = any(
          not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after))
      )
      assert changed == (t % gap == 0), (refresh, t)
      if t % gap == 0:
        for p in jax.tree.leaves(after):
          assert float(P.orthonormality_error(p)) < 1e-5


def test_randomized_refresh_close_to_svd_on_low_rank_gradients():
  # Gradients of exact rank 4: both refreshes find the same subspace.
  a = jax.random.normal(KEY, (20, 4))
  params = {'w': jnp.zeros((20, 30))}
  grads = [{'w': a @ jax.random.normal(jax.random.fold_in(KEY, i), (4, 30))} for i in range(2)]
  kw = dict(rank=4, update_proj_gap=1, projection_mask={'w': True})
  _, s1, _ = _run(optim.scale_by_galore(**kw), params, grads)
  _, s2, _ = _run(optim.scale_by_galore(**kw, refresh=optim.RandomizedRefresh(oversample=2, n_iter=1)), params, grads)
  for st in (s1[-1], s2[-1]):
    assert float(jnp.max(P.principal_angles(st.projector['w']['in'], a))) < 1e-2


# ---------------------------------------------------------------------------
# Moments at a refresh.


@pytest.mark.parametrize('moments', ['keep', 'reset', 'rotate'])
@pytest.mark.parametrize('proj_type', ['std', 'left', 'full'])
def test_moments_at_refresh(moments, proj_type):
  b1, b2 = 0.9, 0.99
  params = {'w': jnp.zeros((8, 12)), 'n': jnp.zeros((12,))}
  gap = 2
  opt = optim.scale_by_galore(
      rank=3, update_proj_gap=gap, proj_type=proj_type, moments=moments,
      base_optimizer=optax.scale_by_adam(b1=b1, b2=b2), projection_mask={'w': True, 'n': False},
  )
  grads = _grads(params, gap + 1)
  _, states, _ = _run(opt, params, grads)
  old, new = states[gap], states[gap + 1]  # step `gap` refreshes
  po, pn = old.projector['w'], new.projector['w']
  assert not np.allclose(po[next(iter(po))], pn[next(iter(pn))])
  rg = P.project(grads[gap]['w'], pn)
  mu_o, nu_o = old.lowrank_state.mu['w'], old.lowrank_state.nu['w']
  if moments == 'keep':
    mu_e, nu_e, cnt = mu_o, nu_o, gap + 1
  elif moments == 'reset':
    mu_e, nu_e, cnt = 0 * mu_o, 0 * nu_o, 1
  else:
    mu_e, nu_e, cnt = mu_o, nu_o, gap + 1
    if 'in' in pn:
      r = pn['in'].T @ po['in']
      mu_e, nu_e = r @ mu_e, (r * r) @ nu_e
    if 'out' in pn:
      r = pn['out'].T @ po['out']
      mu_e, nu_e = mu_e @ r.T, nu_e @ (r * r).T
  np.testing.assert_allclose(new.lowrank_state.mu['w'], b1 * mu_e + (1 - b1) * rg, atol=1e-5)
  np.testing.assert_allclose(new.lowrank_state.nu['w'], b2 * nu_e + (1 - b2) * rg**2, atol=1e-5)
  assert int(new.lowrank_state.count) == cnt
  # The dense instance is never touched.
  assert int(new.dense_state.count) == gap + 1


def test_rotate_preserves_full_space_momentum_when_subspace_is_unchanged():
  # All gradients share the column space span(a): every refresh finds the same
  # subspace in a different basis; rotating keeps P m (the full-space
  # momentum) while 'keep' scrambles it.
  a = jax.random.normal(KEY, (10, 3))
  params = {'w': jnp.zeros((10, 16))}
  grads = [{'w': a @ jax.random.normal(jax.random.fold_in(KEY, i), (3, 16))} for i in range(3)]
  res = {}
  for moments in ('keep', 'rotate'):
    opt = optim.scale_by_galore(
        rank=3, update_proj_gap=2, moments=moments, base_optimizer=optax.trace(decay=0.9),
        projection_mask={'w': True},
    )
    _, states, _ = _run(opt, params, grads)
    p = states[3].projector['w']['in']
    full_mom = p @ states[3].lowrank_state.trace['w']
    # Expected: plain momentum on the full gradients (they lie in span(a)).
    expected = 0.9 * (0.9 * grads[0]['w'] + grads[1]['w']) + grads[2]['w']
    res[moments] = float(jnp.max(jnp.abs(full_mom - expected)))
  assert res['rotate'] < 1e-4, res
  assert res['keep'] > 1e-2, res


# ---------------------------------------------------------------------------
# Checkpointing and composition.


def _roundtrip(tmp_path, state):
  path = os.path.join(tmp_path, 'opt_state')
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
    ckpt.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return ckpt.restore(path, target)


def test_orbax_roundtrip(tmp_path):
  params = {
      'layers': {'0': {'mlp': {'up': {'kernel': jnp.zeros((8, 16))}},
                       'attn_norm': {'scale': jnp.ones((8,))}}},
      'head': {'kernel': jnp.zeros((8, 20))},
  }
  opt = optax.chain(
      optax.clip_by_global_norm(1.0),
      optim.galore(1e-2, rank=4, update_proj_gap=2, proj_type='full', moments='rotate',
                   weight_decay=0.1),
  )
  grads = _grads(params, 3)
  _, states, upd = _run(opt, params, grads[:2])
  state = states[-1]
  assert all(x.size > 0 for x in jax.tree.leaves(state))
  restored = _roundtrip(tmp_path, state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(x, y)
  u1, _ = upd(grads[2], state, params)
  u2, _ = upd(grads[2], restored, params)
  for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(x, y)


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_optax_compositions_under_jit():
  params = {'w': {'kernel': jnp.zeros((8, 12))}, 'b': {'bias': jnp.zeros((12,))}}
  grads = _grads(params, 4)
  sched = optax.linear_schedule(1e-2, 1e-3, 10)
  opts = {
      'chain_clip': optax.chain(
          optax.clip_by_global_norm(1.0),
          optim.galore(sched, rank=4, update_proj_gap=2, weight_decay=0.01),
      ),
      'inject': optax.inject_hyperparams(optim.galore)(
          learning_rate=sched, rank=4, update_proj_gap=2, scale=0.25
      ),
      'multisteps': optax.MultiSteps(
          optim.galore(1e-2, rank=4, update_proj_gap=2), every_k_schedule=2
      ),
      'apply_if_finite': optax.apply_if_finite(
          optim.galore(1e-2, rank=4, update_proj_gap=2, refresh='randomized'), 3
      ),
  }
  for name, opt in opts.items():
    updates, states, upd = _run(opt, params, grads)
    assert upd._cache_size() == 1, name
    assert all(_finite(u) for u in updates), name
    assert any(float(jnp.max(jnp.abs(u['w']['kernel']))) > 0 for u in updates), name
  # Injected hyperparameters can be changed between steps without recompiling.
  opt = opts['inject']
  state = opt.init(params)
  upd = jax.jit(opt.update)
  u0, state = upd(grads[0], state, params)
  state.hyperparams['scale'] = jnp.zeros_like(state.hyperparams['scale'])
  u1, state = upd(grads[1], state, params)
  assert float(jnp.max(jnp.abs(u1['w']['kernel']))) == 0.0
  assert upd._cache_size() == 1
  # apply_if_finite skips a NaN gradient and leaves the inner state alone.
  opt = opts['apply_if_finite']
  state = opt.init(params)
  upd = jax.jit(opt.update)
  _, state = upd(grads[0], state, params)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads[1])
  u, state2 = upd(bad, state, params)
  assert _finite(u) and float(jnp.max(jnp.abs(u['w']['kernel']))) == 0.0
  assert int(state2.inner_state[0].count) == int(state.inner_state[0].count)
  # A jitted init needs a static rank.
  opt = optax.inject_hyperparams(optim.galore, static_args=('rank',))(
      learning_rate=1e-2, rank=4
  )
  state = jax.jit(opt.init)(params)
  assert state.inner_state[0].projector['w']['kernel']['in'].shape == (8, 4)
  with pytest.raises(ValueError, match='static'):
    jax.jit(optax.inject_hyperparams(optim.galore)(learning_rate=1e-2, rank=4).init)(params)


def test_weight_decay_in_full_space():
  params = {'w': jnp.ones((8, 12)), 'n': jnp.ones((12,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  opt = optim.galore(0.1, rank=2, weight_decay=0.5, weight_decay_mask={'w': True, 'n': False},
                     projection_mask={'w': True, 'n': False})
  u, _ = jax.jit(opt.update)(zeros, opt.init(params), params)
  np.testing.assert_allclose(u['w'], -0.05 * params['w'], atol=1e-7)
  np.testing.assert_allclose(u['n'], 0.0)


def test_projector_dtype_and_other_bases():
  params = {'w': jnp.zeros((8, 12), jnp.bfloat16)}
  grads = [jax.tree.map(lambda g: g.astype(jnp.bfloat16), g) for g in _grads(params, 2)]
  opt = optim.scale_by_galore(rank=4, projector_dtype='bfloat16', projection_mask={'w': True},
                              base_optimizer=optax.scale_by_lion())
  updates, states, _ = _run(opt, params, grads)
  p = states[-1].projector['w']['in']
  assert p.dtype == jnp.bfloat16
  assert updates[-1]['w'].dtype == jnp.bfloat16
  # The projector is the first gradient's top-4 left singular vectors, rounded to bfloat16.
  p = np.asarray(p, np.float64)
  bf16_eps = float(jnp.finfo(jnp.bfloat16).eps)
  np.testing.assert_allclose(np.abs(p.T @ _np_svd_in(grads[0]['w'], 4)), np.eye(4), atol=4 * bf16_eps)
  # Lion (Chen et al. 2023, optax's defaults b1 = 0.9, b2 = 0.99) in the subspace, in numpy: P sign(c),
  # c = b1 m + (1 - b1) R, then m = b2 m + (1 - b2) R. With P and R = P^T G in bfloat16, an entry of c
  # near 0 may take either sign: the library's low-rank update S (u = P S) must be +-1 everywhere and
  # sign(c) wherever c is clear of 0.
  m = np.zeros((4, 12))
  for t, (g, u) in enumerate(zip(grads, updates)):
    low = p.T @ np.asarray(g['w'], np.float64)
    c = 0.9 * m + 0.1 * low
    m = 0.99 * m + 0.01 * low
    u = np.asarray(u['w'], np.float64)
    s = np.linalg.lstsq(p, u, rcond=None)[0]
    np.testing.assert_allclose(p @ s, u, atol=2 * bf16_eps, err_msg=f'step {t}: the update is not in span(P)')
    np.testing.assert_allclose(np.abs(s), 1.0, atol=0.05, err_msg=f'step {t}')
    clear = np.abs(c) > 0.05 * np.abs(c).max()
    assert clear.mean() > 0.8
    np.testing.assert_array_equal(np.sign(s)[clear], np.sign(c)[clear], err_msg=f'step {t}')
  # Another base, in float32: factored second moments, whose row and column statistics moments='rotate'
  # keeps as they are at a refresh (step 2), as the reference does.
  base = lambda: optax.scale_by_factored_rms(min_dim_size_to_factor=2)  # noqa: E731
  opt = optim.scale_by_galore(rank=4, update_proj_gap=2, projection_mask={'w': True}, base_optimizer=base(),
                              moments='rotate')
  grads = _grads({'w': jnp.zeros((8, 12))}, 3)
  updates, _, _ = _run(opt, {'w': jnp.zeros((8, 12))}, grads)
  ref = galore_reference([g['w'] for g in grads], 4, base(), refresh_every=2)
  for t, (u, e) in enumerate(zip(updates, ref)):
    np.testing.assert_allclose(u['w'], e, rtol=1e-4, atol=1e-6, err_msg=f'step {t}')


# ---------------------------------------------------------------------------
# Training a tiny MLP.


def _mlp_problem():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(42), 3)
  params = {
      'layers': {
          '0': {'mlp': {'up': {'kernel': 0.3 * jax.random.normal(k1, (16, 32))},
                        'down': {'kernel': 0.3 * jax.random.normal(k2, (32, 16))}},
                'mlp_norm': {'scale': jnp.ones((16,))}},
      },
      'head': {'kernel': 0.3 * jax.random.normal(k3, (16, 4))},
  }
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
  y = jnp.sin(x[:, :4] * 2.0) + x[:, 4:8]

  def loss(p):
    h = x * p['layers']['0']['mlp_norm']['scale']
    h = h + jax.nn.gelu(h @ p['layers']['0']['mlp']['up']['kernel']) @ p['layers']['0']['mlp']['down']['kernel']
    return jnp.mean((h @ p['head']['kernel'] - y) ** 2)

  return params, loss


def train(opt, steps=60):
  params, loss = _mlp_problem()
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  losses = []
  for _ in range(steps):
    params, state, l = step(params, state)
    losses.append(float(l))
  return losses


@pytest.mark.parametrize('refresh', ['svd', 'randomized'])
def test_tiny_mlp_trains(refresh):
  losses = train(optim.galore(2e-2, rank=4, update_proj_gap=10, refresh=refresh))
  assert losses[-1] < 0.5 * losses[0], losses[::10]


# ---------------------------------------------------------------------------
# Split refresh: the refresh as its own program.


def _decompositions(fn, *args):
  text = str(jax.make_jaxpr(fn)(*args))
  return [p for p in ('svd', 'qr', 'eigh', 'householder_product', 'geqrf') if p + '[' in text]


@pytest.mark.parametrize('method', ['galore_rotate', 'osd', 'fira_randomized'])
def test_split_refresh_gives_the_same_parameters(method):
  params = {'w': {'kernel': 0.1 * jnp.ones((8, 12))}, 'v': {'kernel': jnp.zeros((12, 8))},
            'n': {'scale': jnp.ones((12,))}}
  make = {
      'galore_rotate': lambda split: optim.galore(0.1, rank=3, update_proj_gap=2, moments='rotate',
                                                  split_refresh=split),
      'osd': lambda split: optim.osd(0.1, rank=3, projector_lr_ratio=0.5, split_refresh=split),
      'fira_randomized': lambda split: optim.fira(0.1, rank=3, update_proj_gap=2, refresh='randomized',
                                                  split_refresh=split),
  }[method]
  one = optax.chain(optax.clip_by_global_norm(1.0), make(False))
  split = optax.chain(optax.clip_by_global_norm(1.0), make(True))
  grads = _grads(params, 5)
  p1, s1 = params, one.init(params)
  p2, s2 = params, split.init(params)
  step1 = jax.jit(one.update)
  step2 = jax.jit(split.update)
  refresh = jax.jit(lambda g, s, p: optim.refresh_projectors(split, g, s, p))
  assert not _decompositions(step2, grads[0], s2, p2)
  due_steps = []
  for t, g in enumerate(grads):
    u1, s1 = step1(g, s1, p1)
    p1 = optax.apply_updates(p1, u1)
    if bool(optim.refresh_due(s2)):
      due_steps.append(t)
      s2 = refresh(g, s2, p2)
    u2, s2 = step2(g, s2, p2)
    p2 = optax.apply_updates(p2, u2)
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f'step {t}')
  assert due_steps == ([0] if method == 'osd' else [0, 2, 4])
  assert step2._cache_size() == 1 and refresh._cache_size() == 1
