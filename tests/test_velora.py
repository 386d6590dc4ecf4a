"""VeLoRA (lowrank_jax.nn.velora): exact forward / input grad, compressed weight grad, v init."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from lowrank_jax.nn.dense import Dense
from lowrank_jax.nn.velora import (
    VeLoRAInitialised,
    VeLoRALinear,
    VeLoRAVector,
    next_velora_vector,
    velora_matmul,
)

D, OUT = 16, 12


def _x(seed, shape=(2, 5, D), dtype=jnp.float32, shift=0.0):
  return (jax.random.normal(jax.random.key(seed), shape) + shift).astype(dtype)


def _unit(seed, n):
  u = np.asarray(jax.random.normal(jax.random.key(seed), (n,)), np.float64)
  return u / np.linalg.norm(u)


def _np_mean_direction(x, num_groups):
  x = np.asarray(x, np.float64)
  sub = x.reshape(-1, x.shape[-1] // num_groups)  # every sub-token of the batch
  mean = sub.mean(axis=0)
  return mean / np.linalg.norm(mean)


def _np_velora_kernel_grad(x, v, num_groups, dy, scale=1.0):
  """Independent reference: build x^ from the sub-token projections, then x^^T dy."""
  x = np.asarray(x, np.float64)
  v = np.asarray(v, np.float64)
  dy = np.asarray(dy, np.float64)
  d = x.shape[-1] // num_groups
  xg = x.reshape(-1, num_groups, d)
  s = xg @ v  # [tokens, G]
  x_hat = (s[:, :, None] * v[None, None, :]).reshape(-1, x.shape[-1])
  return scale * x_hat.T @ dy.reshape(-1, dy.shape[-1])


def _pair(seed=0, dtype=jnp.float32, **kw):
  kw.setdefault('num_groups', 4)
  vel = VeLoRALinear(D, OUT, dtype=dtype, rngs=nnx.Rngs(seed), **kw)
  dense = Dense(D, OUT, dtype=dtype, rngs=nnx.Rngs(seed))
  return vel, dense


def _grads(module, x, dy):
  """(dkernel, dx) of <module(x), dy> via the NNX split/merge pattern.

  ``rest`` goes in as plain data (a pure dict, as in the trainer): NNX refuses to
  mutate a Variable (v) created outside the trace that mutates it.
  """
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  rest = nnx.to_pure_dict(rest)

  def f(params, x, rest):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x).astype(jnp.float32) * dy)

  dparams, dx = jax.grad(f, argnums=(0, 1))(params, x, rest)
  return dparams['kernel'][...], dx


# ---------------------------------------------------------------------------
# Exactness of the forward / input gradient, and the compressed weight gradient.


@pytest.mark.parametrize('shape', [(2, 5, D), (7, D), (D,)])
def test_forward_identical_to_dense(shape):
  vel, dense = _pair()
  assert np.array_equal(vel.kernel[...], dense.kernel[...])  # same key, same init
  x = _x(1, shape)
  y = vel(x)
  assert y.dtype == dense(x).dtype == jnp.float32
  assert np.array_equal(y, dense(x))


def test_input_grad_exact_and_kernel_grad_matches_numpy():
  vel, dense = _pair(num_groups=4, scale=0.5)
  x = _x(2)
  dy = jax.random.normal(jax.random.key(3), (2, 5, OUT))
  vel(x)  # initialise v from this batch (it is then fixed)
  v = np.asarray(vel.v[...])
  dk, dx = _grads(vel, x, dy)
  dk_dense, dx_dense = _grads(dense, x, dy)
  np.testing.assert_array_equal(dx, dx_dense)
  np.testing.assert_allclose(dk, _np_velora_kernel_grad(x, v, 4, dy, scale=0.5),
                             rtol=1e-5, atol=1e-5)
  # ... and it really is compressed (not the plain gradient).
  assert not np.allclose(dk, 0.5 * np.asarray(dk_dense), atol=1e-3)


def test_functional_core_on_any_input():
  # E.g. a LoRA A input: x [B, T, D] @ A [D, r]; v of size D / G; grads wrt x and A.
  x = _x(4, (3, 4, 24))
  a = jax.random.normal(jax.random.key(5), (24, 3))
  v = jnp.asarray(_unit(6, 8), jnp.float32)
  dy = jax.random.normal(jax.random.key(7), (3, 4, 3))
  y, vjp = jax.vjp(lambda x, a: velora_matmul(x, a, v, 3, 2.0), x, a)
  assert np.array_equal(y, jnp.dot(x, a))
  dx, da = vjp(dy)
  np.testing.assert_allclose(dx, dy @ a.T, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(da, _np_velora_kernel_grad(x, v, 3, dy, 2.0), rtol=1e-5, atol=1e-5)
  # Under jit too (num_groups / scale are static Python values, not nondiff arrays).
  g = jax.jit(jax.grad(lambda a, x, v: jnp.sum(velora_matmul(x, a, v, 3, 2.0) * dy)))(a, x, v)
  np.testing.assert_allclose(g, da, rtol=1e-6, atol=1e-6)


def test_residuals_are_only_the_scalars():
  x = _x(8, (4, 6, D))
  k = jax.random.normal(jax.random.key(9), (D, OUT))
  v = jnp.asarray(_unit(10, D // 4), jnp.float32)
  _, vjp = jax.vjp(lambda x, k: velora_matmul(x, k, v, 4), x, k)
  shapes = sorted(tuple(r.shape) for r in jax.tree.leaves(vjp))
  assert shapes == sorted([(4, 4 * 6), (D, OUT), (D // 4,)])  # s [G, tokens], kernel, v: no x


@pytest.mark.parametrize('v_init', ['batch_average_once', 'batch_average', 'random'])
def test_module_residuals_are_only_the_scalars(v_init):
  # The v update (batch mean of x) must not make x a residual either.
  vel = VeLoRALinear(D, OUT, num_groups=4, v_init=v_init, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(vel, nnx.Param, ...)

  def f(x, params, rest):
    m = nnx.merge(graphdef, params, rest)
    return m(x), nnx.to_pure_dict(nnx.split(m, nnx.Param, ...)[2])

  x = _x(19, (4, 6, D))
  _, vjp, _ = jax.vjp(f, x, params, nnx.to_pure_dict(rest), has_aux=True)
  shapes = sorted(tuple(r.shape) for r in jax.tree.leaves(vjp))
  assert shapes == sorted([(4, 4 * 6), (D, OUT), (D // 4,)])


def test_sub_token_size_one_with_unit_v_is_exact():
  vel, dense = _pair(num_groups=D, v_init='random')
  vel.v[...] = jnp.ones((1,), jnp.float32)
  x = _x(11)
  dy = jax.random.normal(jax.random.key(12), (2, 5, OUT))
  dk, dx = _grads(vel, x, dy)
  dk_dense, dx_dense = _grads(dense, x, dy)
  np.testing.assert_array_equal(dk, dk_dense)
  np.testing.assert_array_equal(dx, dx_dense)


def test_scale_only_scales_kernel_grad():
  x = _x(13)
  dy = jax.random.normal(jax.random.key(14), (2, 5, OUT))
  k = jax.random.normal(jax.random.key(15), (D, OUT))
  v = jnp.asarray(_unit(16, 4), jnp.float32)
  g1 = jax.grad(lambda x, k: jnp.sum(velora_matmul(x, k, v, 4, 1.0) * dy), (0, 1))(x, k)
  g3 = jax.grad(lambda x, k: jnp.sum(velora_matmul(x, k, v, 4, 3.0) * dy), (0, 1))(x, k)
  np.testing.assert_array_equal(g1[0], g3[0])
  np.testing.assert_allclose(g3[1], 3.0 * g1[1], rtol=1e-6)


def test_bfloat16():
  vel, dense = _pair(dtype=jnp.bfloat16, num_groups=4)
  x = _x(17, dtype=jnp.bfloat16, shift=0.5)
  y = vel(x)
  assert y.dtype == jnp.bfloat16
  assert np.array_equal(np.asarray(y, np.float32), np.asarray(dense(x), np.float32))
  assert vel.v[...].dtype == jnp.float32
  np.testing.assert_allclose(vel.v[...], _np_mean_direction(x, 4), rtol=1e-5, atol=1e-6)
  dy = jax.random.normal(jax.random.key(18), (2, 5, OUT))
  dk, dx = _grads(vel, x, dy)
  dk_dense, dx_dense = _grads(dense, x, dy)
  assert dk.dtype == jnp.float32 and dx.dtype == jnp.bfloat16  # kernel is f32, x is bf16
  np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_dense, np.float32))
  ref = _np_velora_kernel_grad(np.asarray(x, np.float32), vel.v[...], 4,
                               np.asarray(dy.astype(jnp.bfloat16), np.float32))
  np.testing.assert_allclose(dk, ref, rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------------
# v initialisation.


def test_batch_average_once():
  vel, _ = _pair(num_groups=4)
  assert isinstance(vel.v, VeLoRAVector) and isinstance(vel.initialised, VeLoRAInitialised)
  assert int(vel.initialised[...]) == 0
  np.testing.assert_allclose(np.linalg.norm(vel.v[...]), 1.0, rtol=1e-6)
  x1, x2 = _x(20, shift=1.0), _x(21, shift=-2.0)
  vel(x1)
  assert int(vel.initialised[...]) == 1
  np.testing.assert_allclose(vel.v[...], _np_mean_direction(x1, 4), rtol=1e-5, atol=1e-6)
  v1 = np.asarray(vel.v[...])
  vel(x2)
  np.testing.assert_array_equal(vel.v[...], v1)  # fixed after the first batch


def test_batch_average_follows_each_batch():
  vel, _ = _pair(num_groups=2, v_init='batch_average')
  for seed, shift in ((22, 1.0), (23, -2.0)):
    x = _x(seed, (3, 4, D), shift=shift)
    vel(x)
    np.testing.assert_allclose(vel.v[...], _np_mean_direction(x, 2), rtol=1e-5, atol=1e-6)


def test_random_is_unit_and_fixed():
  vel, _ = _pair(num_groups=2, v_init='random')
  v0 = np.asarray(vel.v[...])
  assert v0.shape == (D // 2,) and int(vel.initialised[...]) == 1
  np.testing.assert_allclose(np.linalg.norm(v0), 1.0, rtol=1e-6)
  assert (v0 >= 0).all()  # the official normalize(rand(d)) distribution
  vel(_x(24, shift=3.0))
  np.testing.assert_array_equal(vel.v[...], v0)
  other, _ = _pair(seed=1, num_groups=2, v_init='random')
  assert not np.allclose(other.v[...], v0)


def test_zero_batch_does_not_initialise():
  v = jnp.asarray(_unit(25, 4), jnp.float32)
  new_v, flag = next_velora_vector(jnp.zeros((3, D)), v, jnp.int32(0), 4, 'batch_average_once')
  np.testing.assert_array_equal(new_v, v)
  assert int(flag) == 0


def test_sub_token_size_and_validation():
  vel = VeLoRALinear(24, 4, sub_token_size=8, rngs=nnx.Rngs(0))
  assert vel.num_groups == 3 and vel.sub_token_size == 8 and vel.v[...].shape == (8,)
  assert VeLoRALinear(64, 4, rngs=nnx.Rngs(0)).num_groups == 32  # official default
  with pytest.raises(ValueError, match='divisible by num_groups'):
    VeLoRALinear(24, 4, num_groups=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='divisible by sub_token_size'):
    VeLoRALinear(24, 4, sub_token_size=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='only one of'):
    VeLoRALinear(24, 4, num_groups=3, sub_token_size=8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='v_init'):
    VeLoRALinear(24, 4, num_groups=3, v_init='svd', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='divisible'):
    velora_matmul(jnp.ones((2, 24)), jnp.ones((24, 4)), jnp.ones(5), 5)


# ---------------------------------------------------------------------------
# jit / grad with the trainer's split-merge pattern, and checkpointing of v.


class _MLP(nnx.Module):

  def __init__(self, rngs):
    self.up = Dense(D, 32, rngs=rngs)
    self.down = VeLoRALinear(32, D, num_groups=8, rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


def test_jit_grad_split_merge_returns_new_rest():
  model = _MLP(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert set(nnx.to_pure_dict(rest)['down']) == {'v', 'initialised'}  # v lives in `rest`
  assert 'v' not in nnx.to_pure_dict(params)['down']

  rest = nnx.to_pure_dict(rest)  # plain data into the differentiated function

  def loss_fn(params, rest, x):
    m = nnx.merge(graphdef, params, rest)
    loss = jnp.mean(m(x) ** 2)
    return loss, nnx.to_pure_dict(nnx.split(m, nnx.Param, ...)[2])

  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  x1, x2 = _x(30, (2, 6, D), shift=0.3), _x(31, (2, 6, D), shift=-1.0)
  (loss, rest1), grads = step(params, rest, x1)
  assert int(rest1['down']['initialised']) == 1
  h1 = jax.nn.gelu(x1 @ params['up']['kernel'][...])
  np.testing.assert_allclose(rest1['down']['v'], _np_mean_direction(h1, 8),
                             rtol=1e-5, atol=1e-6)
  # Same numbers as the eager (un-jitted) computation.
  (loss_e, _), grads_e = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x1)
  np.testing.assert_allclose(loss, loss_e, rtol=1e-6)
  for g, ge in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_e)):
    np.testing.assert_allclose(g, ge, rtol=1e-5, atol=1e-7)
  # The kernel gradient of `down` is the compressed one.
  y = h1 @ params['down']['kernel'][...]
  dy = 2 * np.asarray(y) / y.size
  np.testing.assert_allclose(grads['down']['kernel'][...],
                             _np_velora_kernel_grad(h1, rest1['down']['v'], 8, dy),
                             rtol=1e-4, atol=1e-7)
  # A later batch keeps v (batch_average_once).
  (_, rest2), _ = step(params, rest1, x2)
  np.testing.assert_array_equal(rest2['down']['v'], rest1['down']['v'])


@pytest.mark.parametrize('remat', [False, True])
def test_tiny_llama_trainer_split(remat):
  from lowrank_jax.models.llama import Llama, LlamaConfig
  from lowrank_jax.train.model import split_model

  def factory(name, in_features, out_features, **kw):
    if name in ('v', 'down'):
      return VeLoRALinear(in_features, out_features, sub_token_size=8, **kw)
    return Dense(in_features, out_features, **kw)

  cfg = LlamaConfig(vocab_size=64, d_model=32, d_ff=48, n_heads=2, n_layers=1, max_seq_len=16,
                    remat=remat)
  model = Llama(cfg, linear_factory=factory, rngs=nnx.Rngs(0))
  split, params, rest = split_model(model)
  assert rest['layers'][0]['attn']['v']['v'].shape == (8,)
  assert rest['layers'][0]['mlp']['down']['v'].shape == (8,)

  def loss_fn(params, rest, tokens):
    m = split.merge(params, rest)
    return jnp.mean(m(tokens) ** 2), split.rest_of(m)

  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
  (loss, new_rest), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, rest, tokens)
  assert np.isfinite(loss)
  assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
  for path in (('attn', 'v'), ('mlp', 'down')):
    layer = new_rest['layers'][0][path[0]][path[1]]
    assert int(layer['initialised']) == 1
    np.testing.assert_allclose(np.linalg.norm(layer['v']), 1.0, rtol=1e-5)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_orbax_roundtrip_of_v(tmp_path):
  model = _MLP(nnx.Rngs(0))
  model(_x(32, (2, 3, D), shift=0.5))  # initialise v
  _, _, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.to_pure_dict(rest)
  path = os.path.join(tmp_path, 'rest')
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, rest)
    ckpt.wait_until_finished()
    restored = ckpt.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, rest))
  assert jax.tree.structure(restored) == jax.tree.structure(rest)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(rest)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  # Restored into a fresh model, v is used as is (not re-initialised).
  fresh = _MLP(nnx.Rngs(1))
  nnx.update(fresh, restored)
  np.testing.assert_array_equal(fresh.down.v[...], model.down.v[...])
  fresh(_x(33, (2, 3, D), shift=-3.0))
  np.testing.assert_array_equal(fresh.down.v[...], model.down.v[...])


# ---------------------------------------------------------------------------
# Memory: the compressed input is not kept for backward.


def grad_temp_bytes(fn, *args) -> int:
  """temp_size_in_bytes of the compiled grad (w.r.t. the first argument) of ``fn``."""
  compiled = jax.jit(jax.grad(fn)).lower(*args).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def test_compiled_grad_temp_memory_drops():
  tokens, d, f, layers, groups = 1024, 64, 512, 3, 16
  key = jax.random.key(40)
  w1 = [jax.random.normal(jax.random.fold_in(key, i), (d, f)) / 8 for i in range(layers)]
  w2 = [jax.random.normal(jax.random.fold_in(key, 100 + i), (f, d)) / 23 for i in range(layers)]
  x = jax.random.normal(jax.random.key(41), (tokens, d))
  v = jnp.asarray(_unit(42, f // groups), jnp.float32)

  def chain(matmul):
    def loss(weights, x):
      h = x
      for a, b in zip(*weights):
        h = h + matmul(jax.nn.gelu(h @ a), b)  # gelu output: consumed only by the 2nd matmul
      return jnp.sum(h ** 2)
    return loss

  plain = grad_temp_bytes(chain(jnp.dot), (w1, w2), x)
  velora = grad_temp_bytes(chain(lambda h, b: velora_matmul(h, b, v, groups)), (w1, w2), x)
  saved = layers * tokens * f * 4  # one f32 [tokens, f] activation per layer
  print(f'grad temp bytes: plain {plain}, velora {velora}, drop {plain - velora} '
        f'({(plain - velora) / plain:.0%}); gelu outputs {saved}')
  assert velora < plain
  assert plain - velora >= 0.5 * saved
