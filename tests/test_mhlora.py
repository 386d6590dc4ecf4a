"""Tests of lowrank_jax.nn.mhlora (multi-head LoRA layer) and lowrank_jax.optim.lte (LTE merges)."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lowrank_jax.nn.dense import Dense
from lowrank_jax.nn.lora import LoRALinear
from lowrank_jax.nn.mhlora import LoRASnapshot, MultiHeadLoRALinear, lte_a_init
from lowrank_jax.optim.lte import LTEState, lte_layer_paths, lte_merge
from lowrank_jax.optim.relora import freeze_adapted_kernels
from lowrank_jax.train.model import split_model

FROZEN = ('kernel', 'lora_v_a', 'lora_v_b')


def _rand(seed, shape, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _layer(in_f=8, out_f=6, heads=3, rank=2, alpha=4.0, mode='parallel', **kw):
  return MultiHeadLoRALinear(in_f, out_f, num_heads=heads, rank=rank, alpha=alpha, mode=mode,
                             rngs=nnx.Rngs(0), **kw)


def _randomise(layer, seed=0):
  """Non-zero A, B and snapshots (as after some training and merges); returns them in numpy."""
  n, i, o, r = layer.num_heads, layer.in_features, layer.out_features, layer.rank
  vals = {'kernel': _rand(seed, (i, o), 0.3), 'lora_a': _rand(seed + 1, (n, i, r), 0.5),
          'lora_b': _rand(seed + 2, (n, r, o), 0.5), 'lora_v_a': _rand(seed + 3, (n, i, r), 0.5),
          'lora_v_b': _rand(seed + 4, (n, r, o), 0.5)}
  for k, v in vals.items():
    getattr(layer, k)[...] = jnp.asarray(v)
  return vals


def _head_deltas(v, scale):
  """s (A_h B_h - V_a,h V_b,h): (N, in, out), float64 numpy."""
  f = lambda k: np.asarray(v[k], np.float64)
  return scale * (np.einsum('nir,nro->nio', f('lora_a'), f('lora_b'))
                  - np.einsum('nir,nro->nio', f('lora_v_a'), f('lora_v_b')))


def _params(module):
  return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def _count(tree):
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


# --------------------------------------------------------------------------- #
# Layer
# --------------------------------------------------------------------------- #


def test_variables_init_and_validation():
  layer = _layer(8, 6, heads=3, rank=2, alpha=4.0)
  assert layer.scale == 2.0 and layer.mode == 'parallel'
  p = _params(layer)
  assert {k: v.shape for k, v in p.items()} == {
      'kernel': (8, 6), 'lora_a': (3, 8, 2), 'lora_b': (3, 2, 6), 'lora_v_a': (3, 8, 2),
      'lora_v_b': (3, 2, 6)}
  assert type(layer.kernel) is nnx.Param
  assert isinstance(layer.lora_a, nnx.LoRAParam) and isinstance(layer.lora_b, nnx.LoRAParam)
  for name in ('lora_v_a', 'lora_v_b'):
    var = getattr(layer, name)
    assert isinstance(var, LoRASnapshot) and isinstance(var, nnx.Param)
    assert not isinstance(var, nnx.LoRAParam)
    np.testing.assert_array_equal(var[...], 0.0)
  np.testing.assert_array_equal(layer.lora_b[...], 0.0)
  # LTE init: per head orthonormal columns scaled by sqrt(in / r): A_h^T A_h = (in / r) I.
  a = np.asarray(layer.lora_a[...], np.float64)
  for h in range(3):
    np.testing.assert_allclose(a[h].T @ a[h], 4.0 * np.eye(2), atol=1e-5)
  assert not np.allclose(a[0], a[1])  # independent draws per head
  # r > in: orthonormal rows instead.
  wide = lte_a_init(jax.random.key(1), (2, 3, 5))
  for h in range(2):
    np.testing.assert_allclose(np.asarray(wide[h]) @ np.asarray(wide[h]).T, 0.6 * np.eye(3),
                               atol=1e-5)
  # Trainable = LoRAParam only: N r (in + out); kernel and snapshots are not.
  assert _count(nnx.state(layer, nnx.LoRAParam)) == 3 * 2 * (8 + 6)
  assert _count(p) == 8 * 6 + 2 * 3 * 2 * (8 + 6)
  assert not jax.tree.leaves(nnx.split(layer, nnx.Param, ...)[2])  # nothing in `rest`
  for bad in (dict(num_heads=0), dict(num_heads=1.5), dict(rank=0), dict(rank=True),
              dict(alpha=0.0), dict(alpha=-2), dict(mode='ddp')):
    kw = dict(num_heads=2, rank=2, alpha=4.0)
    kw.update(bad)
    with pytest.raises(ValueError):
      MultiHeadLoRALinear(4, 4, rngs=nnx.Rngs(0), **kw)


def test_fresh_layer_equals_dense_bit_for_bit():
  init = nnx.initializers.normal(0.5)
  x = jnp.asarray(_rand(5, (4, 3, 12)))
  for dtype in (jnp.float32, jnp.bfloat16):
    dense = Dense(12, 7, dtype=dtype, kernel_init=init, rngs=nnx.Rngs(3))
    for mode in ('parallel', 'mhlora'):
      layer = MultiHeadLoRALinear(12, 7, dtype=dtype, kernel_init=init, rngs=nnx.Rngs(3),
                                  num_heads=2, rank=3, alpha=6.0, mode=mode)
      np.testing.assert_array_equal(layer.kernel[...], dense.kernel[...])
      np.testing.assert_array_equal(layer(x, use_heads=False), dense(x))
      y = layer(x)
      assert y.dtype == dtype and y.shape == (4, 3, 7)
      np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(dense(x), np.float32),
                                 rtol=1e-6, atol=1e-6)  # B = 0, V = 0


def test_mhlora_forward_matches_formula():
  layer = _layer(8, 6, heads=3, rank=2, alpha=4.0, mode='mhlora')
  v = _randomise(layer, 10)
  x = _rand(20, (5, 4, 8))
  # Every example: x W + (s / N) sum_h x (A_h B_h - V_h).
  w = v['kernel'] + _head_deltas(v, 2.0).sum(0) / 3
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), x.astype(np.float64) @ w,
                             rtol=1e-5, atol=1e-5)
  # Same in eval mode (mhlora's forward is the trained model); use_heads=False is W alone.
  layer.eval()
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), x.astype(np.float64) @ w,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x), use_heads=False)),
                             x @ v['kernel'], rtol=1e-5, atol=1e-5)
  # Any leading shape, including a single vector.
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x[0, 0]))), x[0, 0] @ w,
                             rtol=1e-5, atol=1e-5)


def test_parallel_forward_matches_per_chunk_reference():
  layer = _layer(8, 6, heads=3, rank=2, alpha=4.0, mode='parallel')
  v = _randomise(layer, 30)
  x = _rand(40, (6, 4, 8))  # batch 6 -> 3 parts of 2 examples
  deltas = _head_deltas(v, 2.0)
  ref = np.concatenate([x[2 * h:2 * h + 2].astype(np.float64) @ (v['kernel'] + deltas[h])
                        for h in range(3)])
  y = layer(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(y)[:2] - x[:2] @ (v['kernel'] + deltas[1])).max() > 1e-2  # really per part
  # Evaluation: W only, any batch size (eval mode, deterministic=True, use_heads=False).
  x5 = jnp.asarray(x[:5])
  np.testing.assert_allclose(np.asarray(layer(x5, deterministic=True)), x[:5] @ v['kernel'],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(layer(x5, use_heads=False)), x[:5] @ v['kernel'],
                             rtol=1e-5, atol=1e-5)
  layer.eval()
  np.testing.assert_allclose(np.asarray(layer(x5)), x[:5] @ v['kernel'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x), use_heads=True)), ref,
                             rtol=1e-5, atol=1e-5)
  layer.train()
  with pytest.raises(ValueError, match='divisible by the number of heads it holds, 3'):
    layer(x5)
  with pytest.raises(ValueError, match='leading batch axis'):
    layer(jnp.asarray(x[0, 0]))


def test_gradients_only_reach_the_heads_and_each_head_sees_its_part():
  layer = _layer(8, 6, heads=2, rank=2, alpha=4.0, mode='parallel')
  _randomise(layer, 50)
  graphdef, params = nnx.split(layer, nnx.Param)
  x = jnp.asarray(_rand(60, (4, 3, 8)))

  def loss(p, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))

  g = nnx.to_pure_dict(jax.grad(loss)(params, x))
  for name in FROZEN:
    np.testing.assert_array_equal(g[name], 0.0)  # stopped: exactly zero
  for name in ('lora_a', 'lora_b'):
    assert np.all(np.abs(g[name]).max(axis=(1, 2)) > 0)  # every head is trained
  # Changing the second half of the batch leaves head 0's gradient unchanged, not head 1's.
  g2 = nnx.to_pure_dict(jax.grad(loss)(params, x.at[2:].multiply(-2.0)))
  for name in ('lora_a', 'lora_b'):
    np.testing.assert_array_equal(g2[name][0], g[name][0])
    assert not np.allclose(g2[name][1], g[name][1])


# --------------------------------------------------------------------------- #
# lte_merge on plain params dicts
# --------------------------------------------------------------------------- #

S0, S1 = 2.0, 0.5
SCALES = {'l0': S0, 'blocks/l1': S1}


def _heads_params(seed=0):
  """Two multi-head layers (one nested, N=3 and N=2) with non-zero snapshots, and a norm."""
  def layer(seed, i, o, n, r):
    return {'kernel': jnp.asarray(_rand(seed, (i, o), 0.3)),
            'lora_a': jnp.asarray(_rand(seed + 1, (n, i, r), 0.3)),
            'lora_b': jnp.asarray(_rand(seed + 2, (n, r, o), 0.3)),
            'lora_v_a': jnp.asarray(_rand(seed + 3, (n, i, r), 0.3)),
            'lora_v_b': jnp.asarray(_rand(seed + 4, (n, r, o), 0.3))}
  return {'l0': layer(seed, 8, 6, 3, 2), 'norm': {'scale': jnp.asarray(1 + _rand(seed + 9, (6,), .1))},
          'blocks': {'l1': layer(seed + 20, 6, 5, 2, 3)}}


def _grads_like(params, seed):
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [jnp.asarray(_rand(seed + i, x.shape)) for i, x in
                                      enumerate(leaves)])


def _trainable(tree):
  """What the inner optimizer should see: the tree without kernels and snapshots."""
  strip = lambda l: {'lora_a': l['lora_a'], 'lora_b': l['lora_b']}
  return {'l0': strip(tree['l0']), 'norm': tree['norm'], 'blocks': {'l1': strip(tree['blocks']['l1'])}}


LAYERS = ((('l0',), S0), (('blocks', 'l1'), S1))


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_between_merges_frozen_leaves_get_zero_and_no_state():
  params = _heads_params()
  assert lte_layer_paths(params) == ['blocks/l1', 'l0']
  tx = lte_merge(optax.adam(1e-2), 3, scale=SCALES)
  ref_tx = optax.adam(1e-2)
  state, ref_state = tx.init(params), ref_tx.init(_trainable(params))
  # The inner state holds moments for A, B and the norm only.
  mu = state.inner_state[0].mu
  for path, _ in LAYERS:
    for name in FROZEN:
      assert isinstance(_get(mu, path)[name], optax.MaskedNode)
  assert _count(state.inner_state) == 1 + 2 * _count(_trainable(params))  # count + mu + nu
  for i in range(2):  # updates 1 and 2: no merge yet
    grads = _grads_like(params, 100 * i)
    updates, state = tx.update(grads, state, params)
    ref_updates, ref_state = ref_tx.update(_trainable(grads), ref_state)
    for path, _ in LAYERS:
      for name in FROZEN:
        np.testing.assert_array_equal(_get(updates, path)[name], 0.0)
    jax.tree.map(np.testing.assert_array_equal, _trainable(updates), ref_updates)
    params = optax.apply_updates(params, updates)
  assert int(state.count) == 2


def test_merge_math_and_function_preservation():
  params = _heads_params(1)
  grads = _grads_like(params, 7)
  tx = lte_merge(optax.adam(1e-2), 1, scale=SCALES)  # merge on the first update
  updates, state = tx.update(grads, tx.init(params), params)
  merged = optax.apply_updates(params, updates)
  ordinary_upd, _ = optax.adam(1e-2).update(_trainable(grads), optax.adam(1e-2).init(_trainable(params)))
  ordinary = optax.apply_updates(_trainable(params), ordinary_upd)  # A', B', norm
  np.testing.assert_array_equal(merged['norm']['scale'], ordinary['norm']['scale'])
  for path, s in LAYERS:
    old, new, plain = _get(params, path), _get(merged, path), _get(ordinary, path)
    n = old['lora_a'].shape[0]
    # A and B: their ordinary update, no reset.
    np.testing.assert_array_equal(new['lora_a'], plain['lora_a'])
    np.testing.assert_array_equal(new['lora_b'], plain['lora_b'])
    # Per-head models just before the merge: W + s (A'_h B'_h - V_h) (old snapshots).
    before = np.asarray(old['kernel'], np.float64) + _head_deltas(
        {**old, 'lora_a': plain['lora_a'], 'lora_b': plain['lora_b']}, s)
    average = before.mean(0)
    # W <- W + mean_h s (A'_h B'_h - V_h): W alone is the average model.
    np.testing.assert_allclose(new['kernel'], average, rtol=1e-5, atol=1e-6)
    # V_h <- A'_h B'_h (factored snapshots of the factors).
    np.testing.assert_allclose(new['lora_v_a'], plain['lora_a'], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(new['lora_v_b'], plain['lora_b'], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        np.einsum('nir,nro->nio', new['lora_v_a'], new['lora_v_b']),
        np.einsum('nir,nro->nio', plain['lora_a'], plain['lora_b']), rtol=1e-5, atol=1e-6)
    # After the merge every head's model is W' (= the average of the models before).
    after = np.asarray(new['kernel'], np.float64) + _head_deltas(new, s)
    for h in range(n):
      np.testing.assert_allclose(after[h], average, rtol=1e-5, atol=1e-5)
    # The layers compute it: mhlora (the average model) is unchanged by the merge, and
    # parallel mode after the merge equals W for every part.
    i, o = old['kernel'].shape
    x = jnp.asarray(_rand(3, (2 * n, 4, i)))
    for mode in ('mhlora', 'parallel'):
      rank = old['lora_a'].shape[-1]
      layer = MultiHeadLoRALinear(i, o, num_heads=n, rank=rank, alpha=s * rank, mode=mode,
                                  rngs=nnx.Rngs(0))
      outs = []
      for tree in ({**old, **plain}, new):
        for k, v in tree.items():
          getattr(layer, k)[...] = v
        outs.append(np.asarray(layer(x)))
      if mode == 'mhlora':
        np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(outs[1], np.asarray(x, np.float64) @ average, rtol=1e-5,
                                 atol=1e-5)


class _TwoLayer(nnx.Module):

  def __init__(self, make, rngs):
    self.l0 = make(6, 5, rngs)
    self.l1 = make(5, 4, rngs)

  def __call__(self, x):
    return self.l1(jnp.tanh(self.l0(x)))


def test_one_head_with_merges_equals_lora():
  """N=1: W + s (A B - V) with merges (every step, every 3) follows LoRA's W0 + s A B."""
  rank, alpha = 2, 4.0
  init = nnx.initializers.normal(0.4)
  lte_model = _TwoLayer(lambda i, o, r: MultiHeadLoRALinear(
      i, o, num_heads=1, rank=rank, alpha=alpha, kernel_init=init, rngs=r), nnx.Rngs(0))
  lora_model = _TwoLayer(lambda i, o, r: LoRALinear(
      i, o, rank=rank, alpha=alpha, kernel_init=init, rngs=r), nnx.Rngs(1))
  for seed, name in enumerate(('l0', 'l1')):
    a, b = getattr(lte_model, name), getattr(lora_model, name)
    b.kernel[...] = a.kernel[...]
    b.lora_a[...] = a.lora_a[...][0]
    b_init = jnp.asarray(_rand(seed, b.lora_b[...].shape, 0.3))
    b.lora_b[...] = b_init  # non-zero B from the start (V stays 0: still W0 + s A B)
    a.lora_b[...] = b_init[None]
  x = jnp.asarray(_rand(70, (8, 6)))
  y = jnp.asarray(_rand(71, (8, 4)))

  def run(model, tx, steps=6):
    split, params, rest = split_model(model)  # as the trainer does

    def loss_fn(p):
      return jnp.mean((split.merge(p, rest)(x) - y) ** 2)

    @jax.jit
    def step(p, s):
      loss, g = jax.value_and_grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    state, losses, history = tx.init(params), [], []
    for _ in range(steps):
      params, state, loss = step(params, state)
      losses.append(float(loss))
      history.append(params)
    return losses, history

  lora_losses, lora_hist = run(lora_model, freeze_adapted_kernels(optax.adam(3e-2)))
  assert lora_losses[-1] < lora_losses[0] - 1e-3  # it trained
  for merge_every in (1, 3):
    lte_losses, lte_hist = run(lte_model, lte_merge(optax.adam(3e-2), merge_every,
                                                    scale=alpha / rank))
    np.testing.assert_allclose(lte_losses, lora_losses, rtol=1e-5)
    _check_lora_trajectory(lte_model, lte_hist, lora_hist, alpha / rank, merge_every)


