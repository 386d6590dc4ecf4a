"""Tests of the projection core (lowrank_jax.optim.projection)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.optim import projection as P


def _decaying(key, m, n, decay=0.9, dtype=jnp.float32):
  """A random (m, n) matrix with singular values decay**i."""
  k1, k2 = jax.random.split(key)
  k = min(m, n)
  u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, k)))
  v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, k)))
  s = decay ** jnp.arange(k, dtype=jnp.float32)
  return ((u * s) @ v.T).astype(dtype)


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
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 20))
  pr = P.svd_projectors(x, {'in': 4, 'out': 3})
  assert pr['in'].shape == (2, 12, 4) and pr['out'].shape == (2, 20, 3)
  assert P.project(x, {'in': pr['in']}).shape == (2, 4, 20)
  assert P.project(x, {'out': pr['out']}).shape == (2, 12, 3)
  y = P.project(x, pr)
  assert y.shape == (2, 4, 3)
  assert P.project_back(y, pr).shape == x.shape
  for p in pr.values():
    assert float(P.orthonormality_error(p)) < 1e-5


def test_svd_projector_captures_top_energy():
  x = _decaying(jax.random.PRNGKey(1), 40, 60)
  s = jnp.linalg.svd(x, compute_uv=False)
  top = float(jnp.sum(s[:5] ** 2) / jnp.sum(s**2))
  for side in ('in', 'out'):
    pr = P.svd_projectors(x, {side: 5})
    np.testing.assert_allclose(P.captured_energy(x, pr), top, rtol=1e-5)


@pytest.mark.parametrize('side', ['in', 'out'])
def test_randomized_refresh_captures_99pct_of_svd(side):
  x = _decaying(jax.random.PRNGKey(2), 192, 320, decay=0.97)
  r = 24
  exact = float(P.captured_energy(x, P.svd_projectors(x, {side: r})))
  a = x if side == 'in' else x.T
  cold = P.randomized_projector(a, r, jax.random.PRNGKey(3))
  assert cold.shape == (a.shape[0], r)
  assert float(P.orthonormality_error(cold)) < 1e-4
  e_cold = float(P.captured_energy(x, {side: cold}))
  assert e_cold >= 0.99 * exact, (e_cold, exact)
  # Warm start from a slightly different matrix's projector.
  x2 = x + 0.01 * jax.random.normal(jax.random.PRNGKey(4), x.shape)
  a2 = x2 if side == 'in' else x2.T
  warm = P.randomized_projector(
      a2, r, jax.random.PRNGKey(5), cold, cold=False, oversample=4, n_iter=1
  )
  exact2 = float(P.captured_energy(x2, P.svd_projectors(x2, {side: r})))
  assert float(P.captured_energy(x2, {side: warm})) >= 0.99 * exact2


def test_randomized_cold_flag_ignores_prev_and_is_batched():
  x = _decaying(jax.random.PRNGKey(6), 64, 96)[None].repeat(2, axis=0)
  junk = jnp.zeros((2, 64, 8))
  p = P.randomized_projector(x, 8, jax.random.PRNGKey(7), junk, cold=jnp.array(True))
  assert p.shape == (2, 64, 8)
  assert bool(jnp.all(jnp.isfinite(p)))
  exact = P.captured_energy(x, P.svd_projectors(x, {'in': 8}))
  assert float(P.captured_energy(x, {'in': p})) >= 0.99 * float(exact)


def test_online_pca_loss_and_gradient():
  x = _decaying(jax.random.PRNGKey(8), 30, 50)
  for side in ('in', 'out'):
    pr = P.svd_projectors(x, {side: 6})[side]
    loss = P.online_pca_loss(pr, x, side)
    e = P.captured_energy(x, {side: pr})
    np.testing.assert_allclose(loss, 1.0 - e, atol=1e-5)
    # The top subspace is a stationary point (also of the penalised loss).
    g = jax.grad(P.online_pca_loss)(pr, x, side, 0.5)
    assert float(jnp.max(jnp.abs(g))) < 1e-4
    # Scale invariance of the normalised gradient.
    np.testing.assert_allclose(P.online_pca_loss(pr, 7.0 * x, side), loss, rtol=1e-5)
  bad = jnp.eye(30, 6) * 2.0
  assert float(P.online_pca_loss(bad, x, 'in', 1.0)) > float(P.online_pca_loss(bad, x, 'in'))


def test_principal_angles():
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(9), (20, 4)))
  rot = jax.random.normal(jax.random.PRNGKey(10), (4, 4))
  assert float(jnp.max(P.principal_angles(q, q @ rot))) < 1e-3
  e = jnp.eye(20)
  np.testing.assert_allclose(
      P.principal_angles(e[:, :2], e[:, 2:4]), [np.pi / 2] * 2, atol=1e-6
  )


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
