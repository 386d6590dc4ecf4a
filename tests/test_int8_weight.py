"""int8 trainable weights (`model.weight_bits=8`, lowrank_jax/nn/int8_weight.py): rounding against
numpy, gradients and updates against float weights, the documented Optax loop. The trainer with
int8 weights: tests/test_int8_train.py."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.nn import int8_weight

SEEDS = 512  # draws of the stochastic rounding behind each mean


def _codes_between(rng, scales, rows):
  """[rows, cols] float32 values strictly between int8 codes (fractions in [0.1, 0.9]), whose column
  absmax is exactly 127 steps (row 0), so absmax / 127 gives back `scales`."""
  k = rng.integers(-126, 126, size=(rows, scales.size))
  frac = rng.uniform(0.1, 0.9, size=(rows, scales.size))
  x = ((k + frac) * scales).astype(np.float32)
  x[0] = 127 * scales * np.where(rng.random(scales.size) < 0.5, -1, 1)
  return x


def _expect_unbiased(draws, target, scale):
  """`draws` [seeds, rows, cols]: stochastic roundings of `target` [rows, cols] on the grid `scale`
  [rows, cols] (numpy). Each mean within 4.5 standard errors of the target, computed from the two
  neighbouring codes (probability of the upper one: the fraction p; std scale * sqrt(p (1 - p)))."""
  target, scale = np.asarray(target, np.float64), np.asarray(scale, np.float64)
  y = target / scale
  lower = np.floor(y)
  p = y - lower
  between = (p > 0.01) & (p < 0.99)
  assert between.sum() > 0.9 * p.size
  assert np.all(np.isin((np.round(draws / scale) - lower)[:, between], (0, 1)))  # only the two neighbours
  se = scale * np.sqrt(p * (1 - p)) / np.sqrt(draws.shape[0])
  mean = draws.mean(axis=0)
  z = (mean - target) / np.maximum(se, 1e-12)
  assert np.all(np.abs(mean - target)[between] <= 4.5 * se[between] + 1e-6 * scale[between]), np.abs(z).max()
  # Over all elements: the z-scores' mean is 0 within 4 of its standard errors, their spread about 1
  # (a dither that is not uniform on [0, 1) shows here even where each element passes).
  zb = z[between]
  assert abs(zb.mean()) < 4 / np.sqrt(zb.size), zb.mean()
  assert 0.85 < zb.std() < 1.15, zb.std()


# --- rounding --------------------------------------------------------------------------------

def test_stochastic_rounding_is_unbiased_and_keyed_by_the_seed():
  rng = np.random.default_rng(0)
  scales = rng.uniform(0.001, 0.05, size=24).astype(np.float32)
  x = _codes_between(rng, scales, rows=48)
  scale = np.abs(x).max(axis=0) / np.float32(127)  # independent: absmax / 127 per column
  q = jax.jit(jax.vmap(lambda s: int8_weight.quantize(jnp.asarray(x), seed=s)))(jnp.arange(SEEDS, dtype=jnp.uint32))
  np.testing.assert_allclose(np.asarray(q.scale[0, 0]), scale, rtol=1e-6)
  draws = np.asarray(q.codes, np.float64) * np.asarray(q.scale, np.float64)
  _expect_unbiased(draws, x, np.broadcast_to(scale, x.shape))
  # Reproducible: one seed, one set of codes, bitwise; another seed, other roundings.
  a, b = (int8_weight.quantize(jnp.asarray(x), seed=jnp.uint32(7)) for _ in range(2))
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(q.codes[7]))
  other = int8_weight.quantize(jnp.asarray(x), seed=jnp.uint32(8))
  assert 0.2 < np.mean(np.asarray(other.codes) != np.asarray(a.codes)) < 0.8


def _numpy_scales(w, block_size, axis):
  """Each element's step, absmax / 127 of its block (`block_size` elements along `axis`; None: all)."""
  t = w if axis == 0 else w.T
  scale = np.empty_like(t)
  size = t.shape[0] if block_size is None else block_size
  for start in range(0, t.shape[0], size):
    scale[start:start + size] = np.abs(t[start:start + size]).max(axis=0) / np.float32(127)
  return scale if axis == 0 else scale.T


