"""Tests of scale_by_osd / osd (Online Subspace Descent)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import scipy.linalg

from lowrank_jax import optim

KEY = jax.random.PRNGKey(0)


def _normal_like(key, tree):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _grads(params, n, seed=0):
  return [_normal_like(jax.random.fold_in(KEY, seed * 1000 + i), params) for i in range(n)]


def _max_angle(a, b):
  return float(np.max(scipy.linalg.subspace_angles(np.asarray(a, np.float64), np.asarray(b, np.float64))))


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def test_projector_converges_to_top_subspace_of_gradient_stream():
  # G_t = A Z_t + noise with a fixed rank-4 A: the top-4 left subspace of the
  # stream is span(A). The first gradient's SVD is far from it (strong
  # noise, few columns); the online-PCA steps average over the stream.
  d, k, r = 24, 6, 4
  a = jnp.linalg.qr(jax.random.normal(KEY, (d, r)))[0] * jnp.array([3.0, 2.5, 2.0, 1.5])
  params = {'w': jnp.zeros((d, k))}
  opt = optim.scale_by_osd(rank=r, proj_type='right', projection_mask={'w': True},
                           projector_lr=optax.cosine_decay_schedule(0.02, 400))
  state = opt.init(params)

  @jax.jit
  def run(state, key):
    def body(state, key):
      k1, k2 = jax.random.split(key)
      g = a @ jax.random.normal(k1, (r, k)) + 1.2 * jax.random.normal(k2, (d, k))
      _, state = opt.update({'w': g}, state)
      return state, None

    state, _ = jax.lax.scan(body, state, jax.random.split(key, 400))
    return state

  g0 = a @ jax.random.normal(KEY, (r, k)) + 1.2 * jax.random.normal(jax.random.PRNGKey(5), (d, k))
  state1 = jax.jit(opt.update)({'w': g0}, state)[1]
  first = _max_angle(state1.projector['w']['in'], a)
  state = run(state1, jax.random.PRNGKey(1))
  last = _max_angle(state.projector['w']['in'], a)
  assert first > 1.0, first  # the first-step SVD is off...
  assert last < 0.2, (first, last)  # ...the online PCA finds span(A)
  assert last < 0.5 * first


def _np_adam(state, g, b1=0.9, b2=0.999, eps=1e-8):
  """One step of Adam's direction (Kingma & Ba) in numpy: (m_hat / (sqrt(v_hat) + eps), new state)."""
  m, v, t = state
  t += 1
  m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
  return (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps), (m, v, t)


def _np_pca_grad(p, a, lam):
  """d/dP of the online-PCA loss ||A~ - P P^T A~||_F^2 + lam ||P^T P - I||_F^2, A~ = A / ||A||_F
  (Liang et al. 2024, eq. of the projector update; the normalisation is the official code's), derived by
  hand: with R = A~ - P P^T A~ and B = P^T A~, -2 (R B^T + A~ R^T P) + 4 lam P (P^T P - I)."""
  a = a / np.linalg.norm(a)
  b = p.T @ a
  resid = a - p @ b
  return -2 * (resid @ b.T + a @ resid.T @ p) + 4 * lam * p @ (p.T @ p - np.eye(p.shape[1]))


def osd_reference(grads, side, rank, *, scale, projector_lr, lam, align):
  """Online Subspace Descent for one matrix in float64 numpy: the projector after each step, and the updates.

  A_t = G_t ('in': the rows are compressed) or G_t^T ('out'). P_0 = the top-`rank` left singular vectors of
  A_0 (their signs taken from `align`, the library's P_0: any sign is a solution). At every step t:
  update_t = scale * P_t Adam(P_t^T A_t) (transposed back for 'out', Adam's moments kept across steps),
  then from t = 1 on P_{t+1} = P_t - projector_lr(t) * Adam_P(dL/dP (P_t; A_t)) (no step at t = 0, as the
  official code); Adam_P counts its own steps from 1.
  """
  mats = [np.asarray(g, np.float64) if side == 'in' else np.asarray(g, np.float64).T for g in grads]
  p = np.linalg.svd(mats[0])[0][:, :rank]
  p = p * np.sign(np.sum(p * align, axis=0))
  low_state = (0.0, 0.0, 0)
  p_state = (0.0, 0.0, 0)
  projectors, updates = [], []
  for t, a in enumerate(mats):
    n, low_state = _np_adam(low_state, p.T @ a)
    u = scale * p @ n
    updates.append(u if side == 'in' else u.T)
    if t > 0:
      direction, p_state = _np_adam(p_state, _np_pca_grad(p, a, lam))
      p = p - projector_lr(t) * direction
    projectors.append(p)
  return projectors, updates