def _check_lora_trajectory(lte_model, lte_hist, lora_hist, s, merge_every):
  previous = [{n: {'kernel': getattr(lte_model, n).kernel[...]} for n in ('l0', 'l1')}] + lte_hist
  for step, (p_lte, p_lora) in enumerate(zip(lte_hist, lora_hist), start=1):
    for name in ('l0', 'l1'):
      q, r = p_lte[name], p_lora[name]
      np.testing.assert_allclose(q['lora_a'][0], r['lora_a'], rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(q['lora_b'][0], r['lora_b'], rtol=1e-4, atol=1e-6)
      effective = q['kernel'] + s * (q['lora_a'][0] @ q['lora_b'][0]
                                     - q['lora_v_a'][0] @ q['lora_v_b'][0])
      np.testing.assert_allclose(effective, r['kernel'] + s * r['lora_a'] @ r['lora_b'],
                                 rtol=1e-4, atol=1e-5)
      merged = step % merge_every == 0
      # The kernel moves exactly at merges, to W0 + s A B (V = A B then).
      assert np.array_equal(q['kernel'], previous[step - 1][name]['kernel']) != merged
      if merged:
        np.testing.assert_allclose(q['kernel'], r['kernel'] + s * r['lora_a'] @ r['lora_b'],
                                   rtol=1e-4, atol=1e-5)


def test_jit_no_recompilation_merge_schedule_and_orbax(tmp_path):
  params = _heads_params(2)
  tx = lte_merge(optax.adamw(1e-2), 2, scale=lambda path: SCALES['/'.join(path)])
  update = jax.jit(tx.update)
  state = tx.init(params)
  for i in range(5):
    updates, state = update(_grads_like(params, 10 * i), state, params)
    changed = bool(np.any(updates['l0']['kernel']))
    assert changed == ((i + 1) % 2 == 0)  # merges after updates 2 and 4
    assert bool(np.any(updates['blocks']['l1']['lora_v_b'])) == changed
    params = optax.apply_updates(params, updates)
  assert update._cache_size() == 1  # one executable across merges
  assert isinstance(state, LTEState) and int(state.count) == 5
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'state', state)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / 'state', jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  # The restored state continues identically.
  g = _grads_like(params, 99)
  jax.tree.map(np.testing.assert_array_equal, update(g, restored, params)[0],
               update(g, state, params)[0])