@pytest.mark.parametrize("block_size", [None, 64])
@pytest.mark.parametrize("axis", [0, 1])
def test_round_to_nearest_is_within_half_a_step(block_size, axis):
  rng = np.random.default_rng(1)
  w = rng.normal(size=(100, 24)).astype(np.float32)
  w[:64] *= 0.01  # rows 0-63: their steps are a hundred times finer than their columns'
  w = w if axis == 0 else np.ascontiguousarray(w.T)  # (along axis 1: 100 columns, blocks of 64 and 36)
  q = int8_weight.quantize(jnp.asarray(w), block_size, axis=axis)
  got = np.asarray(q.dequantize())
  scale = _numpy_scales(w, block_size, axis)
  blocks = 1 if block_size is None else 2
  assert q.codes.dtype == jnp.int8 and q.scale.shape == ((blocks, 24) if axis == 0 else (24, blocks))
  starts = [0] if block_size is None else [0, 64]  # each block's first element carries its scale
  np.testing.assert_allclose(np.asarray(q.scale), scale[starts, :] if axis == 0 else scale[:, starts], rtol=1e-6)
  assert np.all(np.abs(got - w) <= scale / 2 * (1 + 1e-5))
  assert np.abs(got - w).max() > 0  # (not vacuous: the weights are not on the grid)


# --- gradients and updates ---------------------------------------------------------------------

def _mlp(rng):
  return {"l1": {"kernel": rng.normal(size=(8, 16)).astype(np.float32) * 0.5,
                 "bias": rng.normal(size=(16,)).astype(np.float32) * 0.1},
          "l2": {"kernel": rng.normal(size=(16, 4)).astype(np.float32) * 0.5,
                 "bias": rng.normal(size=(4,)).astype(np.float32) * 0.1}}


def _mlp_loss(params, x, y):
  h = jnp.tanh(x @ params["l1"]["kernel"][...] + params["l1"]["bias"])
  out = h @ params["l2"]["kernel"][...] + params["l2"]["bias"]
  return jnp.mean(jnp.square(out - y)), out


