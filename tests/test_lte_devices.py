"""LTE heads spread over a device axis, in the library (no trainer).

A named `jax.vmap` axis stands in for the devices: collectives (`psum`,
`axis_size`) behave on it as on a `shard_map` / `pmap` axis, so one process checks
that the per-device programs compute exactly what the all-heads-local ones do.
The trainer on 8 real (host) devices is tested in test_parallel_8_devices.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowrank_jax.nn.mhlora import MultiHeadLoRALinear
from lowrank_jax.optim import clip_by_global_norm, global_norm, lte_head_mask, lte_leaf_roles, lte_merge

AXIS = 'devices'
DEVICES = 2
SCALES = {'l0': 2.0, 'blocks/l1': 0.5}


def _rand(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


def _params(seed=0, heads=4):
  def layer(seed, i, o, r):
    return {'kernel': _rand(seed, (i, o), 0.3), 'lora_a': _rand(seed + 1, (heads, i, r), 0.3),
            'lora_b': _rand(seed + 2, (heads, r, o), 0.3), 'lora_v_a': _rand(seed + 3, (heads, i, r), 0.3),
            'lora_v_b': _rand(seed + 4, (heads, r, o), 0.3)}
  return {'l0': layer(seed, 8, 6, 2), 'norm': {'scale': 1 + _rand(seed + 9, (6,), 0.1)},
          'blocks': {'l1': layer(seed + 20, 6, 5, 3)}}


def _like(tree, seed):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, [_rand(seed + i, x.shape) for i, x in enumerate(leaves)])


def _split(tree, mask):
  """Head leaves (N, ...) -> (DEVICES, N / DEVICES, ...): device d's block at index d."""
  return jax.tree.map(lambda x, m: x.reshape((DEVICES, -1) + x.shape[1:]) if m else x, tree, mask)


def _join(tree, mask):
  return jax.tree.map(lambda x, m: x.reshape((-1,) + x.shape[2:]) if m else x, tree, mask)


def _axes(mask):
  return jax.tree.map(lambda m: 0 if m else None, mask)


def test_head_mask_and_roles():
  params = _params()
  roles = lte_leaf_roles(params)
  assert roles['norm']['scale'] == ''
  for layer in (roles['l0'], roles['blocks']['l1']):
    assert layer == {k: k for k in ('kernel', 'lora_a', 'lora_b', 'lora_v_a', 'lora_v_b')}
  mask = lte_head_mask(params)
  assert mask['norm']['scale'] is False and mask['l0']['kernel'] is False
  assert all(mask['l0'][k] for k in ('lora_a', 'lora_b', 'lora_v_a', 'lora_v_b'))


@pytest.mark.parametrize('max_norm', [0.5, 1e3])  # clipped, and left alone
def test_clip_over_a_device_axis_equals_optax_on_the_whole_tree(max_norm):
  params = _params()
  mask = lte_head_mask(params)
  grads = _like(params, 3)
  ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
  tx = clip_by_global_norm(max_norm, axis_name=AXIS, split=lte_head_mask)
  per_device = jax.jit(jax.vmap(lambda g: tx.update(g, tx.init(g))[0], in_axes=(_axes(mask),),
                                out_axes=_axes(mask), axis_name=AXIS))
  got = _join(per_device(_split(grads, mask)), mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, ref)
  norms = jax.jit(jax.vmap(lambda g: global_norm(g, AXIS, mask), in_axes=(_axes(mask),), axis_name=AXIS))(
      _split(grads, mask))
  np.testing.assert_allclose(norms, [optax.tree.norm(grads)] * DEVICES, rtol=1e-6)
  if max_norm < 1:  # the clipped norm is max_norm over all devices together, not per device
    np.testing.assert_allclose(optax.tree.norm(got), max_norm, rtol=1e-5)


def test_merge_over_a_device_axis_equals_all_heads_on_one_device():
  params = _params(1)
  mask = lte_head_mask(params)
  ref_tx = lte_merge(optax.adam(1e-2), 2, scale=SCALES)
  dev_tx = lte_merge(optax.adam(1e-2), 2, scale=SCALES, axis_name=AXIS)
  ref_params, ref_state = params, ref_tx.init(params)

  dev_params = _split(params, mask)
  p_axes = _axes(mask)
  # Every device keeps its own copy of the state (like pmap's replicas): its heads' moments
  # and identical copies of the rest.
  dev_state = jax.vmap(dev_tx.init, in_axes=(p_axes,), axis_name=AXIS)(dev_params)
  # Jitted: two compiles for the four steps (op by op, every primitive of both was compiled).
  ref_step = jax.jit(ref_tx.update)
  dev_step = jax.jit(jax.vmap(dev_tx.update, in_axes=(p_axes, 0, p_axes), out_axes=0, axis_name=AXIS))

  def gather(upd):
    """Per-device updates -> global: heads joined; replicated leaves must agree exactly."""
    def one(x, m):
      if m:
        return x.reshape((-1,) + x.shape[2:])
      for d in range(1, DEVICES):
        np.testing.assert_array_equal(x[d], x[0])
      return x[0]
    return jax.tree.map(one, upd, mask)

  for step in range(4):  # merges after updates 2 and 4
    grads = _like(params, 10 * step)
    ref_upd, ref_state = ref_step(grads, ref_state, ref_params)
    dev_upd, dev_state = dev_step(_split(grads, mask), dev_state, dev_params)
    dev_upd = gather(dev_upd)
    # A merge's kernel update is the all-heads one, on every device alike.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7), dev_upd, ref_upd)
    ref_params = optax.apply_updates(ref_params, ref_upd)
    dev_params = _split(optax.apply_updates(_join(dev_params, mask), dev_upd), mask)
  assert int(ref_state.count) == 4
  np.testing.assert_allclose(_join(dev_params, mask)['l0']['kernel'], ref_params['l0']['kernel'], rtol=1e-6)
  assert not np.allclose(ref_params['l0']['kernel'], params['l0']['kernel'])  # merges happened


def test_layer_holding_a_block_of_heads_computes_its_part_of_the_batch():
  layer = MultiHeadLoRALinear(8, 6, num_heads=4, rank=2, alpha=4.0, rngs=nnx.Rngs(0))
  for name in ('lora_b', 'lora_v_a', 'lora_v_b'):
    getattr(layer, name)[...] = _rand(len(name), getattr(layer, name).shape, 0.5)
  x = _rand(1, (8, 3, 8))  # batch 8: two rows per head
  full = layer(x)
  graphdef, state = nnx.split(layer)
  pure = nnx.to_pure_dict(state)
  for d in range(DEVICES):  # device d: heads 2d, 2d+1 and rows 4d..4d+3
    block = {k: (v[2 * d:2 * d + 2] if k.startswith('lora') else v) for k, v in pure.items()}
    block_state = nnx.state(nnx.clone(layer))
    nnx.replace_by_pure_dict(block_state, block)
    part = nnx.merge(graphdef, block_state)  # num_heads is still 4; it holds 2
    np.testing.assert_allclose(part(x[4 * d:4 * d + 4]), full[4 * d:4 * d + 4], rtol=1e-6, atol=1e-6)
