"""Frozen NF4 / int8 base kernels (`model.base_bits`, lowrank_jax/nn/quantized_base.py): the code
table against QLoRA's, quantization against numpy, double quantization, and the frozen product's
value, gradient and residuals. bitsandbytes on the same matrices: bench/nf4_error.py."""

from __future__ import annotations

import math
from statistics import NormalDist

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.nn import quantized_base as qb
from lowrank_jax.nn.dense import matmul

# QLoRA (arXiv 2305.14314) Appendix E, as bitsandbytes' `get_4bit_type('nf4')` has them.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0]


def _gaussian(shape, seed=0, dtype=np.float32):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32).astype(dtype)


def _np_absmax(w, block):
  """float32 [ceil(in / block), out]: max |w| over each block of `block` input rows of a column."""
  w = np.abs(np.asarray(w, np.float32))
  nb = math.ceil(w.shape[0] / block)
  return np.stack([w[b * block:(b + 1) * block].max(axis=0) for b in range(nb)])


def _np_nf4_index(w, block):
  """The index of the nearest NF4 value to each w / absmax, by brute force over the 16 values
  (ties to the first, the lower, as argmin does)."""
  w = np.asarray(w, np.float32)
  absmax = np.repeat(_np_absmax(w, block), block, axis=0)[:w.shape[0]]
  scaled = w * np.where(absmax > 0, np.float32(1) / np.where(absmax > 0, absmax, 1), 0).astype(np.float32)
  code = np.asarray(PUBLISHED_NF4, np.float32)
  return np.argmin(np.abs(scaled[..., None] - code), axis=-1)


def _unpack(codes, rows):
  """[rows, out] indices from uint8 [ceil(rows / 2), out]: row 2i the low nibble, 2i + 1 the high one."""
  codes = np.asarray(codes)
  out = np.empty((2 * codes.shape[0], codes.shape[1]), np.int64)
  out[0::2], out[1::2] = codes & 0xF, codes >> 4
  return out[:rows]


# --- the code --------------------------------------------------------------------------------

def test_nf4_code_is_the_published_table_and_qlora_quantiles():
  assert qb.NF4_CODE.dtype == np.float32 and qb.NF4_CODE.shape == (16,)
  np.testing.assert_array_equal(qb.NF4_CODE, np.asarray(PUBLISHED_NF4, np.float32))
  # QLoRA eq. (4), asymmetric as in its code: 8 positive quantiles of N(0, 1) on [0.5, delta], 7 negative
  # ones, an exact zero, all divided by the largest; delta = (1 - 1/(2*15) + 1 - 1/(2*16)) / 2.
  delta = ((1 - 1 / 30) + (1 - 1 / 32)) / 2
  ppf = NormalDist().inv_cdf
  pos = [ppf(delta + (0.5 - delta) * i / 8) for i in range(8)]
  neg = [-ppf(delta + (0.5 - delta) * i / 7) for i in range(7)]
  values = np.sort(np.array(pos + [0.0] + neg)) / ppf(delta)
  np.testing.assert_allclose(qb.NF4_CODE, values, atol=1e-6, rtol=0)


# --- NF4 quantization ------------------------------------------------------------------------

@pytest.mark.parametrize('shape,dtype', [((128, 24), np.float32), ((131, 10), np.float32),
                                         ((100, 7), np.float32), ((193, 12), jnp.bfloat16)],
                         ids=['even', 'odd_in', 'in_not_block', 'bf16'])
