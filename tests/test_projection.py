"""Tests of the projection core (lowrank_jax.optim.projection)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.optim import projection as P

# Jitted once per static configuration (eager mode would compile op by op).
_svd = jax.jit(P.svd_projectors, static_argnums=(1,))
_energy = jax.jit(P.captured_energy)
_orth_err = jax.jit(P.orthonormality_error)


@functools.partial(jax.jit, static_argnames=('rank', 'oversample', 'n_iter'))
def _rand(a, key, prev=None, cold=False, *, rank, oversample=8, n_iter=2):
  return P.randomized_projector(
      a, rank, key, prev, cold=cold, oversample=oversample, n_iter=n_iter
  )


def _svd_side(x, side, r):
  return _svd(x, ((side, r),))[side]


def _decaying(seed, m, n, decay=0.9):
  """A random (m, n) float32 matrix with singular values decay**i."""
  rng = np.random.default_rng(seed)
  k = min(m, n)
  u, _ = np.linalg.qr(rng.standard_normal((m, k)))
  v, _ = np.linalg.qr(rng.standard_normal((n, k)))
  s = decay ** np.arange(k)
  return jnp.asarray((u * s) @ v.T, jnp.float32)


@pytest.mark.parametrize(
    'shape,axes,matrix_shape',
    [
        ((3, 5), P.MatrixAxes(), (3, 5)),
        ((5, 3), P.MatrixAxes(1, 0), (3, 5)),  # torch (out, in)
        ((2, 3, 5), P.MatrixAxes(), (2, 3, 5)),  # stacked (layers, in, out)
        ((6, 2, 4), P.MatrixAxes(0, (1, 2)), (6, 8)),  # (embed, heads, head_dim)
        ((2, 4, 6), P.MatrixAxes((0, 1), 2), (8, 6)),  # (heads, head_dim, embed)
        ((4, 3, 2, 5), P.MatrixAxes(1, 3), (4, 2, 3, 5)),  # two batch axes
    ],
)
def test_matrix_view_roundtrip(shape, axes, matrix_shape):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
  view = P.matrix_view(shape, axes)
  m = view.to_matrix(x)
  assert m.shape == matrix_shape
  np.testing.assert_array_equal(view.from_matrix(m), x)


def test_matrix_view_torch_layout_is_transpose():
  x = jnp.arange(15.0).reshape(3, 5)  # flax (in, out)
  np.testing.assert_array_equal(
      P.matrix_view((5, 3), P.MatrixAxes(1, 0)).to_matrix(x.T), x
  )


def test_matrix_view_rejects_bad_axes():
  with pytest.raises(ValueError):
    P.matrix_view((3, 4), P.MatrixAxes(0, 0))
  with pytest.raises(ValueError):
    P.matrix_view((3,), P.MatrixAxes())
  with pytest.raises(ValueError):
    P.matrix_view((3, 4), P.MatrixAxes(0, 2))


def test_projection_sides_table():
  # (n_in, n_out); the official code's torch weight is (out, in) = (m, n).
  # std compresses the smaller dim; on ties the input dim (official: m >= n -> right).
  assert P.projection_sides('std', 4, 8) == ('in',)
  assert P.projection_sides('std', 8, 4) == ('out',)
  assert P.projection_sides('std', 6, 6) == ('in',)
  assert P.projection_sides('reverse_std', 4, 8) == ('out',)
  assert P.projection_sides('reverse_std', 8, 4) == ('in',)
  assert P.projection_sides('reverse_std', 6, 6) == ('out',)
  assert P.projection_sides('right', 8, 4) == ('in',)
  assert P.projection_sides('left', 4, 8) == ('out',)
  assert P.projection_sides('full', 4, 8) == ('in', 'out')
  with pytest.raises(ValueError):
    P.projection_sides('bogus', 4, 4)
  assert P.effective_rank(16, 8, 32) == 8


def test_project_shapes_and_back():
  """On a batch of matrices X = U S V^T (numpy's SVD), the SVD projectors are U's and V's leading columns
  (up to signs), so P^T X = D S V^T rows, X Q = U S columns D, P^T X Q = D S D', and projecting back gives
  the best rank-3 approximation U_3 S_3 V_3^T: values checked against numpy, not only shapes."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 20))
  pr = _svd(x, (('in', 4), ('out', 3)))
  assert pr['in'].shape == (2, 12, 4) and pr['out'].shape == (2, 20, 3)
  for p in pr.values():
    assert float(_orth_err(p)) < 1e-5
  xs = np.asarray(x, np.float64)
  u, s, vt = np.linalg.svd(xs, full_matrices=False)
  p_in, p_out = (np.asarray(pr[k], np.float64) for k in ('in', 'out'))
  for b in range(2):
    np.testing.assert_allclose(np.abs(p_in[b].T @ u[b, :, :4]), np.eye(4), atol=1e-4)
    np.testing.assert_allclose(np.abs(p_out[b].T @ vt[b, :3].T), np.eye(3), atol=1e-4)
  y_in = P.project(x, {'in': pr['in']})
  y_out = P.project(x, {'out': pr['out']})
  assert y_in.shape == (2, 4, 20) and y_out.shape == (2, 12, 3)
  np.testing.assert_allclose(np.abs(y_in), np.abs(s[:, :4, None] * vt[:, :4]), atol=3e-4)
  np.testing.assert_allclose(np.abs(y_out), np.abs(u[:, :, :3] * s[:, None, :3]), atol=3e-4)
  y = P.project(x, pr)
  assert y.shape == (2, 4, 3)
  np.testing.assert_allclose(np.abs(y), np.stack([np.eye(4, 3) * s[b, :3] for b in range(2)]), atol=3e-4)
  back = P.project_back(y, pr)
  assert back.shape == x.shape
  best = np.einsum('bir,br,brj->bij', u[:, :, :3], s[:, :3], vt[:, :3])
  np.testing.assert_allclose(back, best, atol=3e-4)
  # One side at a time: P P^T X and X Q Q^T.
  np.testing.assert_allclose(P.project_back(y_in, {'in': pr['in']}),
                             np.einsum('bir,br,brj->bij', u[:, :, :4], s[:, :4], vt[:, :4]), atol=3e-4)
  np.testing.assert_allclose(P.project_back(y_out, {'out': pr['out']}), best, atol=3e-4)


def test_svd_projector_captures_top_energy():
  x = _decaying(1, 40, 60)
  s = np.linalg.svd(np.asarray(x), compute_uv=False)
  top = float(np.sum(s[:5] ** 2) / np.sum(s**2))
  for side in ('in', 'out'):
    pr = {side: _svd_side(x, side, 5)}
    np.testing.assert_allclose(_energy(x, pr), top, rtol=1e-5)


@pytest.mark.parametrize('side', ['in', 'out'])
def test_randomized_refresh_captures_99pct_of_svd(side):
  x = _decaying(2, 128, 192, decay=0.95)
  r = 16
  exact = float(_energy(x, {side: _svd_side(x, side, r)}))
  a = x if side == 'in' else x.T
  cold = _rand(a, jax.random.PRNGKey(3), rank=r)
  assert cold.shape == (a.shape[0], r)
  assert float(_orth_err(cold)) < 1e-4
  e_cold = float(_energy(x, {side: cold}))
  assert e_cold >= 0.99 * exact, (e_cold, exact)
  # Warm start from a slightly different matrix's projector.
  x2 = x + 0.01 * jnp.asarray(np.random.default_rng(4).standard_normal(x.shape), jnp.float32)
  a2 = x2 if side == 'in' else x2.T
  warm = _rand(a2, jax.random.PRNGKey(5), cold, False, rank=r, oversample=4, n_iter=1)
  exact2 = float(_energy(x2, {side: _svd_side(x2, side, r)}))
  assert float(_energy(x2, {side: warm})) >= 0.99 * exact2


def test_randomized_cold_flag_ignores_prev_and_is_batched():
  x = jnp.stack([_decaying(6, 64, 96), _decaying(7, 64, 96)])
  junk = jnp.zeros((2, 64, 8))
  p = _rand(x, jax.random.PRNGKey(7), junk, jnp.array(True), rank=8)
  assert p.shape == (2, 64, 8)
  assert bool(np.all(np.isfinite(np.asarray(p))))
  exact = _energy(x, {'in': _svd_side(x, 'in', 8)})
  assert float(_energy(x, {'in': p})) >= 0.99 * float(exact)


def test_online_pca_loss_and_gradient():
  x = _decaying(8, 30, 50)
  loss_fn = jax.jit(P.online_pca_loss, static_argnums=(2,))
  grad_fn = jax.jit(jax.grad(P.online_pca_loss), static_argnums=(2,))
  for side in ('in', 'out'):
    pr = _svd_side(x, side, 6)
    loss = loss_fn(pr, x, side, 0.0)
    e = _energy(x, {side: pr})
    np.testing.assert_allclose(loss, 1.0 - e, atol=1e-5)
    # The top subspace is a stationary point (also of the penalised loss).
    g = grad_fn(pr, x, side, 0.5)
    assert float(np.max(np.abs(np.asarray(g)))) < 1e-4
    # Scale invariance of the normalised gradient.
    np.testing.assert_allclose(loss_fn(pr, 7.0 * x, side, 0.0), loss, rtol=1e-5)
  bad = jnp.eye(30, 6) * 2.0
  assert float(loss_fn(bad, x, 'in', 1.0)) > float(loss_fn(bad, x, 'in', 0.0))


@pytest.mark.parametrize('side', ['in', 'out'])
def test_online_pca_closed_form_gradient(side):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((2, 12, 20)), jnp.float32)  # batched
  d = 12 if side == 'in' else 20
  p = jnp.asarray(rng.standard_normal((2, d, 4)) * 0.3, jnp.float32)
  lam = 0.7
  auto = jax.jit(jax.grad(P.online_pca_loss), static_argnums=(2,))(p, x, side, lam)
  closed = jax.jit(P.online_pca_grad, static_argnums=(2,))(p, x, side, lam)
  np.testing.assert_allclose(closed, auto, rtol=1e-4, atol=1e-5)
  # With P^T A precomputed from the (unnormalised) low-rank gradient.
  pa = P.project(x, {side: p})
  pa = pa if side == 'in' else jnp.swapaxes(pa, -1, -2)
  np.testing.assert_allclose(P.online_pca_grad(p, x, side, lam, pa), auto, rtol=1e-4, atol=1e-5)


