"""The LoRA variants as settings of the one layer (DoRA, rsLoRA, PiSSA), LoRA+ in the optimizer,
and their trainer settings, each against an independent numpy (or plain jax) computation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowrank_jax.nn import quantized_base
from lowrank_jax.nn.dense import Dense
from lowrank_jax.nn.lora import LoRALinear, pissa_init
from lowrank_jax.optim import freeze_adapted_kernels, relora, scale_lora_b
from lowrank_jax.train import ConfigError, resolve
from lowrank_jax.train.methods.base import build_adamw
from lowrank_jax.train.methods.lora import lora_layers
from lowrank_jax.train.model import build_model
from train_helpers import tiny_config


def _rand(seed, shape, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _dora_layer(in_f=12, out_f=9, rank=3, alpha=6.0, seed=0, **kw):
  """A DoRA layer with random W, A, B (nonzero) and magnitude."""
  layer = LoRALinear(in_f, out_f, rank=rank, alpha=alpha, variant='dora', rngs=nnx.Rngs(0), **kw)
  layer.kernel[...] = jnp.asarray(_rand(seed, (in_f, out_f)))
  layer.lora_a[...] = jnp.asarray(_rand(seed + 1, (in_f, rank)))
  layer.lora_b[...] = jnp.asarray(_rand(seed + 2, (rank, out_f), 0.3))
  layer.lora_magnitude[...] = jnp.asarray(np.abs(_rand(seed + 3, (out_f,))) + 0.5)
  return layer


def _numpy_dora(x, w, a, b, m, s):
  """DoRA (Liu et al. 2024, eq. 5) in float64: m * (x V) / ||V|| per column, V = W + s A B."""
  v = w.astype(np.float64) + s * (a.astype(np.float64) @ b)
  return (x.astype(np.float64) @ v) * (m / np.linalg.norm(v, axis=0))


def _params(layer, name):
  return np.asarray(getattr(layer, name)[...])


# --- DoRA ----------------------------------------------------------------------------------------

def test_dora_forward_matches_numpy():
  layer = _dora_layer()
  x = _rand(10, (2, 5, 12))
  w, a, b, m = (_params(layer, n) for n in ('kernel', 'lora_a', 'lora_b', 'lora_magnitude'))
  expected = _numpy_dora(x, w, a, b, m, 2.0)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected, rtol=2e-5, atol=2e-5)
  jitted = nnx.jit(lambda layer, x: layer(x))(layer, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(jitted), expected, rtol=2e-5, atol=2e-5)


def test_dora_gradients_stop_at_the_norm():
  layer = _dora_layer()
  x, g = jnp.asarray(_rand(11, (16, 12))), jnp.asarray(_rand(12, (16, 9)))
  w, s = jnp.asarray(_params(layer, 'kernel')), 2.0

  def reference(a, b, m):
    # Written from the paper, not the layer: the norm of the whole V, a constant for the gradient.
    v = w + s * a @ b
    norm = jax.lax.stop_gradient(jnp.linalg.norm(v, axis=0))
    return jnp.sum(g * ((m / norm) * (x @ v)))

  want = jax.grad(reference, argnums=(0, 1, 2))(*(jnp.asarray(_params(layer, n))
                                                  for n in ('lora_a', 'lora_b', 'lora_magnitude')))
  got = nnx.grad(lambda layer: jnp.sum(g * layer(x)))(layer)
  for name, expected in zip(('lora_a', 'lora_b', 'lora_magnitude'), want):
    np.testing.assert_allclose(np.asarray(getattr(got, name)[...]), np.asarray(expected), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got.kernel[...], 0.0)


def test_fresh_dora_layer_is_exactly_the_base_linear():
  init = nnx.initializers.normal(0.5)
  x = jnp.asarray(_rand(0, (5, 3, 48)))
  for dtype in (jnp.float32, jnp.bfloat16):
    dense = Dense(48, 40, dtype=dtype, kernel_init=init, rngs=nnx.Rngs(3))
    dora = LoRALinear(48, 40, dtype=dtype, kernel_init=init, rngs=nnx.Rngs(3), rank=4, alpha=8, variant='dora')
    np.testing.assert_allclose(_params(dora, 'lora_magnitude'),
                               np.linalg.norm(_params(dense, 'kernel').astype(np.float64), axis=0), rtol=1e-6)
    call = nnx.jit(lambda layer, x: layer(x))
    for run in (lambda layer: layer(x), lambda layer: call(layer, x)):  # eagerly and compiled
      np.testing.assert_array_equal(np.asarray(run(dora), np.float32), np.asarray(run(dense), np.float32))
  params = nnx.to_pure_dict(nnx.state(dora, nnx.Param))
  assert set(params) == {'kernel', 'lora_a', 'lora_b', 'lora_magnitude'}
  assert isinstance(dora.lora_magnitude, nnx.LoRAParam) and dora.lora_magnitude[...].shape == (40,)


def test_bad_options():
  for bad in (dict(variant='vera'), dict(rank_scaling='sqrt')):
    with pytest.raises(ValueError, match=next(iter(bad))):
      LoRALinear(4, 4, rngs=nnx.Rngs(0), rank=2, **bad)


# --- rsLoRA --------------------------------------------------------------------------------------

def test_rslora_scale_and_forward():
  assert LoRALinear(8, 6, rank=4, alpha=6.0, rngs=nnx.Rngs(0)).scale == 1.5
  layer = LoRALinear(8, 6, rank=4, alpha=6.0, rank_scaling='rslora', rngs=nnx.Rngs(0))
  assert layer.rank_scaling == 'rslora' and layer.scale == pytest.approx(6.0 / math.sqrt(4))
  layer.lora_b[...] = jnp.asarray(_rand(1, (4, 6)))
  x = _rand(2, (3, 8)).astype(np.float64)
  w, a, b = (_params(layer, n) for n in ('kernel', 'lora_a', 'lora_b'))
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x, jnp.float32))), x @ w + 3.0 * (x @ a @ b),
                             rtol=1e-5, atol=1e-5)


# --- PiSSA ---------------------------------------------------------------------------------------

def test_pissa_factors_are_the_truncated_svd():
  w, rank, s = _rand(0, (20, 14)), 4, 0.5
  a, b, residual = (np.asarray(t, np.float64) for t in pissa_init(jnp.asarray(w), rank, s))
  u, sv, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
  principal = (u[:, :rank] * sv[:rank]) @ vt[:rank]
  np.testing.assert_allclose(s * a @ b, principal, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(residual + s * a @ b, w, rtol=1e-5, atol=1e-5)
  # A = U_r sqrt(S_r / s), B = sqrt(S_r / s) V_r^T (up to the singular vectors' signs).
  np.testing.assert_allclose(a.T @ a, np.diag(sv[:rank] / s), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(b @ b.T, np.diag(sv[:rank] / s), rtol=1e-4, atol=1e-4)


def test_randomized_pissa_is_close_to_exact_with_a_spectral_gap():
  rng = np.random.default_rng(1)
  u, _ = np.linalg.qr(rng.normal(size=(96, 96)))
  v, _ = np.linalg.qr(rng.normal(size=(64, 64)))
  spectrum = np.concatenate([np.linspace(10.0, 5.0, 8), np.full(56, 0.1)])
  w = jnp.asarray((u[:, :64] * spectrum) @ v.T, jnp.float32)
  a0, b0, _ = pissa_init(w, 8, 2.0)
  a1, b1, r1 = pissa_init(w, 8, 2.0, iters=4, key=jax.random.key(0))
  exact, randomized = np.asarray(a0 @ b0), np.asarray(a1 @ b1)
  assert np.linalg.norm(randomized - exact) < 1e-3 * np.linalg.norm(exact)
  np.testing.assert_allclose(np.asarray(r1 + 2.0 * a1 @ b1), np.asarray(w), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='key'):
    pissa_init(w, 8, 2.0, iters=2)


@pytest.mark.parametrize('variant', ['lora', 'dora'])
def test_init_pissa_keeps_the_layer_function(variant):
  layer = LoRALinear(24, 16, rank=4, alpha=8.0, variant=variant, rngs=nnx.Rngs(0),
                     kernel_init=nnx.initializers.normal(0.5))
  x = jnp.asarray(_rand(3, (6, 24)))
  w, before = _params(layer, 'kernel'), np.asarray(layer(x))
  layer.init_pissa()
  a, b = _params(layer, 'lora_a'), _params(layer, 'lora_b')
  np.testing.assert_allclose(_params(layer, 'kernel') + 2.0 * a @ b, w, rtol=1e-5, atol=1e-5)
  assert np.abs(b).max() > 0.1 and np.abs(_params(layer, 'kernel') - w).max() > 0.1  # really moved
  np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=1e-4, atol=1e-4)
  if variant == 'dora':
    np.testing.assert_allclose(_params(layer, 'lora_magnitude'), np.linalg.norm(w, axis=0), rtol=1e-5)


# --- merged kernel and merges --------------------------------------------------------------------

@pytest.mark.parametrize('variant', ['lora', 'dora'])
def test_output_is_x_times_merged_kernel(variant):
  layer = _dora_layer() if variant == 'dora' else LoRALinear(12, 9, rank=3, alpha=6.0, rngs=nnx.Rngs(0))
  layer.lora_b[...] = jnp.asarray(_rand(5, (3, 9)))
  x = _rand(6, (4, 12))
  merged = np.asarray(layer.merged_kernel(), np.float64)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), x @ merged, rtol=2e-5, atol=2e-5)
  w, a, b = (_params(layer, n).astype(np.float64) for n in ('kernel', 'lora_a', 'lora_b'))
  v = w + 2.0 * a @ b
  expected = v * (_params(layer, 'lora_magnitude') / np.linalg.norm(v, axis=0)) if variant == 'dora' else v
  np.testing.assert_allclose(merged, expected, rtol=1e-5, atol=1e-5)


def test_dora_merges_keep_the_function():
  layer, x = _dora_layer(), jnp.asarray(_rand(7, (4, 12)))
  before, magnitude = np.asarray(layer(x)), _params(layer, 'lora_magnitude')
  layer.merge()
  np.testing.assert_array_equal(_params(layer, 'lora_b'), 0.0)
  np.testing.assert_array_equal(_params(layer, 'lora_magnitude'), magnitude)
  np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=1e-5, atol=1e-5)
  # ReLoRA's merge inside the optimizer (zero learning rate: the merge is the whole update).
  layer = _dora_layer(seed=20)
  before = np.asarray(layer(x))
  params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  tx = relora(optax.sgd(0.0), 1, scale=layer.scale)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  nnx.update(layer, optax.apply_updates(params, updates))
  np.testing.assert_array_equal(_params(layer, 'lora_b'), 0.0)
  np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=1e-5, atol=1e-5)


# --- a quantized frozen base ---------------------------------------------------------------------

@pytest.mark.parametrize('variant', ['lora', 'dora'])
def test_quantized_base(variant):
  if variant == 'dora':
    layer = _dora_layer(128, 16, rank=4)
  else:
    layer = LoRALinear(128, 16, rank=4, alpha=6.0, rngs=nnx.Rngs(0))
  layer.lora_b[...] = jnp.asarray(_rand(30, (4, 16), 0.3))
  layer.kernel.set_value(quantized_base.quantize_base(layer.kernel[...], 4, double_quant=True))
  x, g = jnp.asarray(_rand(31, (8, 128))), jnp.asarray(_rand(32, (8, 16)))
  # The same layer with the dequantized kernel as a float Param: same outputs and adapter gradients.
  plain = nnx.clone(layer)
  plain.kernel.set_value(layer.kernel[...])
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(plain(x)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x) @ np.asarray(layer.merged_kernel()),
                             rtol=1e-4, atol=1e-4)
  adapter_grads = nnx.grad(lambda layer: jnp.sum(g * layer(x)), argnums=nnx.DiffState(0, nnx.LoRAParam))
  jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4),
               nnx.to_pure_dict(adapter_grads(layer)), nnx.to_pure_dict(adapter_grads(plain)))
  # The base product is frozen_matmul's (its backward keeps the codes, not a float kernel).
  assert 'custom_vjp_call' in str(jax.make_jaxpr(adapter_grads)(layer))
  with pytest.raises(ValueError, match='quantized'):
    layer.merge()


@pytest.mark.parametrize('variant', ['lora', 'dora'])
def test_pissa_on_a_quantized_base_requantizes_the_residual(variant):
  # A kernel with a strong low-rank part. PiSSA of the dequantized kernel cannot undo its 4-bit error
  # (that needs the float kernel, before quantizing: LoRA.prepare's order); it keeps the function up
  # to the error of re-quantizing a residual far smaller than the kernel.
  rng = np.random.default_rng(4)
  w = (rng.normal(size=(128, 4)) @ rng.normal(size=(4, 32)) + 0.05 * rng.normal(size=(128, 32))).astype(np.float32)
  layer = LoRALinear(128, 32, rank=4, alpha=8.0, variant=variant, rngs=nnx.Rngs(0))
  layer.kernel.set_value(quantized_base.quantize_base(jnp.asarray(w), 4, double_quant=True))
  if variant == 'dora':
    layer.init_magnitude()
  x = jnp.asarray(_rand(5, (16, 128)))
  before = np.asarray(layer(x))
  quantization_error = np.abs(before - np.asarray(x) @ w).max()
  layer.init_pissa()
  value = layer.kernel.get_value()
  assert quantized_base.is_quantized_base(value) and value.bits == 4 and value.scale_scale is not None
  assert np.abs(_params(layer, 'lora_b')).max() > 0.1
  change = np.abs(np.asarray(layer(x)) - before).max()
  assert change < 0.1 * quantization_error, (quantization_error, change)
  if variant == 'dora':  # the magnitude follows the re-quantized kernel: the layer is x @ (kernel + s A B)
    v = _params(layer, 'kernel').astype(np.float64) + 2.0 * _params(layer, 'lora_a') @ _params(layer, 'lora_b')
    np.testing.assert_allclose(_params(layer, 'lora_magnitude'), np.linalg.norm(v, axis=0), rtol=1e-6)


# --- LoRA+ ---------------------------------------------------------------------------------------

def _adapter_tree(seed=0):
  return {'q': {'kernel': jnp.asarray(_rand(seed, (8, 6))), 'lora_a': jnp.asarray(_rand(seed + 1, (8, 2))),
                'lora_b': jnp.asarray(_rand(seed + 2, (2, 6)))}, 'norm': {'scale': jnp.ones(6)}}


def test_lora_plus_scales_only_b():
  params, grads = _adapter_tree(0), _adapter_tree(10)
  base = optax.adamw(1e-2, weight_decay=0.1)
  plus = optax.chain(base, scale_lora_b(16.0))
  want, _ = base.update(grads, base.init(params), params)
  got, _ = plus.update(grads, plus.init(params), params)
  np.testing.assert_allclose(got['q']['lora_b'], 16.0 * np.asarray(want['q']['lora_b']), rtol=1e-6)
  for path in (('q', 'kernel'), ('q', 'lora_a'), ('norm', 'scale')):
    np.testing.assert_array_equal(got[path[0]][path[1]], want[path[0]][path[1]])
  one = optax.chain(base, scale_lora_b(1.0))
  same, _ = one.update(grads, one.init(params), params)
  jax.tree.map(np.testing.assert_array_equal, same, want)
  with pytest.raises(ValueError):
    scale_lora_b(0.0)


def _method(method='lora', **overrides):
  config = tiny_config(**{'optimizer.name': method, 'optimizer.lora.rank': 4, 'optimizer.lora.alpha': 8.0,
                          **overrides})
  return resolve(config)


def test_lora_plus_in_the_trainer_methods():
  params, grads = _adapter_tree(0), _adapter_tree(10)

  def updates(run):
    tx = run.method.build(run.optimizer, optax.constant_schedule(1e-2))
    state = tx.init(params)
    return tx.update(grads, state, params), state

  (plain, _), plain_state = updates(_method())
  (plus, _), plus_state = updates(_method(**{'optimizer.lora.b_lr_ratio': 4.0}))
  np.testing.assert_allclose(plus['q']['lora_b'], 4.0 * np.asarray(plain['q']['lora_b']), rtol=1e-6)
  np.testing.assert_array_equal(plus['q']['lora_a'], plain['q']['lora_a'])
  np.testing.assert_array_equal(plus['q']['kernel'], 0.0)
  # Ratio 1 (the default) adds nothing: the state is LoRA's AdamW state as before (checkpoints restore).
  run = _method()
  before = freeze_adapted_kernels(build_adamw(run.optimizer, optax.constant_schedule(1e-2))).init(params)
  assert jax.tree.structure(plain_state) == jax.tree.structure(before)
  assert jax.tree.structure(plus_state) != jax.tree.structure(before)
  # ReLoRA: LoRA+ inside, so its merge still zeroes B.
  run = _method('relora', **{'optimizer.lora.b_lr_ratio': 4.0, 'optimizer.relora.merge_every': 2,
                             'optimizer.relora.restart_warmup_steps': 1})
  tx = run.method.build(run.optimizer, optax.constant_schedule(1e-2))
  state, p = tx.init(params), params
  for _ in range(2):
    u, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, u)
  np.testing.assert_array_equal(p['q']['lora_b'], 0.0)


def test_adapters_alone_train_the_dora_magnitude():
  params = _adapter_tree(0)
  params['q']['lora_magnitude'] = jnp.ones(6)
  run = _method(**{'optimizer.lora.variant': 'dora', 'optimizer.lora.train_rest': False})
  tx = run.method.build(run.optimizer, optax.constant_schedule(1e-2))
  updates, _ = tx.update(_adapter_tree(10) | {'q': _adapter_tree(10)['q'] | {'lora_magnitude': jnp.ones(6)}},
                         tx.init(params), params)
  assert np.abs(np.asarray(updates['q']['lora_magnitude'])).min() > 0  # an adapter: trained
  np.testing.assert_array_equal(updates['norm']['scale'], 0.0)  # the rest: frozen
  np.testing.assert_array_equal(updates['q']['kernel'], 0.0)


# --- trainer settings ----------------------------------------------------------------------------

@pytest.mark.parametrize('method,overrides,key', [
    ('lora', {'optimizer.lora.variant': 'vera'}, 'optimizer.lora.variant'),
    ('lora', {'optimizer.lora.rank_scaling': 'sqrt'}, 'optimizer.lora.rank_scaling'),
    ('lora', {'optimizer.lora.init': 'gaussian'}, 'optimizer.lora.init'),
    ('lora', {'optimizer.lora.pissa_iters': -1}, 'optimizer.lora.pissa_iters'),
    ('lora', {'optimizer.lora.b_lr_ratio': 0.0}, 'optimizer.lora.b_lr_ratio'),
    ('relora', {'optimizer.lora.init': 'pissa'}, 'optimizer.lora.init'),
])
def test_bad_settings_name_their_key(method, overrides, key):
  with pytest.raises(ConfigError) as info:
    _method(method, **overrides)
  assert info.value.key == key


def test_settings_reach_the_layers_and_prepare_keeps_the_model():
  run = _method(**{'optimizer.lora.variant': 'dora', 'optimizer.lora.rank_scaling': 'rslora',
                   'optimizer.lora.init': 'pissa', 'optimizer.lora.pissa_iters': 2})
  assert run.method.scale == 4.0  # 8 / sqrt(4)
  relora_run = _method('relora', **{'optimizer.lora.variant': 'dora', 'optimizer.lora.rank_scaling': 'rslora'})
  assert relora_run.method.lora.scale == 4.0  # ReLoRA merges with the layers' scale
  model = build_model(run, 258, seed=0)
  layers = lora_layers(model)
  assert len(layers) == 2 * 7 and all(l.variant == 'dora' and l.scale == 4.0 for l in layers)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (2, 16)), jnp.int32)
  before, kernel = np.asarray(model(tokens)), _params(layers[0], 'kernel')
  run.method.prepare(model, seed=0)
  assert np.abs(_params(layers[0], 'kernel') - kernel).max() > 1e-3  # the principal part moved out
  np.testing.assert_allclose(np.asarray(model(tokens)), before, rtol=1e-5, atol=1e-5)