def test_nf4_round_trip_within_half_the_code_gap(shape, dtype):
  w = _gaussian(shape, dtype=dtype)
  w[:, 3] = 0  # a zero column: its blocks' absmax is 0 and it must come back as zeros, not NaN
  q = qb.quantize_base(jnp.asarray(w), 4)
  rows, out = shape
  assert q.codes.dtype == jnp.uint8 and q.codes.shape == (math.ceil(rows / 2), out)
  assert q.scale.dtype == jnp.float32 and q.scale.shape == (math.ceil(rows / 64), out)
  assert (q.shape, q.ndim, q.size, q.dtype) == (shape, 2, rows * out, jnp.dtype(dtype).name)
  deq = np.asarray(q.dequantize(jnp.float32))
  assert q.dequantize().dtype == jnp.dtype(dtype) and deq.shape == shape
  np.testing.assert_array_equal(deq[:, 3], 0)

  w32 = np.asarray(w, np.float32)
  absmax = np.repeat(_np_absmax(w32, 64), 64, axis=0)[:rows]
  np.testing.assert_array_equal(np.asarray(q.scale), _np_absmax(w32, 64))
  # The two codes around each w / absmax, and half the gap between them, in units of w.
  code = np.asarray(PUBLISHED_NF4, np.float64)
  v = np.clip(w32 / np.where(absmax > 0, absmax, 1), -1, 1)
  upper = np.clip(np.searchsorted(code, v), 1, 15)
  bound = 0.5 * (code[upper] - code[upper - 1]) * absmax + 1e-6 * absmax
  err = np.abs(deq.astype(np.float64) - w32)
  assert np.all(err <= bound), np.max(err - bound)


def test_nf4_codes_match_a_brute_force_numpy_quantizer():
  w = _gaussian((257, 40), seed=1)
  w[70] *= 30  # an outlier row: the blocks that hold it code everything else near 0
  want = _np_nf4_index(w, 64)
  q = qb.quantize_base(jnp.asarray(w), 4)
  np.testing.assert_array_equal(_unpack(q.codes, 257), want)
  # jitted (bits and the keywords static) and another block size give what numpy gives too.
  quantize = jax.jit(qb.quantize_base, static_argnames=('bits', 'block_size', 'double_quant', 'dtype'))
  q32 = quantize(jnp.asarray(w), 4, block_size=32)
  np.testing.assert_array_equal(_unpack(q32.codes, 257), _np_nf4_index(w, 32))
  np.testing.assert_array_equal(np.asarray(q32.scale), _np_absmax(w, 32))
  # The dequantized kernel is the table's value at each index times its block's absmax.
  absmax = np.repeat(_np_absmax(w, 64), 64, axis=0)[:257]
  np.testing.assert_array_equal(np.asarray(q.dequantize()), np.asarray(PUBLISHED_NF4, np.float32)[want] * absmax)


def test_int8_round_trip_within_half_a_step():
  w = _gaussian((75, 33), seed=2)
  q = qb.quantize_base(jnp.asarray(w), 8, dtype=jnp.bfloat16)
  scale = np.abs(w).max(axis=0, keepdims=True) / np.float32(127)
  assert q.codes.dtype == jnp.int8 and q.codes.shape == (75, 33) and q.scale.shape == (1, 33)
  np.testing.assert_allclose(np.asarray(q.scale), scale, rtol=1e-6)  # XLA may divide by 127 as * (1 / 127)
  np.testing.assert_array_equal(np.asarray(q.codes), np.round(w / np.asarray(q.scale)).astype(np.int8))
  deq = np.asarray(q.dequantize(jnp.float32))
  assert np.all(np.abs(deq - w) <= scale / 2 * (1 + 1e-5))
  assert q.dequantize().dtype == jnp.bfloat16 and q.nbytes == 75 * 33 + 33 * 4
  # double_quant applies to NF4's absmax values; int8's one scale per column is left as it is.
  dq = qb.quantize_base(jnp.asarray(w), 8, double_quant=True)
  assert dq.scale_scale is None and np.array_equal(np.asarray(dq.codes), np.asarray(q.codes))