def test_projector_and_updates_follow_the_online_pca_equations():
  """Five steps of OSD (Adam in the subspace, Adam on P, the orthogonality penalty, a projector learning
  rate that changes every step) on a wide and a tall matrix, against osd_reference."""
  params = {'a': jnp.zeros((8, 12)), 'b': jnp.zeros((12, 8))}  # 'std': the 8 rows of a, the 8 columns of b
  sides = {'a': 'in', 'b': 'out'}
  projector_lr = lambda count: 0.05 - 0.008 * count  # noqa: E731
  scale, lam, rank = 0.5, 0.3, 3
  opt = optim.scale_by_osd(rank=rank, scale=scale, projector_lr=projector_lr, orthogonality=lam,
                           projection_mask={'a': True, 'b': True})
  grads = _grads(params, 5)
  state = opt.init(params)
  upd = jax.jit(opt.update)
  got_p, got_u = {k: [] for k in params}, {k: [] for k in params}  # the projector after each step
  for g in grads:
    u, state = upd(g, state)
    for k in params:
      got_u[k].append(np.asarray(u[k]))
      got_p[k].append(np.asarray(state.projector[k][sides[k]]))
  for k in params:
    ref_p, ref_u = osd_reference([g[k] for g in grads], sides[k], rank, scale=scale, projector_lr=projector_lr,
                                 lam=lam, align=got_p[k][0])
    for t in range(len(grads)):
      np.testing.assert_allclose(got_p[k][t], ref_p[t], rtol=1e-4, atol=1e-5, err_msg=f'{k} P after step {t}')
      np.testing.assert_allclose(got_u[k][t], ref_u[t], rtol=1e-4, atol=1e-5, err_msg=f'{k} update {t}')
    # The projector moved (by about projector_lr per entry and step), and away from orthonormality.
    assert np.max(np.abs(ref_p[-1] - ref_p[0])) > 0.05
    assert np.max(np.abs(ref_p[-1].T @ ref_p[-1] - np.eye(rank))) > 1e-3


def _primitives(jaxpr, inside_cond=False, out=None):
  """(primitive name, inside a cond branch) for every equation, recursively."""
  out = [] if out is None else out
  for eqn in jaxpr.eqns:
    out.append((eqn.primitive.name, inside_cond))
    is_cond = eqn.primitive.name == 'cond'
    for v in eqn.params.values():
      subs = v if isinstance(v, (tuple, list)) else [v]
      for sj in subs:
        if isinstance(sj, jax.extend.core.ClosedJaxpr):
          _primitives(sj.jaxpr, inside_cond or is_cond, out)
        elif isinstance(sj, jax.extend.core.Jaxpr):
          _primitives(sj, inside_cond or is_cond, out)
  return out