def test_value_and_grad_equals_the_gradient_of_the_dequantized_weights():
  rng = np.random.default_rng(2)
  params = int8_weight.quantize_tree(jax.tree.map(jnp.asarray, _mlp(rng)))
  assert int8_weight.is_int8(params["l1"]["kernel"]) and not int8_weight.is_int8(params["l1"]["bias"])
  x, y = rng.normal(size=(32, 8)).astype(np.float32), rng.normal(size=(32, 4)).astype(np.float32)
  floats = int8_weight.float_view(params)
  (loss, out), grads = jax.jit(int8_weight.value_and_grad(_mlp_loss, has_aux=True))(params, x, y)
  (ref_loss, ref_out), ref = jax.value_and_grad(_mlp_loss, has_aux=True)(floats, x, y)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-7)
  assert jax.tree.structure(grads) == jax.tree.structure(floats)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
    assert g.dtype == r.dtype and g.shape == r.shape and np.abs(r).max() > 0
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)
  plain_loss, plain = int8_weight.value_and_grad(lambda p, x, y: _mlp_loss(p, x, y)[0])(params, x, y)
  np.testing.assert_allclose(plain_loss, ref_loss, rtol=1e-6)
  np.testing.assert_allclose(plain["l2"]["kernel"], ref["l2"]["kernel"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("remat", ["none", "block"])
def test_a_llamas_gradients_through_int8_weights_are_the_float_models(remat):
  """Through the whole model (the attention behind its optimization barrier, remat): every weight's
  gradient equals that of the same loss on the dequantized weights."""
  from flax import nnx

  from lowrank_jax.models import Llama, llama_config
  from lowrank_jax.train.model import split_model

  config = llama_config("tiny", 64, max_seq_len=16, remat=remat)
  split, params, rest = split_model(Llama(config, rngs=nnx.Rngs(0)))
  params = int8_weight.quantize_tree(params)
  assert sum(map(int8_weight.is_int8, jax.tree.leaves(params, is_leaf=int8_weight.is_int8))) == 16
  tokens = jnp.asarray(np.random.default_rng(7).integers(0, 64, (2, 16)), jnp.int32)

  def loss(p):
    logits = split.merge(p, rest)(tokens).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  value, grads = jax.jit(int8_weight.value_and_grad(loss))(params)
  ref_value, ref = jax.jit(jax.value_and_grad(loss))(int8_weight.float_view(params))
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  flat, ref_flat = (dict(jax.tree_util.tree_flatten_with_path(t)[0]) for t in (grads, ref))
  assert flat.keys() == ref_flat.keys()
  for path, r in ref_flat.items():
    assert np.abs(r).max() > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(flat[path], r, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def _int8(codes, scale, block_size=None, axis=0):
  return int8_weight.Int8Weight(jnp.asarray(codes, jnp.int8), jnp.asarray(scale, jnp.float32), dtype="float32",
                                block_size=block_size, axis=axis)


@pytest.mark.parametrize("block_size", [None, 64])
@pytest.mark.parametrize("axis", [0, 1])
def test_a_zero_update_leaves_codes_and_scales_bit_identical(block_size, axis):
  rng = np.random.default_rng(3)
  n, m = 100, 6  # n along the scaled axis
  blocks = 1 if block_size is None else 2
  shape, scale_shape = ((n, m), (blocks, m)) if axis == 0 else ((m, n), (m, blocks))
  # Codes well inside [-127, 127]: requantizing would rescale them, so only the mask keeps them.
  w = _int8(rng.integers(-50, 51, size=shape), rng.uniform(0.01, 0.1, size=scale_shape), block_size, axis)
  bias = jnp.asarray(rng.normal(size=(m,)), jnp.float32)
  zeros = jax.tree.map(jnp.zeros_like, int8_weight.float_view({"w": w, "b": bias}))
  for seed in range(3):
    out = int8_weight.apply_updates({"w": w, "b": bias}, zeros, jnp.uint32(seed))
    np.testing.assert_array_equal(np.asarray(out["w"].codes), np.asarray(w.codes))
    np.testing.assert_array_equal(np.asarray(out["w"].scale), np.asarray(w.scale))
  # An update in one block of one line (column for axis 0, row for axis 1) requantizes that block only.
  upd, touched, kept = np.zeros((n, m), np.float32), np.zeros((n, m), bool), np.ones((blocks, m), bool)
  upd[70:75, 2] = 0.3
  touched[(slice(None) if block_size is None else slice(64, n)), 2] = True
  kept[blocks - 1, 2] = False
  if axis == 1:
    upd, touched, kept = upd.T, touched.T, kept.T
  out = int8_weight.apply_updates({"w": w}, {"w": jnp.asarray(upd)}, jnp.uint32(0))["w"]
  np.testing.assert_array_equal(np.asarray(out.codes)[~touched], np.asarray(w.codes)[~touched])
  assert np.any(np.asarray(out.codes)[touched] != np.asarray(w.codes)[touched])
  np.testing.assert_array_equal(np.asarray(out.scale)[kept], np.asarray(w.scale)[kept])


def test_an_update_is_kept_in_expectation_and_float_leaves_are_optax():
  rng = np.random.default_rng(4)
  rows, cols = 40, 12
  w = _int8(rng.integers(-127, 128, size=(rows, cols)), rng.uniform(0.01, 0.05, size=(1, cols)))
  w_float = np.asarray(w.codes, np.float32) * np.asarray(w.scale)
  upd = (rng.normal(size=(rows, cols)) * 0.3 * np.asarray(w.scale)).astype(np.float32)  # under a step
  params = {"w": w, "b32": jnp.asarray(rng.normal(size=(cols,)), jnp.float32),
            "b16": jnp.asarray(rng.normal(size=(cols,)), jnp.bfloat16)}
  updates = {"w": jnp.asarray(upd), "b32": jnp.asarray(rng.normal(size=(cols,)) * 1e-3, jnp.float32),
             "b16": jnp.asarray(rng.normal(size=(cols,)) * 1e-3, jnp.float32)}
  out = jax.jit(jax.vmap(lambda s: int8_weight.apply_updates(params, updates, s)))(jnp.arange(SEEDS, dtype=jnp.uint32))
  target = w_float + upd  # float32, as the library adds them
  scale = np.abs(target).max(axis=0) / np.float32(127)
  np.testing.assert_allclose(np.asarray(out["w"].scale[0, 0]), scale, rtol=1e-6)
  draws = np.asarray(out["w"].codes, np.float64) * np.asarray(out["w"].scale, np.float64)
  _expect_unbiased(draws, target, np.broadcast_to(scale, target.shape))
  # Rounding to nearest would lose most of these sub-step updates; stochastic rounding moves codes.
  assert np.mean(np.asarray(out["w"].codes[0]) != np.asarray(w.codes)) > 0.2
  ref = optax.apply_updates({k: params[k] for k in ("b32", "b16")}, {k: updates[k] for k in ("b32", "b16")})
  for k in ("b32", "b16"):
    assert out[k].dtype == params[k].dtype == ref[k].dtype
    np.testing.assert_array_equal(np.asarray(out[k][0], np.float32), np.asarray(ref[k], np.float32))


def test_where_false_changes_no_bit_even_under_a_non_finite_update():
  """apply_updates(..., where=False), the trainer's skipped step: every leaf as it was, bit for bit."""
  rng = np.random.default_rng(5)
  w = _int8(rng.integers(-127, 128, size=(20, 6)), rng.uniform(0.01, 0.05, size=(1, 6)))
  params = {"w": w, "b": jnp.asarray(rng.normal(size=(6,)), jnp.bfloat16)}
  updates = {"w": jnp.full((20, 6), jnp.nan, jnp.float32), "b": jnp.full((6,), jnp.inf, jnp.float32)}
  out = jax.jit(int8_weight.apply_updates)(params, updates, jnp.uint32(3), jnp.asarray(False))
  np.testing.assert_array_equal(out["w"].codes, w.codes)
  np.testing.assert_array_equal(out["w"].scale, w.scale)
  np.testing.assert_array_equal(np.asarray(out["b"], np.float32), np.asarray(params["b"], np.float32))
  taken = jax.jit(int8_weight.apply_updates)(params, jax.tree.map(jnp.ones_like, updates), jnp.uint32(3),
                                             jnp.asarray(True))
  assert np.mean(np.asarray(taken["w"].codes) != np.asarray(w.codes)) > 0.5


def test_the_documented_optax_loop_trains():
  """The module docstring's loop, executed as written, on a small regression problem."""
  block = int8_weight.__doc__.split("In your own Optax loop")[1].split("::", 1)[1]
  lines = [line.strip() for line in block.strip("\n").splitlines() if line.strip()]
  assert len(lines) == 5 and lines[0].startswith("params = int8_weight.quantize_tree(params)"), lines
  setup_code, step_code = compile("\n".join(lines[:2]), "doc", "exec"), compile("\n".join(lines[2:]), "doc", "exec")

  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(128, 16)), jnp.float32)
  w_true, b_true = rng.normal(size=(16, 8)) * 0.5, rng.normal(size=(8,)) * 0.1
  batch = (x, jnp.asarray(np.asarray(x) @ w_true + b_true, jnp.float32))

  def loss_fn(params, batch):
    x, y = batch
    return jnp.mean(jnp.square(x @ params["dense"]["kernel"][...] + params["dense"]["bias"] - y))

  tx = optax.adamw(2e-2, weight_decay=1e-4)
  ns = {"int8_weight": int8_weight, "tx": tx, "loss_fn": loss_fn, "batch": batch,
        "params": {"dense": {"kernel": jnp.asarray(rng.normal(size=(16, 8)) * 0.1, jnp.float32),
                             "bias": jnp.zeros((8,), jnp.float32)}}}
  exec(setup_code, ns)

  @jax.jit
  def step_fn(params, opt_state, step):
    local = {**ns, "params": params, "opt_state": opt_state, "step": step}
    exec(step_code, local)
    return local["params"], local["opt_state"], local["loss"]

  params, opt_state, losses = ns["params"], ns["opt_state"], []
  for step in range(200):
    params, opt_state, loss = step_fn(params, opt_state, step)
    losses.append(float(loss))
  assert int8_weight.is_int8(params["dense"]["kernel"]) and params["dense"]["kernel"].codes.dtype == jnp.int8
  assert losses[-1] < 0.01 * losses[0], (losses[0], losses[-1])


# --- the trainer --------------------------------------------------------------------------------