def test_double_quantized_absmax_within_half_a_step_and_its_bytes():
  w = _gaussian((512, 300), seed=3)  # 8 x 300 absmax values: 10 blocks of 256, the last padded
  q = qb.quantize_base(jnp.asarray(w), 4, double_quant=True)
  plain = qb.quantize_base(jnp.asarray(w), 4)
  true = _np_absmax(w, 64)
  assert q.scale.dtype == jnp.int8 and q.scale.shape == true.shape == (8, 300)
  # Independent: the mean, then symmetric int8 over blocks of 256 consecutive values in row-major order.
  offset = true.mean(dtype=np.float64)
  flat = np.concatenate([true.reshape(-1) - offset, np.zeros(-true.size % 256)]).reshape(-1, 256)
  step = np.abs(flat).max(axis=1) / 127
  np.testing.assert_allclose(float(q.scale_offset), offset, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(q.scale_scale), step, rtol=1e-5)
  decoded = np.asarray(q.absmax())
  step_of = np.repeat(step, 256)[:true.size].reshape(true.shape)
  assert np.all(np.abs(decoded - true) <= step_of / 2 * (1 + 1e-4))
  # The elements are coded with the true absmax (as bitsandbytes does): the same codes as without.
  np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(plain.codes))
  # Bytes: 4 bits per element, an int8 per 64, a float32 per 256 of those, the offset; 4.127 bits.
  assert q.nbytes == 512 * 300 // 2 + 8 * 300 + 10 * 4 + 4
  assert plain.nbytes == 512 * 300 // 2 + 8 * 300 * 4
  big = jax.eval_shape(lambda a: qb.quantize_base(a, 4, double_quant=True), jax.ShapeDtypeStruct((4096, 4096), jnp.float32))
  assert abs(8 * big.nbytes / big.size - (4 + 8 / 64 + 32 / 64 / 256)) < 1e-5
  # What the second level costs: the kernel's relative error grows by well under 1 %.
  rel = lambda d: np.linalg.norm(np.asarray(d) - w) / np.linalg.norm(w)
  assert rel(q.dequantize()) < 1.01 * rel(plain.dequantize())


# --- the frozen product ----------------------------------------------------------------------

def _quantized(shape=(96, 40), seed=4, **kwargs):
  return qb.quantize_base(jnp.asarray(_gaussian(shape, seed=seed)), 4, **kwargs)


@pytest.mark.parametrize('double_quant,rows,bits', [(False, 96, 4), (True, 96, 4), (True, 97, 4), (False, 97, 8)])
def test_frozen_matmul_value_and_input_gradient(double_quant, rows, bits):
  # (An NF4 kernel multiplies as two products by its even and odd rows: an odd row count pads.)
  w = qb.quantize_base(jnp.asarray(_gaussian((rows, 40), seed=4)), bits, double_quant=double_quant)
  deq = w.dequantize(jnp.float32)
  x = jnp.asarray(_gaussian((2, 3, rows), seed=5))
  y, vjp = jax.vjp(lambda x: qb.frozen_matmul(x, w, jnp.float32), x)
  np.testing.assert_allclose(np.asarray(y), np.asarray(x, np.float64) @ np.asarray(deq, np.float64),
                             rtol=1e-5, atol=1e-5)
  g = jnp.asarray(_gaussian((2, 3, 40), seed=6))
  want = jax.vjp(lambda x: matmul(x, deq), x)[1](g)[0]
  np.testing.assert_allclose(np.asarray(vjp(g)[0]), np.asarray(want), rtol=1e-5, atol=1e-5)
  # bf16 input computed in float32: the output is float32, the input's gradient bf16.
  xb = x.astype(jnp.bfloat16)
  yb, vjpb = jax.vjp(lambda x: qb.frozen_matmul(x, w, jnp.float32), xb)
  assert yb.dtype == jnp.float32 and vjpb(g)[0].dtype == jnp.bfloat16
  # The kernel is frozen: its float leaves get zero gradients (its codes, integers, float0 ones).
  gw = jax.grad(lambda w: qb.frozen_matmul(x, w, jnp.float32).sum(), allow_int=True)(w)
  assert all(not np.any(np.asarray(leaf, np.float32)) for leaf in jax.tree.leaves(gw)
             if jnp.issubdtype(leaf.dtype, jnp.floating))