def test_no_svd_after_first_step():
  params = {'a': {'kernel': jnp.zeros((8, 12))}, 'b': {'kernel': jnp.zeros((12, 8))}}
  opt = optim.osd(1e-2, rank=3, proj_type='full', orthogonality=0.1)
  state = opt.init(params)
  g = _grads(params, 1)[0]
  prims = _primitives(jax.make_jaxpr(opt.update)(g, state, params).jaxpr)
  decomps = [(n, c) for n, c in prims if n in ('svd', 'eigh', 'qr', 'householder_product', 'geqrf')]
  assert any(n == 'svd' for n, _ in decomps)
  assert all(c for _, c in decomps), decomps  # only inside the step-0 branch
  # And at run time: step 1 onwards leaves the SVD branch untaken. Compare
  # GaLore (SVD every step) with OSD at projector_lr = 0: the projector must
  # stay the step-0 SVD projector.
  opt0 = optim.scale_by_osd(rank=3, projector_lr=0.0)
  gal = optim.scale_by_galore(rank=3, update_proj_gap=1000)
  s0, s1 = opt0.init(params), gal.init(params)
  for g in _grads(params, 3):
    u0, s0 = jax.jit(opt0.update)(g, s0)
    u1, s1 = jax.jit(gal.update)(g, s1)
    for x, y in zip(jax.tree.leaves(u0), jax.tree.leaves(u1)):
      np.testing.assert_allclose(x, y, atol=1e-5)


def test_projector_moves_every_step_after_the_first():
  params = {'w': jnp.zeros((10, 16))}
  opt = optim.scale_by_osd(rank=3, projector_lr=1e-2, projection_mask={'w': True})
  state = opt.init(params)
  upd = jax.jit(opt.update)
  for t, g in enumerate(_grads(params, 4)):
    state_new = upd(g, state)[1]
    p_old, p_new = np.asarray(state.projector['w']['in']), np.asarray(state_new.projector['w']['in'])
    if t == 0:
      # Exact SVD projector of the first gradient, orthonormal.
      u = np.linalg.svd(np.asarray(g['w']))[0][:, :3]
      assert _max_angle(p_new, u) < 1e-3
      np.testing.assert_allclose(p_new.T @ p_new, np.eye(3), atol=1e-5)
      assert int(state_new.projector_state.count) == 0  # no projector step at 0
    else:
      assert not np.allclose(p_old, p_new)
    state = state_new
  assert upd._cache_size() == 1


def test_orthogonality_penalty_keeps_projector_near_stiefel():
  params = {'w': jnp.zeros((12, 20))}
  grads = _grads(params, 30)
  errs = {}
  for lam in (0.0, 1.0):
    opt = optim.scale_by_osd(rank=4, projector_lr=3e-2, orthogonality=lam, projection_mask={'w': True},
                             projector_optimizer=optax.identity())
    state = opt.init(params)
    upd = jax.jit(opt.update)
    for g in grads:
      _, state = upd(g, state)
    p = np.asarray(state.projector['w']['in'])
    errs[lam] = float(np.max(np.abs(p.T @ p - np.eye(4))))
  assert errs[1.0] < errs[0.0], errs


def test_projector_lr_follows_weight_schedule():
  sched = optax.linear_schedule(1.0, 0.0, 4)  # 1, .75, .5, .25, 0
  params = {'w': jnp.zeros((8, 12))}
  grads = _grads(params, 5)

  def deltas(opt, inner=lambda s: s[0]):
    """P_{t+1} - P_t at every step t >= 1."""
    state = opt.init(params)
    upd = jax.jit(opt.update)
    out = []
    for t, g in enumerate(grads):
      new = upd(g, state, params)[1]
      if t > 0:
        out.append(np.asarray(inner(new).projector['w']['in'] - inner(state).projector['w']['in']))
      state = new
    return out

  # Identity projector optimizer: P_{t+1} - P_t = -alpha * lr(t) * grad_P.
  kw = dict(rank=3, projection_mask={'w': True}, projector_optimizer=optax.identity())
  by_ratio = deltas(optim.osd(sched, projector_lr_ratio=0.1, **kw))
  by_schedule = deltas(optim.osd(sched, projector_lr=lambda c: 0.1 * sched(c), **kw))
  for x, y in zip(by_ratio, by_schedule):
    np.testing.assert_allclose(x, y, atol=1e-6)
  norms = [np.linalg.norm(x) for x in by_ratio]
  assert norms[-1] == 0.0  # lr(4) = 0
  assert min(norms[:-1]) > 0
  # Under inject_hyperparams the injected learning rate drives the projector.
  inj = optax.inject_hyperparams(optim.osd)(learning_rate=sched, projector_lr_ratio=0.1, **kw)
  for x, y in zip(deltas(inj, inner=lambda s: s.inner_state[0]), by_ratio):
    np.testing.assert_allclose(x, y, atol=1e-6)


