"""Tests for lowrank_jax.models (LLaMA, linear factory) and lowrank_jax.nn layers."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax import nn
from lowrank_jax.models import (
    LLAMA_SIZES,
    LinearFactory,
    Llama,
    LlamaConfig,
    count_params,
    layer_names,
    linear_kinds,
    llama_config,
    register_linear_kind,
)

# A small config: 4 heads of dim 8, so RoPE has 4 frequency pairs per head.
SMALL = LlamaConfig(vocab_size=61, d_model=32, d_ff=48, n_heads=4, n_layers=2, max_seq_len=64)


def _tokens(cfg, b=2, t=12, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)), jnp.int32)


def _params(model):
  """{'a/b/c': np.float64 array} for every nnx.Param of the model."""
  flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
  return {'/'.join(map(str, path)): np.asarray(v[...], np.float64) for path, v in flat}


def _randomize(model, seed=0, std=0.4):
  """Replaces every parameter with a random value (norm scales ~ 1 + noise).

  Default init (std 0.02, unit norm scales) makes attention nearly uniform and
  hides mistakes in RoPE / masking / scaling; random O(1) weights do not.
  """
  rng = np.random.default_rng(seed)
  state = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(state)
  for path, var in flat:
    shape, dtype = var[...].shape, var[...].dtype
    if path[-1] == 'scale':
      value = 1.0 + 0.3 * rng.standard_normal(shape)
    else:
      value = std * rng.standard_normal(shape)
    var[...] = jnp.asarray(value, dtype)
  nnx.update(model, nnx.from_flat_state(flat))
  return model


# ----------------------------------------------------------------- numpy reference


def _np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x, theta):
  """x: [B, T, N, H]. Rotary embedding via complex numbers: pairs (i, i + H/2)."""
  t, h = x.shape[1], x.shape[-1]
  half = h // 2
  freqs = np.array([theta ** (-2.0 * i / h) for i in range(half)])
  angle = np.arange(t)[:, None] * freqs[None, :]                  # [T, H/2]
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angle)[None, :, None, :]
  return np.concatenate([z.real, z.imag], axis=-1)


def _np_softmax(s):
  s = s - s.max(-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(-1, keepdims=True)


def _np_llama(p, tokens, cfg):
  """LLaMA forward from the equations, float64, given the parameter dict."""
  tokens = np.asarray(tokens)
  b, t = tokens.shape
  n, hd = cfg.n_heads, cfg.d_model // cfg.n_heads
  emb = p['embed/embedding']
  x = emb[tokens]
  causal = np.tril(np.ones((t, t), bool))
  for i in range(cfg.n_layers):
    pre = f'layers/{i}/'
    h = _np_rms(x, p[pre + 'attn_norm/scale'], cfg.norm_eps)
    q = (h @ p[pre + 'attn/q/kernel']).reshape(b, t, n, hd)
    k = (h @ p[pre + 'attn/k/kernel']).reshape(b, t, n, hd)
    v = (h @ p[pre + 'attn/v/kernel']).reshape(b, t, n, hd)
    q, k = _np_rope(q, cfg.rope_theta), _np_rope(k, cfg.rope_theta)
    scores = np.einsum('bqnh,bknh->bnqk', q, k) / math.sqrt(hd)
    scores = np.where(causal[None, None], scores, -np.inf)
    att = np.einsum('bnqk,bknh->bqnh', _np_softmax(scores), v).reshape(b, t, n * hd)
    x = x + att @ p[pre + 'attn/o/kernel']
    h = _np_rms(x, p[pre + 'mlp_norm/scale'], cfg.norm_eps)
    g = h @ p[pre + 'mlp/gate/kernel']
    x = x + ((g / (1.0 + np.exp(-g))) * (h @ p[pre + 'mlp/up/kernel'])) @ p[pre + 'mlp/down/kernel']
  x = _np_rms(x, p['final_norm/scale'], cfg.norm_eps)
  return x @ (emb.T if cfg.tie_embeddings else p['head/kernel'])


def _formula_params(cfg):
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  per_layer = 4 * d * d + 3 * d * f + 2 * d
  return v * d + cfg.n_layers * per_layer + d + (0 if cfg.tie_embeddings else d * v)


# -------------------------------------------------------------------------- tests


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_output_shape_and_dtype(dtype):
  cfg = dataclasses.replace(SMALL, dtype=dtype)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  logits = model(_tokens(cfg, b=3, t=7))  # T < max_seq_len
  assert logits.shape == (3, 7, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  with pytest.raises(ValueError, match='max_seq_len'):
    model(_tokens(cfg, b=1, t=cfg.max_seq_len + 1))


def test_forward_matches_numpy_reference():
  cfg = dataclasses.replace(SMALL, n_layers=1, rope_theta=100.0)
  model = _randomize(Llama(cfg, rngs=nnx.Rngs(0)))
  tokens = _tokens(cfg, b=2, t=10)
  got = np.asarray(jax.jit(lambda m, x: m(x))(model, tokens))
  want = _np_llama(_params(model), tokens, cfg)
  # Sanity: the reference is sensitive (it is not near-constant across positions).
  assert np.std(want) > 1.0
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_two_layer_forward_matches_reference_and_bf16_is_close():
  cfg = SMALL
  model = _randomize(Llama(cfg, rngs=nnx.Rngs(1)), seed=1, std=0.25)
  tokens = _tokens(cfg, b=2, t=9, seed=3)
  want = _np_llama(_params(model), tokens, cfg)
  np.testing.assert_allclose(np.asarray(model(tokens)), want, rtol=2e-4,
                             atol=2e-4 * np.abs(want).max())
  # Same parameters, bf16 compute: logits float32 and close to the reference.
  bf = Llama(dataclasses.replace(cfg, dtype='bfloat16'), rngs=nnx.Rngs(0))
  nnx.update(bf, nnx.state(model, nnx.Param))
  got = np.asarray(bf(tokens))
  assert got.dtype == np.float32
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 0.05, rel


def test_causal_masking():
  cfg = SMALL
  model = _randomize(Llama(cfg, rngs=nnx.Rngs(0)), std=0.3)
  fwd = jax.jit(lambda m, x: m(x))
  tokens = _tokens(cfg, b=2, t=12)
  base = np.asarray(fwd(model, tokens))
  for j in (0, 5, 11):
    changed = tokens.at[:, j].set((tokens[:, j] + 7) % cfg.vocab_size)
    out = np.asarray(fwd(model, changed))
    np.testing.assert_array_equal(out[:, :j], base[:, :j])
    # Every position >= j sees the changed token.
    diff = np.abs(out[:, j:] - base[:, j:]).max(axis=(0, 2))
    assert np.all(diff > 1e-4), (j, diff)


def test_rmsnorm_matches_numpy():
  rng = np.random.default_rng(0)
  norm = nn.RMSNorm(16, eps=1e-5, rngs=nnx.Rngs(0))
  scale = rng.standard_normal(16).astype(np.float32)
  norm.scale[...] = jnp.asarray(scale)
  x = (3.0 * rng.standard_normal((4, 5, 16)) + 1.0).astype(np.float32)
  want = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * scale
  np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
  # bf16 input, bf16 output, statistics computed in float32.
  bf = nn.RMSNorm(16, eps=1e-5, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = bf(jnp.asarray(x, jnp.bfloat16) * 1e3)
  assert y.dtype == jnp.bfloat16 and bf.scale[...].dtype == jnp.bfloat16
  expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True))
  np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=2e-2, atol=2e-2)


def test_rope_matches_numpy_and_is_relative():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 20, 3, 8)).astype(np.float32)
  got = np.asarray(nn.apply_rope(jnp.asarray(x), jnp.arange(20), theta=50.0))
  np.testing.assert_allclose(got, _np_rope(x.astype(np.float64), 50.0), rtol=1e-5, atol=1e-5)
  # Position 0 is the identity; rotations preserve norms.
  np.testing.assert_allclose(got[:, 0], x[:, 0], rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)

  # q_m . k_n depends only on m - n.
  q = jnp.asarray(rng.standard_normal(16), jnp.float32)
  k = jnp.asarray(rng.standard_normal(16), jnp.float32)

  def score(m, n):
    rq = nn.apply_rope(q[None, None, :], jnp.array([m]), theta=10000.0)
    rk = nn.apply_rope(k[None, None, :], jnp.array([n]), theta=10000.0)
    return float(jnp.sum(rq * rk))

  assert score(7, 3) == pytest.approx(score(37, 33), rel=1e-4, abs=1e-4)
  assert score(3, 7) == pytest.approx(score(103, 107), rel=1e-4, abs=1e-4)
  assert abs(score(7, 3) - score(7, 4)) > 1e-3
  # Batched [B, T] positions broadcast like [T].
  pos = jnp.stack([jnp.arange(20), jnp.arange(20) + 5])
  batched = np.asarray(nn.apply_rope(jnp.asarray(x), pos, theta=50.0))
  np.testing.assert_allclose(batched[0], got[0], rtol=1e-6)
  shifted = np.asarray(nn.apply_rope(jnp.asarray(x), jnp.arange(20) + 5, theta=50.0))
  np.testing.assert_allclose(batched[1], shifted[1], rtol=1e-6)


@pytest.mark.parametrize('tie', [False, True])
def test_param_count_matches_formula(tie):
  cfg = dataclasses.replace(SMALL, tie_embeddings=tie)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  assert count_params(model) == _formula_params(cfg)
  assert count_params(nnx.state(model, nnx.Param)) == _formula_params(cfg)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  assert count_params(params) == _formula_params(cfg)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))
  assert jax.tree.leaves(rest) == []


def test_named_sizes_and_abstract_7b():
  # GaLore paper: LLaMA 60M has ~58M parameters with the T5 vocabulary.
  for size, want in [('60m', 58_204_672), ('130m', 134_302_464), ('1b', 1_339_607_040)]:
    cfg = llama_config(size, 32128)
    assert _formula_params(cfg) == want
  cfg = llama_config('7b', 32128, dtype='bfloat16', param_dtype='bfloat16')
  abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  assert all(isinstance(l, jax.ShapeDtypeStruct) and l.dtype == jnp.bfloat16 for l in leaves)
  assert count_params(abstract) == _formula_params(cfg) == 6_739_464_192
  flat = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  assert flat[('layers', 31, 'mlp', 'down', 'kernel')].get_value().shape == (11008, 4096)
  assert flat[('head', 'kernel')].get_value().shape == (4096, 32128)
  assert llama_config('tiny', 256).d_model == LLAMA_SIZES['tiny']['d_model']
  with pytest.raises(ValueError, match="'60m'"):
    llama_config('61m', 100)
  with pytest.raises(ValueError, match='n_heads'):
    llama_config('60m', 100, n_heads=7)
  assert llama_config('60m', 100, remat=True).remat


def test_parameter_paths():
  model = Llama(SMALL, rngs=nnx.Rngs(0))
  paths = set(_params(model))
  expected = {'embed/embedding', 'final_norm/scale', 'head/kernel'}
  for i in range(SMALL.n_layers):
    expected |= {f'layers/{i}/attn/{n}/kernel' for n in 'qkvo'}
    expected |= {f'layers/{i}/mlp/{n}/kernel' for n in ('gate', 'up', 'down')}
    expected |= {f'layers/{i}/attn_norm/scale', f'layers/{i}/mlp_norm/scale'}
  assert paths == expected
  p = _params(model)
  assert p['layers/0/mlp/down/kernel'].shape == (SMALL.d_ff, SMALL.d_model)
  assert p['layers/0/mlp/up/kernel'].shape == (SMALL.d_model, SMALL.d_ff)
  # init: normal(init_std) for embeddings and kernels, ones for norm scales.
  big = Llama(dataclasses.replace(SMALL, d_model=128, d_ff=256, vocab_size=512),
              rngs=nnx.Rngs(0))
  bp = _params(big)
  assert np.std(bp['embed/embedding']) == pytest.approx(0.02, rel=0.05)
  assert np.std(bp['layers/0/mlp/gate/kernel']) == pytest.approx(0.02, rel=0.05)
  assert np.std(bp['head/kernel']) == pytest.approx(0.02, rel=0.05)
  assert np.all(bp['final_norm/scale'] == 1.0)


def test_tied_embeddings():
  tied_cfg = dataclasses.replace(SMALL, tie_embeddings=True)
  tied = _randomize(Llama(tied_cfg, rngs=nnx.Rngs(0)), std=0.3)
  assert not hasattr(tied, 'head')
  assert not any('head' in k for k in _params(tied))
  tokens = _tokens(SMALL)
  want = _np_llama(_params(tied), tokens, tied_cfg)
  got = np.asarray(tied(tokens))
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
  # An untied model whose head kernel is embedding^T gives the same logits.
  untied = Llama(SMALL, rngs=nnx.Rngs(1))
  nnx.update(untied, nnx.state(tied, nnx.Param))
  untied.head.kernel[...] = tied.embed.embedding[...].T
  np.testing.assert_allclose(np.asarray(untied(tokens)), got, rtol=1e-5, atol=1e-5)


def test_remat_identical_outputs_and_grads():
  cfg = SMALL
  tokens = _tokens(cfg, b=2, t=10)
  results = []
  for remat in (False, True):
    model = _randomize(Llama(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(0)), std=0.2)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, graphdef=graphdef):
      logits = nnx.merge(graphdef, p)(tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    results.append((value, logits, grads))
  (v0, l0, g0), (v1, l1, g1) = results
  np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
  flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(flat0) == len(flat1) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  for a, b in zip(flat0, flat1):
    assert np.abs(np.asarray(a)).max() > 0
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_param_dtype_bfloat16():
  cfg = dataclasses.replace(SMALL, dtype='bfloat16', param_dtype='bfloat16')
  model = Llama(cfg, rngs=nnx.Rngs(0))
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert leaves and all(l.dtype == jnp.bfloat16 for l in leaves)
  assert model(_tokens(cfg)).dtype == jnp.float32
  # float32 params with bf16 compute keep float32 storage.
  mixed = Llama(dataclasses.replace(SMALL, dtype='bfloat16'), rngs=nnx.Rngs(0))
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(nnx.state(mixed, nnx.Param)))


def test_dense():
  layer = nn.Dense(5, 3, dtype=jnp.bfloat16, param_dtype=jnp.float32,
                   kernel_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  assert layer.kernel[...].shape == (5, 3) and layer.kernel[...].dtype == jnp.float32
  assert (layer.in_features, layer.out_features) == (5, 3)
  x = np.random.default_rng(0).standard_normal((2, 4, 5)).astype(np.float32)
  y = layer(jnp.asarray(x))
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y, np.float32), x @ np.asarray(layer.kernel[...]),
                             rtol=3e-2, atol=3e-2)


def test_config_validation():
  ok = dict(vocab_size=10, d_model=16, d_ff=32, n_heads=2, n_layers=1)
  LlamaConfig(**ok)
  bad = [('vocab_size', 0), ('d_model', -4), ('d_ff', 0), ('n_heads', 0), ('n_layers', 0),
         ('max_seq_len', 0), ('dtype', 'float64'), ('param_dtype', 'fp32'),
         ('norm_eps', 0.0), ('init_std', -1.0), ('rope_theta', 0.0), ('d_model', 2.5)]
  for field, value in bad:
    with pytest.raises(ValueError, match=field):
      LlamaConfig(**{**ok, field: value})
  with pytest.raises(ValueError, match='n_heads'):
    LlamaConfig(**{**ok, 'n_heads': 3})           # 16 % 3 != 0
  with pytest.raises(ValueError, match='even'):
    LlamaConfig(**{**ok, 'd_model': 6, 'n_heads': 2})  # head dim 3


# ------------------------------------------------------------------ linear factory


class TaggedDense(nn.Dense):
  """A test linear kind: a Dense that records an option and doubles its output."""

  def __init__(self, in_features, out_features, *, tag, **kwargs):
    super().__init__(in_features, out_features, **kwargs)
    self.tag = tag

  def __call__(self, x):
    return 2.0 * super().__call__(x)


register_linear_kind('test_tagged', TaggedDense)


def test_linear_factory_kinds_honoured():
  assert 'dense' in linear_kinds() and 'test_tagged' in linear_kinds()
  factory = LinearFactory(kinds={'v': 'test_tagged', 'down': 'test_tagged'},
                          options={'test_tagged': {'tag': 'hello'}})
  model = Llama(SMALL, linear_factory=factory, rngs=nnx.Rngs(0))
  seen = {}
  for i, block in enumerate(model.layers):
    for name in ('q', 'k', 'v', 'o'):
      seen[(i, name)] = getattr(block.attn, name)
    for name in ('gate', 'up', 'down'):
      seen[(i, name)] = getattr(block.mlp, name)
  seen[(0, 'head')] = model.head
  for (i, name), module in seen.items():
    if name in ('v', 'down'):
      assert type(module) is TaggedDense and module.tag == 'hello', (i, name)
    else:
      assert type(module) is nn.Dense, (i, name)
  assert factory.kind_of('v') == 'test_tagged' and factory.kind_of('q') == 'dense'
  # Same parameter tree as the dense model; the swapped layers are actually used.
  dense = Llama(SMALL, rngs=nnx.Rngs(0))
  assert set(_params(dense)) == set(_params(model))
  tokens = _tokens(SMALL)
  assert not np.allclose(np.asarray(model(tokens)), np.asarray(dense(tokens)))
  # head kind honoured too.
  head_model = Llama(SMALL, linear_factory=LinearFactory({'head': 'test_tagged'},
                                                          {'test_tagged': {'tag': 1}}),
                     rngs=nnx.Rngs(0))
  assert type(head_model.head) is TaggedDense
  np.testing.assert_allclose(np.asarray(head_model(tokens)), 2 * np.asarray(dense(tokens)),
                             rtol=1e-5, atol=1e-6)


def test_linear_factory_errors():
  with pytest.raises(ValueError, match="'qq'") as err:
    LinearFactory(kinds={'qq': 'dense'})
  for name in layer_names():
    assert repr(name) in str(err.value)
  with pytest.raises(ValueError, match="'nope'") as err:
    LinearFactory(kinds={'q': 'nope'})
  assert "'dense'" in str(err.value) and "'test_tagged'" in str(err.value)
  with pytest.raises(ValueError, match="'nope'.*'dense'"):
    LinearFactory(options={'nope': {'rank': 4}})
  with pytest.raises(ValueError, match='already registered'):
    register_linear_kind('dense', TaggedDense)
  register_linear_kind('test_tagged', TaggedDense)  # same builder again: no-op
  # Builds with defaults when nothing is given.
  layer = LinearFactory()('q', 4, 6, dtype=jnp.float32, param_dtype=jnp.float32,
                          kernel_init=nnx.initializers.normal(0.02), rngs=nnx.Rngs(0))
  assert type(layer) is nn.Dense and layer.kernel[...].shape == (4, 6)