def test_errors():
  params = _heads_params()
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match='merge_every'):
      lte_merge(optax.sgd(0.1), bad, scale=1.0)
  with pytest.raises(ValueError, match='scale'):
    lte_merge(optax.sgd(0.1), 2, scale=float('nan'))
  with pytest.raises(ValueError, match="no scale given for layer 'blocks/l1'"):
    lte_merge(optax.sgd(0.1), 2, scale={'l0': 1.0}).init(params)
  with pytest.raises(ValueError, match='no multi-head layer'):
    lte_merge(optax.sgd(0.1), 2, scale=1.0).init({'w': jnp.zeros((2, 2))})
  tx = lte_merge(optax.sgd(0.1), 2, scale=1.0)
  with pytest.raises(ValueError, match='needs params'):
    tx.update(params, tx.init(params))
  # A plain LoRA layer (no stacked heads / no snapshots) is refused unless filtered out.
  mixed = {**params, 'lora': {'kernel': jnp.zeros((4, 3)), 'lora_a': jnp.zeros((4, 2)),
                              'lora_b': jnp.zeros((2, 3))}}
  with pytest.raises(ValueError, match="'lora'.*not a multi-head layer"):
    tx.init(mixed)
  filtered = lte_merge(optax.sgd(0.1), 2, scale=1.0, layer_filter=lambda p, n: p != ('lora',))
  assert lte_layer_paths(mixed, layer_filter=lambda p, n: p != ('lora',)) == ['blocks/l1', 'l0']
  filtered.init(mixed)
  bad = jax.tree.map(lambda x: x, params)
  bad['l0']['lora_v_b'] = jnp.zeros((3, 2, 5))
  with pytest.raises(ValueError, match='inconsistent shapes'):
    tx.init(bad)