def _roundtrip(tmp_path, state):
  path = os.path.join(tmp_path, 'opt_state')
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, state)
    ckpt.wait_until_finished()
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    return ckpt.restore(path, target)


def test_orbax_roundtrip(tmp_path):
  params = {
      'layers': {'0': {'attn': {'q': {'kernel': jnp.zeros((8, 8))}},
                       'attn_norm': {'scale': jnp.ones((8,))}}},
      'embed': {'embedding': jnp.zeros((20, 8))},
  }
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optim.osd(optax.cosine_decay_schedule(1e-2, 10), rank=4,
                              projector_lr_ratio=0.5, orthogonality=0.1))
  grads = _grads(params, 3)
  state = opt.init(params)
  upd = jax.jit(opt.update)
  for g in grads[:2]:
    _, state = upd(g, state, params)
  assert all(x.size > 0 for x in jax.tree.leaves(state))
  restored = _roundtrip(tmp_path, state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  u1, _ = upd(grads[2], state, params)
  u2, _ = upd(grads[2], restored, params)
  for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(x, y)


def test_optax_compositions_under_jit():
  params = {'w': {'kernel': jnp.zeros((8, 12))}, 'b': {'bias': jnp.zeros((12,))}}
  grads = _grads(params, 4)
  sched = optax.linear_schedule(1e-2, 1e-3, 10)
  opts = {
      'chain_clip': optax.chain(optax.clip_by_global_norm(1.0),
                                optim.osd(sched, rank=4, weight_decay=0.01)),
      'inject': optax.inject_hyperparams(optim.osd)(learning_rate=sched, rank=4,
                                                    projector_lr_ratio=0.5),
      'multisteps': optax.MultiSteps(optim.osd(1e-2, rank=4), every_k_schedule=2),
      'apply_if_finite': optax.apply_if_finite(optim.osd(1e-2, rank=4, base_optimizer=optax.scale_by_lion()), 3),
  }
  for name, opt in opts.items():
    state = opt.init(params)
    upd = jax.jit(opt.update)
    outs = []
    for g in grads:
      u, state = upd(g, state, params)
      outs.append(u)
    assert upd._cache_size() == 1, name
    assert all(_finite(u) for u in outs), name
    assert any(float(np.max(np.abs(u['w']['kernel']))) > 0 for u in outs), name


def _train(opt, steps=60):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(42), 3)
  params = {
      'layers': {'0': {'mlp': {'up': {'kernel': 0.3 * jax.random.normal(k1, (16, 32))},
                               'down': {'kernel': 0.3 * jax.random.normal(k2, (32, 16))}},
                       'mlp_norm': {'scale': jnp.ones((16,))}}},
      'head': {'kernel': 0.3 * jax.random.normal(k3, (16, 4))},
  }
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 16))
  y = jnp.sin(x[:, :4] * 2.0) + x[:, 4:8]

  def loss(p):
    lp = p['layers']['0']
    h = x * lp['mlp_norm']['scale']
    h = h + jax.nn.gelu(h @ lp['mlp']['up']['kernel']) @ lp['mlp']['down']['kernel']
    return jnp.mean((h @ p['head']['kernel'] - y) ** 2)

  @jax.jit
  def step(p, s):
    l, g = jax.value_and_grad(loss)(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, l

  state, losses = opt.init(params), []
  for _ in range(steps):
    params, state, l = step(params, state)
    losses.append(float(l))
  return losses


def test_tiny_mlp_trains():
  losses = _train(optim.osd(2e-2, rank=4, projector_lr_ratio=0.5))
  assert losses[-1] < 0.5 * losses[0], losses[::10]
