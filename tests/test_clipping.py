"""Clipping modes (optim/clipping.py) against their definitions written in numpy."""

import jax
import numpy as np
import optax
import pytest

from lowrank_jax.optim import (CLIP_MODES, clip_by_block_rms, clip_by_global_norm, clip_by_previous_norm,
                               clip_gradients)


def _tree(scale, seed=0):
  rng = np.random.default_rng(seed)
  return {'w': (scale * rng.standard_normal((6, 5))).astype(np.float32),
          'b': {'x': (0.01 * scale * rng.standard_normal(7)).astype(np.float32)},
          'v': (3 * scale * rng.standard_normal((2, 3, 4))).astype(np.float32)}


def _norm(tree):
  return np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in jax.tree.leaves(tree)))


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), y, rtol=2e-6, atol=1e-7), a, b)


def test_block_is_per_leaf_rms():
  g, threshold = _tree(1.0), 0.5  # 'w' (rms ~1) and 'v' (rms ~3) are clipped, 'b' is not
  out, _ = clip_by_block_rms(threshold).update(g, optax.EmptyState())
  rms = lambda x: np.sqrt(np.mean(np.square(x.astype(np.float64))))  # noqa: E731
  expected = jax.tree.map(lambda x: x / max(1.0, rms(x) / threshold), g)
  _close(out, expected)
  assert rms(np.asarray(out['v'])) == pytest.approx(threshold, rel=1e-5)
  np.testing.assert_array_equal(out['b']['x'], g['b']['x'])
  # The same as Optax's for float32 leaves.
  ref, _ = optax.clip_by_block_rms(threshold).update(g, optax.EmptyState())
  _close(out, jax.tree.map(np.asarray, ref))


def test_previous_scales_by_last_steps_norm():
  max_norm = 2.0
  grads = [_tree(s, seed) for seed, s in enumerate((1.0, 0.05, 3.0, 0.2))]
  tx = clip_by_previous_norm(max_norm)
  state = tx.init(grads[0])
  previous = 0.0
  for g in grads:
    out, state = jax.jit(tx.update)(g, state)
    factor = 1.0 if previous < max_norm else max_norm / previous
    _close(out, jax.tree.map(lambda x: x * factor, g))
    previous = _norm(g)  # the raw norm, before clipping
    assert float(state.norm) == pytest.approx(previous, rel=1e-5)
  # Both branches were taken.
  norms = [_norm(g) for g in grads]
  assert min(norms[:-1]) < max_norm < max(norms[:-1])


def test_previous_keeps_its_norm_over_a_skipped_step():
  tx = optax.apply_if_finite(clip_by_previous_norm(1.0), max_consecutive_errors=3)
  g = _tree(1.0)
  state = tx.init(g)
  _, state = tx.update(g, state)
  bad = jax.tree.map(lambda x: np.full_like(x, np.nan), g)
  _, state = tx.update(bad, state)
  assert float(state.inner_state.norm) == pytest.approx(_norm(g), rel=1e-5)


@pytest.mark.parametrize('mode', CLIP_MODES)
def test_split_leaves_over_an_axis(mode):
  """A leaf split over a named axis clips as the whole leaf would (vmap stands in for the devices)."""
  threshold = 0.3
  full = _tree(1.0)
  n = 2  # 'v' is split in 2 blocks along its first axis; the rest is replicated.
  per_device = {'w': np.stack([full['w']] * n), 'b': {'x': np.stack([full['b']['x']] * n)},
                'v': full['v'].reshape(n, 1, 3, 4)}
  split = {'w': False, 'b': {'x': False}, 'v': True}
  tx = clip_gradients(mode, threshold, axis_name='d', split=split)
  ref_tx = clip_gradients(mode, threshold)
  state, ref_state = tx.init(full), ref_tx.init(full)
  for _ in range(2):  # the second step exercises `previous`'s stored norm
    out, states = jax.vmap(tx.update, in_axes=(0, None), axis_name='d')(per_device, state)
    state = jax.tree.map(lambda x: x[0], states)  # the same on every device
    ref, ref_state = ref_tx.update(full, ref_state)
    np.testing.assert_allclose(np.asarray(out['v']).reshape(full['v'].shape), ref['v'], rtol=2e-6)
    for k in range(n):
      np.testing.assert_allclose(out['w'][k], ref['w'], rtol=2e-6)


def test_global_mode_is_optax():
  g = _tree(1.0)
  out, _ = clip_gradients('global', 1.0).update(g, optax.EmptyState())
  expected = jax.tree.map(lambda x: x * (1.0 / _norm(g)), g)
  _close(out, expected)
  assert clip_by_global_norm(1.0) is not None


def test_bad_mode_and_threshold():
  with pytest.raises(ValueError, match=r"clip mode must be one of \['global', 'block', 'previous'\]"):
    clip_gradients('layer', 1.0)
  for mode in CLIP_MODES:
    with pytest.raises(ValueError, match='> 0'):
      clip_gradients(mode, 0.0)