def test_frozen_matmul_keeps_only_the_codes_for_its_backward():
  w = _quantized((96, 40))
  x = jnp.asarray(_gaussian((8, 96), seed=7))
  floats = lambda tree: [(l.shape, l.dtype) for l in jax.tree.leaves(tree) if jnp.issubdtype(l.dtype, jnp.floating)]
  # The plain product on the dequantized kernel saves it (so the check can see one).
  plain = jax.vjp(lambda x: x @ w.dequantize(jnp.float32), x)[1]
  assert ((96, 40), jnp.float32) in floats(plain)
  _, vjp = jax.vjp(lambda x: qb.frozen_matmul(x, w, jnp.float32), x)
  assert all(shape not in ((96, 40), (40, 96)) for shape, _ in floats(vjp)), floats(vjp)
  assert sum(l.nbytes for l in jax.tree.leaves(vjp)) <= w.nbytes + 16 * 4  # codes, scales (and the table)
  # Each dequantization reads the codes through a barrier with a value of its own pass: in the
  # forward with the input (so XLA cannot hoist it out of a loop over micro-batches, a function of the
  # weights alone), in the backward with the cotangent (so XLA cannot share it with the forward's,
  # which would keep every layer's float kernel alive from one pass to the other).
  jaxpr = jax.make_jaxpr(jax.grad(lambda x: qb.frozen_matmul(x, w, jnp.float32).sum()))(x).jaxpr
  barriers = []  # (barrier, the equations after it in its own jaxpr), also inside nested jaxprs

  def walk(j):
    for i, e in enumerate(j.eqns):
      if e.primitive.name == 'optimization_barrier':
        barriers.append((e, j.eqns[i + 1:]))
      for sub in jax.extend.core.jaxprs_in_params(e.params):
        walk(sub)

  walk(jaxpr)
  partners = [(((8, 96), jnp.float32), 'x'), (((8, 40), jnp.float32), 'g')]
  found = []
  for barrier, after in barriers:
    avals = [(tuple(v.aval.shape), v.aval.dtype) for v in barrier.invars]
    assert ((48, 40), jnp.uint8) in avals, avals
    found += [name for aval, name in partners if aval in avals]
    codes_out = barrier.outvars[avals.index(((48, 40), jnp.uint8))]
    assert any(codes_out in e.invars for e in after)  # the dequantization reads the barrier's codes
  assert sorted(found) == ['g', 'x'], found


# --- reading and trees -----------------------------------------------------------------------

def test_reads_as_a_variable_and_replaces_the_selected_leaves():
  w = _quantized((70, 12), dtype=jnp.bfloat16)
  param = nnx.Param(w)
  np.testing.assert_array_equal(np.asarray(param[...], np.float32), np.asarray(w.dequantize(jnp.float32)
                                                                               .astype(jnp.bfloat16), np.float32))
  assert qb.is_quantized_base(jax.jit(lambda t: t)(w)) and jax.jit(lambda t: t)(w).rows == 70

  rng = np.random.default_rng(8)
  params = {'layer': {'kernel': jnp.asarray(rng.standard_normal((64, 16)), jnp.float32),
                      'lora_a': jnp.zeros((64, 4)), 'scale': jnp.ones((16,))},
            'head': {'kernel': jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)}}
  tree = qb.quantized_base_tree(params, 8)
  assert qb.is_quantized_base(tree['layer']['kernel']) and tree['layer']['kernel'].bits == 8
  assert qb.is_quantized_base(tree['head']['kernel'])
  assert tree['layer']['lora_a'] is params['layer']['lora_a'] and tree['layer']['scale'] is params['layer']['scale']
  # Already quantized leaves stay as they are; `select` picks.
  assert qb.quantized_base_tree(tree, 4)['layer']['kernel'] is tree['layer']['kernel']
  only = qb.quantized_base_tree(params, 4, select=lambda path, x: path[0].key == 'head' and x.ndim == 2)
  assert qb.is_quantized_base(only['head']['kernel']) and not qb.is_quantized_base(only['layer']['kernel'])


def test_bad_arguments_name_what_is_wrong():
  with pytest.raises(ValueError, match='bits must be 4'):
    qb.quantize_base(jnp.zeros((4, 4)), 3)
  with pytest.raises(ValueError, match='2-D'):
    qb.quantize_base(jnp.zeros((4, 4, 4)), 4)
  with pytest.raises(ValueError, match='block_size'):
    qb.quantize_base(jnp.zeros((4, 4)), 4, block_size=0)
  with pytest.raises(ValueError, match='block_size must be a positive even'):
    qb.quantize_base(jnp.zeros((4, 4)), 4, block_size=63)