def test_principal_angles():
  rng = np.random.default_rng(9)
  q = rng.standard_normal((20, 4))
  rot = rng.standard_normal((4, 4))
  angles = jax.jit(P.principal_angles)
  assert float(jnp.max(angles(q, q @ rot))) < 1e-3
  e = np.eye(20)
  np.testing.assert_allclose(angles(e[:, :2], e[:, 2:4]), [np.pi / 2] * 2, atol=1e-6)


LLAMA_LIKE = {
    'embed': {'embedding': jnp.zeros((100, 16))},
    'layers': {
        '0': {
            'attn': {n: {'kernel': jnp.zeros((16, 16))} for n in 'qkvo'},
            'mlp': {
                'gate': {'kernel': jnp.zeros((16, 40))},
                'up': {'kernel': jnp.zeros((16, 40))},
                'down': {'kernel': jnp.zeros((40, 16))},
            },
            'attn_norm': {'scale': jnp.zeros((16,))},
            'mlp_norm': {'scale': jnp.zeros((16,))},
        }
    },
    'final_norm': {'scale': jnp.zeros((16,))},
    'head': {'kernel': jnp.zeros((16, 100))},
    'lm_head': {'kernel': jnp.zeros((16, 100))},
    'stacked': {'kernel': jnp.zeros((2, 16, 16))},
}


def test_default_projection_mask():
  m = P.default_projection_mask(LLAMA_LIKE)
  flat = {
      '/'.join(P.path_key_names(p)): v
      for p, v in jax.tree_util.tree_flatten_with_path(m)[0]
  }
  projected = sorted(k for k, v in flat.items() if v)
  assert projected == sorted(
      [f'layers/0/attn/{n}/kernel' for n in 'qkvo']
      + [f'layers/0/mlp/{n}/kernel' for n in ('gate', 'up', 'down')]
  )
  # Rank rule: both dims >= rank.
  m = P.default_projection_mask(LLAMA_LIKE, rank=17)
  assert not any(jax.tree.leaves(m))
  m = P.default_projection_mask(LLAMA_LIKE, rank=16)
  assert m['layers']['0']['mlp']['down']['kernel']
  # Works on abstract shapes too.
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), LLAMA_LIKE)
  assert jax.tree.leaves(P.default_projection_mask(abstract)) == jax.tree.leaves(
      P.default_projection_mask(LLAMA_LIKE)
  )
