"""8-bit optimizer states: codec bounds, bytes, convergence, resume, wrappers, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lowrank_jax import optim
from lowrank_jax.optim import quantize as Q

BLOCK = 64


def _data(kind, shape=(6, 200), seed=0):
  rng = np.random.default_rng(seed)
  if kind == 'normal':
    return rng.normal(size=shape).astype(np.float32)
  # Heavy tails within and across rows: Cauchy entries times log-normal row scales.
  return (rng.standard_cauchy(size=shape) * np.exp(3 * rng.normal(size=(shape[0], 1)))).astype(np.float32)


@pytest.mark.parametrize('codec', Q.CODECS)
@pytest.mark.parametrize('signed', [True, False])
@pytest.mark.parametrize('kind', ['normal', 'heavy'])
def test_roundtrip_within_codec_bound(codec, signed, kind):
  x = _data(kind)
  if not signed:
    x = x * x
  q = Q.quantize(jnp.asarray(x), block_size=BLOCK, codec=codec, signed=signed)
  got = np.asarray(Q.dequantize(q))
  # Independent reference: blocks of 64 along the last axis (200 = 3 blocks + 8), the
  # nearest code by brute force.
  book = Q.codebook(codec, signed).astype(np.float64)
  ref = np.empty_like(x)
  for r in range(x.shape[0]):
    for start in range(0, x.shape[1], BLOCK):
      blk = x[r, start:start + BLOCK].astype(np.float64)
      s = np.abs(blk).max()
      assert q.scale[r, start // BLOCK] == np.float32(s)
      idx = np.abs(blk[:, None] / s - book[None, :]).argmin(axis=1)
      ref[r, start:start + BLOCK] = book[idx] * s
      bound = Q.codec_error_bound(codec, signed) * s
      assert np.all(np.abs(got[r, start:start + BLOCK] - blk) <= bound * (1 + 1e-6))
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)
  # Quantizing what was dequantized gives the same codes (the absmax is coded exactly).
  again = Q.quantize(jnp.asarray(got), block_size=BLOCK, codec=codec, signed=signed)
  np.testing.assert_array_equal(again.codes, q.codes)


def test_dynamic_codebook_shape():
  for signed in (True, False):
    book = Q.dynamic_codebook(signed)
    assert book.size == np.unique(book).size == 256 and np.all(np.diff(book) > 0)
    assert book[-1] == 1 and (book[0] == -1 if signed else book[0] == 0)
    assert 0 in book
    # Seven decades: the smallest positive code is in [1e-7, 1e-6].
    assert 1e-7 <= book[book > 0].min() <= 1e-6
  # Bounds: half the top decade's bin (64 / 128 bins over [0.1, 1]).
  assert Q.codec_error_bound('dynamic', True) == pytest.approx(0.9 / 64 / 2, rel=1e-5)
  assert Q.codec_error_bound('dynamic', False) == pytest.approx(0.9 / 128 / 2, rel=1e-5)
  assert Q.codec_error_bound('linear', True) == pytest.approx(1 / 254, rel=1e-5)


def test_second_moments_nonnegative_and_sqrt_keeps_small_values():
  v = np.abs(_data('heavy')) ** 2 + 0.0
  v[0, :5] = -1e-9  # rounding noise below zero
  for sqrt in (True, False):
    q = Q.quantize(jnp.asarray(v), block_size=BLOCK, signed=False, sqrt=sqrt)
    d = np.asarray(Q.dequantize(q))
    assert d.min() >= 0
  # sqrt storage spans twice the decades of v: fewer nonzero entries become 0.
  zeros = {s: int(np.sum((np.asarray(Q.dequantize(Q.quantize(jnp.asarray(v), block_size=BLOCK, signed=False, sqrt=s))) == 0) & (v > 0)))
           for s in (True, False)}
  assert zeros[True] < zeros[False]


def test_state_bytes_equal_formula():
  params = {'a': jnp.zeros((96, 320)), 'b': jnp.zeros((32, 128)), 'c': jnp.zeros((8, 8)), 'n': jnp.zeros((320,))}
  tx = optim.quantize_state(optax.adamw(1e-3), block_size=256, min_size=1000)
  state = tx.init(params)
  mu = state.inner_state[0].mu
  # (96, 320): blocks along the last axis, 2 per row (320 = 256 + 64).
  assert mu['a'].scale.shape == (96, 2) and mu['a'].codes.shape == (96, 320)
  # (32, 128): rows shorter than a block, so blocks run over the flattened array.
  assert mu['b'].scale.shape == (16,)
  # Small leaves stay float32.
  assert mu['c'].dtype == jnp.float32 and mu['n'].dtype == jnp.float32
  per_moment = (96 * 320 + 4 * 96 * 2) + (32 * 128 + 4 * 16) + 4 * 64 + 4 * 320
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert total == 2 * per_moment + 4  # + adam's int32 count
  assert mu['a'].nbytes == Q.quantized_nbytes((96, 320), 256) == 96 * 320 + 4 * 192


def _quadratic(seed=0, shape=(32, 96)):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  a = jax.random.normal(k1, (shape[0], shape[0])) / math.sqrt(shape[0]) + jnp.eye(shape[0])
  target = jax.random.normal(k2, shape)
  return lambda p: 0.5 * jnp.mean(jnp.square(a @ p['w'] - target)) + 0.5 * jnp.mean(jnp.square(p['b'] - 1))


def _run(tx, loss, params, steps):
  def body(carry, _):
    p, s = carry
    g = jax.grad(loss)(p)
    u, s = tx.update(g, s, p)
    return (optax.apply_updates(p, u), s), None

  (p, s), _ = jax.lax.scan(body, (params, tx.init(params)), None, length=steps)
  return float(loss(p)), s


@pytest.mark.parametrize('method', ['adamw', 'galore', 'osd'])
def test_quadratic_converges_like_32bit(method):
  loss = _quadratic()
  params = {'w': jnp.zeros((32, 96)), 'b': jnp.zeros((96,))}
  make = {
      'adamw': lambda: optax.adamw(3e-2, weight_decay=0.0),
      'galore': lambda: optim.galore(3e-2, rank=8, update_proj_gap=20, projection_mask={'w': True, 'b': False}),
      'osd': lambda: optim.osd(3e-2, rank=8, projection_mask={'w': True, 'b': False}),
  }[method]
  start = float(loss(params))
  full, _ = _run(make(), loss, params, 150)
  eight, state = _run(optim.quantize_state(make(), block_size=BLOCK, min_size=512), loss, params, 150)
  n_quantized = sum(isinstance(x, Q.QuantizedArray) for x in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, Q.QuantizedArray)))
  assert n_quantized >= 2  # the moments of 'w' (full or low-rank) really were 8-bit
  # Stated tolerance: the 8-bit run ends within 5% (+1e-3 absolute) of the 32-bit loss,
  # which has dropped at least threefold (rank 8 of 32 limits GaLore and OSD here).
  assert full < start / 3
  assert eight <= 1.05 * full + 1e-3, (eight, full)


def test_equal_to_32bit_when_min_size_exceeds_every_leaf():
  loss = _quadratic()
  params = {'w': jnp.zeros((32, 96)), 'b': jnp.zeros((96,))}
  ref, ref_state = _run(optax.adamw(3e-2), loss, params, 5)
  got, state = _run(optim.quantize_state(optax.adamw(3e-2), min_size=10**6), loss, params, 5)
  assert got == ref
  jax.tree.map(np.testing.assert_array_equal, state.inner_state, ref_state)


def test_exact_resume_across_orbax_checkpoint(tmp_path):
  loss = _quadratic()
  params = {'w': jnp.zeros((32, 96)), 'b': jnp.zeros((96,))}
  tx = optim.quantize_state(
      optim.osd(3e-2, rank=8, projection_mask={'w': True, 'b': False}), block_size=BLOCK, min_size=512)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return optax.apply_updates(p, u), s

  p, s = params, tx.init(params)
  for _ in range(3):
    p, s = step(p, s)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / 'ckpt', {'params': p, 'opt_state': s})
    ckpt.wait_until_finished()
    abstract = jax.eval_shape(lambda: {'params': params, 'opt_state': tx.init(params)})
    restored = ckpt.restore(tmp_path / 'ckpt', abstract)
  p2, s2 = restored['params'], restored['opt_state']
  assert jax.tree.structure(s2) == jax.tree.structure(s)
  for _ in range(2):
    p, s = step(p, s)
    p2, s2 = step(p2, s2)
  jax.tree.map(np.testing.assert_array_equal, (p, s), (p2, s2))


def test_under_inject_hyperparams_multisteps_apply_if_finite():
  params = {'w': jnp.ones((16, 64))}
  g = {'w': jnp.linspace(-1, 1, 16 * 64).reshape(16, 64)}
  q = lambda tx: optim.quantize_state(tx, block_size=BLOCK, min_size=256)
  inj = q(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2))
  ms = optax.MultiSteps(q(optax.adamw(1e-2)), every_k_schedule=2)
  fin = optax.apply_if_finite(q(optax.adamw(1e-2)), max_consecutive_errors=3)
  ref = optax.adamw(1e-2)

  ref_u, _ = ref.update(g, ref.init(params), params)
  s = inj.init(params)
  s.inner_state.hyperparams['learning_rate'] = jnp.asarray(1e-2)
  u, s = jax.jit(inj.update)(g, s, params)
  np.testing.assert_allclose(u["w"], ref_u["w"], rtol=1e-5)  # first step: m / sqrt(v) = sign

  s = ms.init(params)
  u1, s = jax.jit(ms.update)(g, s, params)
  assert float(jnp.abs(u1['w']).max()) == 0  # accumulating
  u2, s = jax.jit(ms.update)(g, s, params)
  np.testing.assert_allclose(u2['w'], ref_u['w'], rtol=1e-6)
  assert isinstance(s.inner_opt_state.inner_state[0].mu['w'], Q.QuantizedArray)

  s = fin.init(params)
  _, s = jax.jit(fin.update)(g, s, params)
  bad = {'w': g['w'].at[0, 0].set(jnp.nan)}
  _, s_bad = jax.jit(fin.update)(bad, s, params)
  jax.tree.map(np.testing.assert_array_equal, s_bad.inner_state, s.inner_state)
  assert int(s_bad.notfinite_count) == 1


def test_projectors_counters_and_small_leaves_stay_as_they_are():
  params = {'w': jnp.ones((64, 96)), 'b': jnp.ones((96,))}
  tx = optim.quantize_state(optim.osd(1e-2, rank=8, projection_mask={'w': True, 'b': False}),
                            block_size=BLOCK, min_size=256)
  state = tx.init(params)
  is_q = lambda x: isinstance(x, Q.QuantizedArray)
  kinds = {}
  for path, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_q)[0]:
    names = [e.name for e in path if isinstance(e, jax.tree_util.GetAttrKey)]
    kinds[(tuple(names), jax.tree_util.keystr(path[-2:]))] = x
  projector = [x for (names, _), x in kinds.items() if 'projector' in names and 'projector_state' not in names]
  assert projector and not any(is_q(x) for x in projector)
  assert all(x.dtype == jnp.int32 for (names, _), x in kinds.items() if names[-1] in ('count',))
  # The projector's Adam moments (64 x 8 = 512 elements) and the low-rank moments are 8-bit.
  pm = [x for (names, _), x in kinds.items() if 'projector_state' in names and names[-1] in ('mu', 'nu')]
  assert pm and all(is_q(x) for x in pm if not hasattr(x, 'ndim') or x.ndim)
  assert not is_q(state.inner_state[0].dense_state.mu['b'])


def test_a_parameter_named_like_a_moment_is_not_misread():
  # A dict key 'v' or 'mu' is a parameter name, not a state field: only attributes count.
  params = {'v': jnp.ones((64, 64)), 'mu': jnp.ones((64, 64))}
  state = optim.quantize_state(optax.adamw(1e-2), min_size=256).init(params)
  adam = state.inner_state[0]
  assert adam.mu['v'].signed and not adam.nu['mu'].signed


def test_bad_input_errors():
  with pytest.raises(ValueError, match='`bits` must be one of'):
    optim.quantize_state(optax.adamw(1e-3), bits=4)
  with pytest.raises(ValueError, match='`block_size` must be a positive multiple of 64'):
    optim.quantize_state(optax.adamw(1e-3), block_size=100)
  with pytest.raises(ValueError, match='`block_size` must be a positive multiple of 64'):
    optim.quantize_state(optax.adamw(1e-3), block_size=0)
  with pytest.raises(ValueError, match='`codec` must be one of'):
    optim.quantize_state(optax.adamw(1e-3), codec='fp8')
  with pytest.raises(ValueError, match='no floating moment state'):
    optim.quantize_state(optax.sgd(1e-3)).init({'w': jnp.ones((64, 64))})


def test_trainer_state_bits(tmp_path):
  """`optimizer.state_bits=8`: the memory report counts 8-bit moments, a run trains, bad bits are named."""
  from flax import nnx

  from lowrank_jax.models import llama
  from lowrank_jax.train import ConfigError, memory_report, train
  from train_helpers import tiny_config

  report = memory_report(tiny_config(**{'optimizer.state_bits': 8, 'train.batch_size': 4, 'data.seq_len': 32}))
  cfg = llama.llama_config('tiny', 384)  # the byte vocabulary (258) padded to a multiple of 128
  shapes = jax.eval_shape(lambda: nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict())
  moments = sum(Q.quantized_nbytes(x.shape, 256) if x.size >= 4096 else 4 * x.size for x in jax.tree.leaves(shapes))
  assert 2 * moments <= report['opt_state_bytes'] < 2 * moments + 64  # + counters
  assert report['opt_state_bytes'] < 0.27 * 2 * report['params_bytes']

  config = tiny_config(**{'optimizer.name': 'osd', 'optimizer.state_bits': 8, 'train.steps': 20,
                          'train.log_every': 5, 'train.eval_every': 0, 'data.seq_len': 32, 'train.batch_size': 8})
  summary = train(config, str(tmp_path / 'run'))
  assert summary['train_loss'] < np.log(258) - 0.4, summary
  with pytest.raises(ConfigError) as info:
    train(tiny_config(**{'optimizer.state_bits': 4}), str(tmp_path / 'bad'))
  assert info.value.key == 'optimizer.state_bits'


def test_leaf_groups_give_the_same_update():
  params = {'a': jnp.ones((64, 96)), 'b': {'c': jnp.ones((128, 64)), 'd': jnp.ones((64,))}, 'e': jnp.ones((96, 64))}
  g = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
  make = lambda k: optim.quantize_state(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2)),
                                        block_size=BLOCK, min_size=256, leaf_groups=k)
  one, three = make(1), make(3)
  s1, s3 = one.init(params), three.init(params)
  for _ in range(2):
    u1, s1 = jax.jit(one.update)(g, s1, params)
    u3, s3 = jax.jit(three.update)(g, s3, params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), u1, u3)
  jax.tree.map(np.testing.assert_array_equal, s1, s3)
  with pytest.raises(ValueError, match='`leaf_groups` must be a positive int'):
    optim.quantize_state(optax.adamw(1e-3), leaf_groups=0)


def test_update_per_leaf_and_in_chunks_equals_the_plain_one(monkeypatch):
  # The wrapper ties each parameter's quantized leaves to its gradient and codes leaves over
  # CHUNK_ELEMENTS in slices (along axis 0 or, in whole blocks, along axis 1).
  # Reference: dequantize everything, inner.update, quantize each moment whole.
  params = {'w': jnp.ones((64, 384)), 'e': jnp.ones((384, 128)), 'b': jnp.ones((384,))}
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
  inner = optim.galore(1e-2, rank=16, projection_mask={'w': True, 'e': False, 'b': False})
  tx = optim.quantize_state(inner, block_size=BLOCK, min_size=256)
  state = tx.init(params)

  def plain(g, s, p):
    u, new = inner.update(g, Q.dequantize_tree(s.inner_state), p)
    requantize = lambda old, x: Q.quantize(x, block_size=BLOCK, signed=old.signed, sqrt=old.sqrt)
    return u, jax.tree.map(lambda old, x: requantize(old, x) if isinstance(old, Q.QuantizedArray) else x,
                           s.inner_state, new, is_leaf=lambda x: isinstance(x, Q.QuantizedArray))

  ref_u, ref_s = jax.jit(plain)(grads, state, params)
  monkeypatch.setattr(Q, 'CHUNK_ELEMENTS', 5000)
  cuts = {Q._chunking(x.codes, BLOCK) for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, Q.QuantizedArray))
          if isinstance(x, Q.QuantizedArray)}
  assert {(0, 2), (1, 2)} <= cuts  # GaLore's 16 x 384 moments by rows, 'e''s 384 x 128 in whole blocks
  u, new = jax.jit(tx.update)(grads, state, params)
  jax.tree.map(np.testing.assert_array_equal, u, ref_u)
  jax.tree.map(np.testing.assert_array_equal, new.inner_state, ref_s)
  for q in (Q.quantize(grads['e'], block_size=BLOCK), Q.quantize(grads['w'] ** 2, block_size=BLOCK, signed=False, sqrt=True)):
    monkeypatch.setattr(Q, 'CHUNK_ELEMENTS', 2**22)
    whole = Q.dequantize(q)
    monkeypatch.setattr(Q, 'CHUNK_ELEMENTS', 5000)
    np.testing.assert_array_equal(Q.dequantize(q), whole)
