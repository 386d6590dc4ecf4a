"""Tests of lowrank_jax.models.gpt2."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.models.gpt2 import GPT2, GPT2_SIZES, GPT2Config, gpt2_config
from lowrank_jax.models.linear_factory import LinearFactory
from lowrank_jax.models.llama import count_params

VOCAB, D, HEADS, LAYERS, CTX = 50, 32, 4, 2, 16


def _config(**overrides):
  return gpt2_config('tiny', VOCAB, **{'d_model': D, 'n_heads': HEADS, 'n_layers': LAYERS,
                                       'max_seq_len': CTX, **overrides})


def _formula(vocab, d, n_layers, ctx, d_ff=None, tied=True):
  """Dense GPT-2 with bias-free linears and LayerNorms with bias, written out by hand."""
  d_ff = 4 * d if d_ff is None else d_ff
  per_layer = 4 * d * d + 2 * d * d_ff + 2 * (2 * d)  # q k v o, up down, two LayerNorms
  return vocab * d + ctx * d + n_layers * per_layer + 2 * d + (0 if tied else d * vocab)


@pytest.fixture(scope='module')
def model():
  return GPT2(_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def forward(model):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  return lambda tokens: fn(state, tokens)


def _tokens(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 0, VOCAB, dtype=jnp.int32)


def test_config_sizes_and_validation():
  cfg = gpt2_config('124m', 50257)
  assert (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff) == (768, 12, 12, 3072)
  assert cfg.max_seq_len == 1024 and cfg.tie_embeddings and cfg.head_dim == 64
  assert GPT2_SIZES['124m'] == dict(d_model=768, n_heads=12, n_layers=12)
  assert gpt2_config('tiny', 10, d_ff=100).d_ff == 100
  for bad in (dict(vocab_size=0), dict(d_model=30), dict(n_heads=0), dict(n_layers=1.5),
              dict(max_seq_len=-1), dict(d_ff=0), dict(norm_eps=0.0), dict(init_std=-1.0),
              dict(dtype='float16'), dict(param_dtype='int8'), dict(tie_embeddings=1)):
    with pytest.raises(ValueError):
      GPT2Config(**{'vocab_size': 10, 'd_model': 32, 'n_heads': 4, 'n_layers': 2, **bad})
  with pytest.raises(ValueError, match='unknown GPT-2 size'):
    gpt2_config('7b', 10)
  with pytest.raises(ValueError, match='unknown GPT2Config fields'):
    gpt2_config('tiny', 10, rope_theta=1.0)


def test_param_paths_count_and_init(model):
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  flat = {'/'.join(str(k.key) for k in path): x.shape
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  expected = {'embed/embedding': (VOCAB, D), 'pos_embed/embedding': (CTX, D),
              'final_norm/scale': (D,), 'final_norm/bias': (D,)}
  for i in range(LAYERS):
    for n in ('attn_norm', 'mlp_norm'):
      expected.update({f'layers/{i}/{n}/scale': (D,), f'layers/{i}/{n}/bias': (D,)})
    expected.update({f'layers/{i}/attn/{n}/kernel': (D, D) for n in 'qkvo'})
    expected.update({f'layers/{i}/mlp/up/kernel': (D, 4 * D),
                     f'layers/{i}/mlp/down/kernel': (4 * D, D)})
  assert flat == expected  # no head (tied), no linear biases
  assert count_params(model) == _formula(VOCAB, D, LAYERS, CTX)
  # GPT-2 init: N(0, 0.02), residual projections N(0, 0.02 / sqrt(2 L)); LayerNorm 1 / 0.
  std = lambda x: float(np.std(np.asarray(x)))
  resid = 0.02 / math.sqrt(2 * LAYERS)
  block = params['layers'][0]
  for x, s in ((params['embed']['embedding'], 0.02), (params['pos_embed']['embedding'], 0.02),
               (block['attn']['q']['kernel'], 0.02), (block['mlp']['up']['kernel'], 0.02),
               (block['attn']['o']['kernel'], resid), (block['mlp']['down']['kernel'], resid)):
    assert abs(std(x) / s - 1) < 0.12, (std(x), s)
  np.testing.assert_array_equal(block['attn_norm']['scale'], 1.0)
  np.testing.assert_array_equal(params['final_norm']['bias'], 0.0)


def test_forward_matches_numpy_reference(model, forward):
  tokens = _tokens(0, (2, 7))
  logits = forward(tokens)
  assert logits.shape == (2, 7, VOCAB) and logits.dtype == jnp.float32
  p = jax.tree.map(lambda x: np.asarray(x, np.float64),
                   nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  def ln(x, n):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * n['scale'] + n['bias']

  def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

  t = tokens.shape[1]
  hd = D // HEADS
  x = p['embed']['embedding'][np.asarray(tokens)] + p['pos_embed']['embedding'][:t]
  mask = np.tril(np.ones((t, t), bool))
  for i in range(LAYERS):
    blk = p['layers'][i]
    h = ln(x, blk['attn_norm'])
    q, k, v = (h @ blk['attn'][n]['kernel'] for n in 'qkv')
    split = lambda y: y.reshape(2, t, HEADS, hd).transpose(0, 2, 1, 3)
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(hd)
    scores = np.where(mask, scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    att = (w @ split(v)).transpose(0, 2, 1, 3).reshape(2, t, D)
    x = x + att @ blk['attn']['o']['kernel']
    h = ln(x, blk['mlp_norm'])
    x = x + gelu(h @ blk['mlp']['up']['kernel']) @ blk['mlp']['down']['kernel']
  ref = ln(x, p['final_norm']) @ p['embed']['embedding'].T  # tied head
  np.testing.assert_allclose(np.asarray(logits), ref, rtol=1e-4, atol=1e-5)


def test_causal_masking(forward):
  tokens = _tokens(1, (2, CTX))
  base = np.asarray(forward(tokens))
  for t in (0, 5, CTX - 1):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
    out = np.asarray(forward(changed))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])  # earlier logits: bit-identical
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-6


def test_tied_head_is_embedding_transpose(model):
  tokens = _tokens(2, (2, 5))
  x = model.embed(tokens) + model.pos_embed(jnp.arange(5))[None]
  for block in model.layers:
    x = block(x)
  h = np.asarray(model.final_norm(x), np.float64)
  e = np.asarray(model.embed.embedding[...], np.float64)
  np.testing.assert_allclose(np.asarray(model(tokens)), h @ e.T, rtol=1e-4, atol=1e-5)
  assert not hasattr(model, 'head')


def test_untied_factory_kinds_and_124m_count():
  factory = LinearFactory({'q': 'lora', 'head': 'lora'}, options={'lora': {'rank': 2, 'alpha': 4}})
  abstract = nnx.eval_shape(lambda: GPT2(_config(tie_embeddings=False), linear_factory=factory,
                                         rngs=nnx.Rngs(0)))
  params = nnx.state(abstract, nnx.Param)
  adapters = LAYERS * 2 * (D + D) + 2 * (D + VOCAB)
  assert count_params(params) == _formula(VOCAB, D, LAYERS, CTX, tied=False) + adapters
  assert count_params(nnx.state(abstract, nnx.LoRAParam)) == adapters
  assert abstract.layers[0].attn.q.lora_a.shape == (D, 2)
  assert abstract.head.kernel.shape == (D, VOCAB)
  # GPT-2 124M (vocab 50257, context 1024), bias-free linears.
  big = nnx.eval_shape(lambda: GPT2(gpt2_config('124m', 50257), rngs=nnx.Rngs(0)))
  n = count_params(big)
  print(f'GPT-2 124M parameters: {n:,}')
  assert n == _formula(50257, 768, 12, 1024) == 124_356_864
  assert n + 12 * (3 * 768 + 768 + 3072 + 768) == 124_439_808  # + linear biases = OpenAI's


def test_bf16_remat_and_input_checks(model, forward):
  tokens = _tokens(3, (2, 6))

  def run(**overrides):  # same seed: same parameters
    graphdef, state = nnx.split(GPT2(_config(**overrides), rngs=nnx.Rngs(0)))
    return jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)

  ref = np.asarray(forward(tokens), np.float64)
  # Recomputation changes no number.
  np.testing.assert_allclose(np.asarray(run(remat=True)), ref, rtol=1e-6, atol=1e-7)
  # bfloat16 compute: float32 logits within bf16's eps (2^-7) times the largest logit of the float32 ones
  # (the error measured is about half of that); a nonzero error: the compute did run in bf16.
  out = run(dtype='bfloat16', remat=True)
  assert out.dtype == jnp.float32
  scale = np.abs(ref).max()
  err = np.abs(np.asarray(out, np.float64) - ref).max()
  assert 0 < err <= float(jnp.finfo(jnp.bfloat16).eps) * scale, (err, scale)
  with pytest.raises(ValueError, match='exceeds max_seq_len'):
    model(_tokens(0, (1, CTX + 1)))
  with pytest.raises(ValueError, match=r'\[batch, seq\]'):
    model(_tokens(0, (CTX,)))