# --------------------------------------------------------------------------- #
# Through the factory, a GPT-2 and the trainer's step
# --------------------------------------------------------------------------- #


def test_gpt2_lte_through_factory_and_train_step():
  from lowrank_jax.models.gpt2 import GPT2, gpt2_config
  from lowrank_jax.models.linear_factory import LinearFactory, register_linear_kind
  from lowrank_jax.train.step import TrainState, make_train_step

  register_linear_kind('test_mhlora', MultiHeadLoRALinear)
  heads, rank, alpha = 2, 2, 8.0
  names = ('q', 'k', 'v', 'o', 'up', 'down')
  factory = LinearFactory({n: 'test_mhlora' for n in names},
                          options={'test_mhlora': dict(num_heads=heads, rank=rank, alpha=alpha)})
  cfg = gpt2_config('tiny', 32, d_model=16, n_heads=2, n_layers=1, max_seq_len=8)
  model = GPT2(cfg, linear_factory=factory, rngs=nnx.Rngs(0))
  split, params, rest = split_model(model)
  assert lte_layer_paths(params) == sorted(
      [f'layers/0/attn/{n}' for n in 'qkvo'] + ['layers/0/mlp/down', 'layers/0/mlp/up'])
  assert not jax.tree.leaves(rest)
  # Trainable: A and B of every head of every adapted linear, plus embeddings and norms.
  d, f, v, t = 16, 64, 32, 8
  adapters = heads * rank * (4 * (d + d) + (d + f) + (f + d))
  others = v * d + t * d + 4 * d + 2 * d
  assert _count(nnx.state(model, nnx.LoRAParam)) == adapters
  assert _count(params) == others + (4 * d * d + 2 * d * f) + 2 * adapters

  merge_every = 2
  tx = lte_merge(optax.adam(1e-2), merge_every, scale=alpha / rank)
  step = jax.jit(make_train_step(split, tx, optax.constant_schedule(1e-2)))
  state = TrainState(jnp.zeros([], jnp.int32), params, rest, tx.init(params),
                     jax.random.key_data(jax.random.key(0)))
  tokens = jax.random.randint(jax.random.key(1), (1, 4, t), 0, v)  # [accum, batch, T]
  losses = []
  for i in range(4):
    before = state.params
    state, metrics = step(state, tokens)
    losses.append(float(metrics['loss']))
    q_new, q_old = state.params['layers'][0]['attn']['q'], before['layers'][0]['attn']['q']
    assert np.array_equal(q_new['kernel'], q_old['kernel']) == ((i + 1) % merge_every != 0)
  assert step._cache_size() == 1
  assert losses[-1] < losses[0]
  # After the last (merge) step, V = A B and W alone is the model: the eval-mode forward
  # (parallel heads off, as the official layer outside training) equals the training one.
  q = state.params['layers'][0]['attn']['q']
  np.testing.assert_allclose(q['lora_v_a'], q['lora_a'], rtol=1e-6, atol=1e-7)
  trained = split.merge(state.params, state.rest)
  trained.eval()  # reaches every adapted linear of the model
  layers = [m for _, m in nnx.iter_modules(trained) if isinstance(m, MultiHeadLoRALinear)]
  assert len(layers) == len(names) and all(m.deterministic for m in layers)
  x = jnp.asarray(_rand(5, (4, t, d)))
  q_layer = trained.layers[0].attn.q
  np.testing.assert_allclose(np.asarray(q_layer(x)), np.asarray(q_layer(x, use_heads=True)),
                             rtol=1e-5, atol=1e-5)
