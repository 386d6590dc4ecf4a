"""Tests of lowrank_jax.nn.lora.LoRALinear."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowrank_jax.nn.dense import Dense
from lowrank_jax.nn.lora import LoRALinear, lora_a_bound, lora_a_init


def _rand(seed, shape, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def _layer(in_f=8, out_f=6, rank=3, alpha=6.0, **kw):
  return LoRALinear(in_f, out_f, rank=rank, alpha=alpha, rngs=nnx.Rngs(0), **kw)


def test_attributes_and_shapes():
  layer = _layer(8, 6, rank=3, alpha=6.0)
  assert (layer.in_features, layer.out_features, layer.rank) == (8, 6, 3)
  assert layer.alpha == 6.0 and layer.scale == 2.0
  assert layer.kernel[...].shape == (8, 6)
  assert layer.lora_a[...].shape == (8, 3)
  assert layer.lora_b[...].shape == (3, 6)
  assert isinstance(layer.kernel, nnx.Param) and not isinstance(layer.kernel, nnx.LoRAParam)
  assert isinstance(layer.lora_a, nnx.LoRAParam) and isinstance(layer.lora_b, nnx.LoRAParam)
  np.testing.assert_array_equal(layer.lora_b[...], 0.0)
  assert np.all(np.asarray(layer.lora_a[...]) != 0.0)  # not the both-zero official bug
  # The params dict the trainer sees: kernel / lora_a / lora_b side by side.
  params = nnx.to_pure_dict(nnx.state(layer, nnx.Param))
  assert set(params) == {'kernel', 'lora_a', 'lora_b'}
  # No dropout -> no RNG state in the module.
  assert not jax.tree.leaves(nnx.state(layer, nnx.RngState))


def test_factory_compatible_signature_and_validation():
  init = nnx.initializers.normal(0.02)
  layer = LoRALinear(16, 4, dtype=jnp.bfloat16, param_dtype=jnp.float32, kernel_init=init,
                     rngs=nnx.Rngs(1), rank=2, alpha=4, dropout=0.0)
  y = layer(jnp.ones((2, 16)))
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 4)
  assert layer.kernel[...].dtype == jnp.float32 and layer.lora_a[...].dtype == jnp.float32
  for bad in (dict(rank=0), dict(rank=2.5), dict(alpha=0), dict(alpha=-1.0),
              dict(dropout=1.0), dict(dropout=-0.1)):
    kw = dict(rank=2, alpha=4.0)
    kw.update(bad)
    with pytest.raises(ValueError):
      LoRALinear(4, 4, rngs=nnx.Rngs(0), **kw)


def test_b_zero_equals_base_linear_exactly():
  init = nnx.initializers.normal(0.5)
  for dtype in (jnp.float32, jnp.bfloat16):
    dense = Dense(12, 7, dtype=dtype, kernel_init=init, rngs=nnx.Rngs(3))
    lora = LoRALinear(12, 7, dtype=dtype, kernel_init=init, rngs=nnx.Rngs(3), rank=4, alpha=8)
    np.testing.assert_array_equal(lora.kernel[...], dense.kernel[...])  # same first key
    x = jnp.asarray(_rand(0, (5, 3, 12)))
    y_dense, y_lora = dense(x), lora(x)
    assert y_lora.dtype == y_dense.dtype
    np.testing.assert_array_equal(np.asarray(y_lora, np.float32), np.asarray(y_dense, np.float32))


def test_output_matches_numpy():
  layer = _layer(10, 7, rank=3, alpha=12.0)
  w, a, b = _rand(1, (10, 7)), _rand(2, (10, 3)), _rand(3, (3, 7))
  layer.kernel[...] = jnp.asarray(w)
  layer.lora_a[...] = jnp.asarray(a)
  layer.lora_b[...] = jnp.asarray(b)
  x = _rand(4, (4, 10))
  expected = x.astype(np.float64) @ w + 4.0 * (x.astype(np.float64) @ a @ b)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_merge_preserves_function_and_zeroes_b():
  layer = _layer(10, 7, rank=3, alpha=12.0)
  layer.lora_b[...] = jnp.asarray(_rand(5, (3, 7)))
  x = jnp.asarray(_rand(6, (4, 10)))
  before = np.asarray(layer(x))
  a_before = np.asarray(layer.lora_a[...])
  layer.merge()
  np.testing.assert_array_equal(layer.lora_b[...], 0.0)
  np.testing.assert_array_equal(layer.lora_a[...], a_before)  # kept without rngs
  np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=1e-5, atol=1e-5)
  # With rngs: merge and re-init A (still the same function since B == 0).
  layer.lora_b[...] = jnp.asarray(_rand(7, (3, 7)))
  before = np.asarray(layer(x))
  layer.merge(rngs=nnx.Rngs(9))
  assert not np.allclose(np.asarray(layer.lora_a[...]), a_before)
  assert np.abs(np.asarray(layer.lora_a[...])).max() <= lora_a_bound(10)
  np.testing.assert_allclose(np.asarray(layer(x)), before, rtol=1e-5, atol=1e-5)


def test_a_init_is_kaiming_uniform_sqrt5():
  # torch.nn.init.kaiming_uniform_(w, a=sqrt(5)) with fan_in = in_features:
  fan_in = 256
  gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
  bound = gain * math.sqrt(3.0 / fan_in)
  assert lora_a_bound(fan_in) == pytest.approx(bound)
  assert bound == pytest.approx(1 / math.sqrt(fan_in))
  layer = LoRALinear(fan_in, 8, rank=64, alpha=1.0, rngs=nnx.Rngs(0))
  a = np.asarray(layer.lora_a[...]).ravel()  # 16384 samples of U(-b, b)
  assert np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.99 * bound
  assert abs(a.mean()) < 4 * bound / math.sqrt(3 * a.size)
  assert a.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
  # Fraction in [-b/2, b/2] is 1/2 for a uniform (a normal would give ~0.8).
  assert np.mean(np.abs(a) < bound / 2) == pytest.approx(0.5, abs=0.02)
  # lora_a_init uses the fan-in of the (..., in, r) factor.
  stacked = lora_a_init(jax.random.PRNGKey(0), (3, 100, 4))
  assert float(jnp.abs(stacked).max()) <= 0.1


def _loss(layer, x, y):
  return jnp.mean((layer(x) - y) ** 2)


def test_gradients_reach_both_factors_and_kernel_is_frozen():
  layer = _layer(8, 6, rank=2, alpha=4.0)
  x, y = jnp.asarray(_rand(0, (16, 8))), jnp.asarray(_rand(1, (16, 6)))
  grads = nnx.grad(_loss)(layer, x, y)
  # Step 0: B gets a gradient (A != 0); A's gradient is B^T-weighted, so 0 now.
  assert float(jnp.abs(grads.lora_b[...]).max()) > 0
  np.testing.assert_array_equal(grads.kernel[...], 0.0)  # stop_gradient by default
  # One optimizer step on the LoRA params moves B, then A gets a gradient too.
  opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.LoRAParam)
  opt.update(layer, nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer, x, y))
  assert float(jnp.abs(layer.lora_b[...]).max()) > 0
  grads = nnx.grad(_loss)(layer, x, y)
  assert float(jnp.abs(grads.lora_a[...]).max()) > 0
  assert float(jnp.abs(grads.lora_b[...]).max()) > 0
  # freeze_kernel=False trains the kernel as well.
  joint = _layer(8, 6, rank=2, alpha=4.0, freeze_kernel=False)
  assert float(jnp.abs(nnx.grad(_loss)(joint, x, y).kernel[...]).max()) > 0


def test_dropout():
  layer = _layer(8, 6, rank=2, alpha=4.0, dropout=0.5)
  assert jax.tree.leaves(nnx.state(layer, nnx.RngState))  # carries a dropout stream
  layer.lora_b[...] = jnp.asarray(_rand(0, (2, 6)))
  x = jnp.asarray(_rand(1, (4, 8)))
  det = np.asarray(layer(x, deterministic=True))
  ref = _layer(8, 6, rank=2, alpha=4.0)
  nnx.update(ref, nnx.state(layer, nnx.Param))
  np.testing.assert_allclose(det, np.asarray(ref(x)), rtol=1e-6)
  out1, out2 = np.asarray(layer(x)), np.asarray(layer(x))  # stored stream advances
  assert not np.allclose(out1, det) and not np.allclose(out1, out2)
  # Call-time rngs take precedence and are reproducible.
  k1 = np.asarray(layer(x, rngs=nnx.Rngs(dropout=5)))
  k2 = np.asarray(layer(x, rngs=nnx.Rngs(dropout=5)))
  np.testing.assert_array_equal(k1, k2)
  # Dropout only touches the adapter path: with B == 0 the output is the base one.
  layer.lora_b[...] = jnp.zeros((2, 6))
  np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(x @ layer.kernel[...]))
