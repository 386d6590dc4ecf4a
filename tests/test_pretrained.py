"""Hugging Face checkpoints in and out, against an independent numpy forward of the same weights.

The tests write tiny checkpoints themselves (safetensors.numpy + config.json): nothing is
downloaded. The numpy references read the tensors under their HF names and layouts, so a
wrong transpose, split, rotary convention or GQA grouping in the loader shows up as wrong
logits.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax import models

st = pytest.importorskip('safetensors.numpy')

RNG = np.random.default_rng(0)
TOKENS = np.array([[3, 17, 5, 60, 1, 2, 44, 9, 30, 12], [7, 7, 0, 59, 33, 21, 4, 8, 15, 6]], np.int32)


def _w(*shape, scale=0.2):
  return (RNG.standard_normal(shape) * scale).astype(np.float32)


def llama_weights(*, vocab=61, d=32, heads=4, kv=2, layers=2, ff=48, tied=False, bias=False, positions=64):
  hd = d // heads
  w = {'model.embed_tokens.weight': _w(vocab, d, scale=1.0), 'model.norm.weight': 1 + _w(d)}
  for i in range(layers):
    p = f'model.layers.{i}.'
    w[p + 'input_layernorm.weight'] = 1 + _w(d)
    w[p + 'post_attention_layernorm.weight'] = 1 + _w(d)
    for name, (o, n) in {'q': (heads * hd, d), 'k': (kv * hd, d), 'v': (kv * hd, d), 'o': (d, heads * hd)}.items():
      w[f'{p}self_attn.{name}_proj.weight'] = _w(o, n)
      if bias:
        w[f'{p}self_attn.{name}_proj.bias'] = _w(o)
    for name, (o, n) in {'gate': (ff, d), 'up': (ff, d), 'down': (d, ff)}.items():
      w[f'{p}mlp.{name}_proj.weight'] = _w(o, n)
  if not tied:
    w['lm_head.weight'] = _w(vocab, d)
  config = {'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'vocab_size': vocab,
            'hidden_size': d, 'intermediate_size': ff, 'num_attention_heads': heads,
            'num_key_value_heads': kv, 'num_hidden_layers': layers, 'max_position_embeddings': positions,
            'rope_theta': 500000.0, 'rms_norm_eps': 1e-5, 'tie_word_embeddings': tied,
            'attention_bias': bias, 'hidden_act': 'silu', 'bos_token_id': 1, 'eos_token_id': 2}
  return config, w


def gpt2_weights(*, vocab=61, d=32, heads=4, layers=2, positions=16, prefix=''):
  w = {'wte.weight': _w(vocab, d, scale=1.0), 'wpe.weight': _w(positions, d), 'ln_f.weight': 1 + _w(d),
       'ln_f.bias': _w(d)}
  for i in range(layers):
    p = f'h.{i}.'
    for ln in ('ln_1', 'ln_2'):
      w[f'{p}{ln}.weight'], w[f'{p}{ln}.bias'] = 1 + _w(d), _w(d)
    for name, (n, o) in {'attn.c_attn': (d, 3 * d), 'attn.c_proj': (d, d), 'mlp.c_fc': (d, 4 * d),
                         'mlp.c_proj': (4 * d, d)}.items():
      w[f'{p}{name}.weight'], w[f'{p}{name}.bias'] = _w(n, o), _w(o)
    w[f'{p}attn.bias'] = np.tril(np.ones((positions, positions), np.float32))[None, None]  # old buffer
  w = {prefix + k: v for k, v in w.items()}
  config = {'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2', 'vocab_size': vocab, 'n_embd': d,
            'n_head': heads, 'n_layer': layers, 'n_positions': positions, 'layer_norm_epsilon': 1e-5,
            'activation_function': 'gelu_new'}
  return config, w


def write_checkpoint(path, config, weights, *, shards=1):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  if shards == 1:
    st.save_file(weights, os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})
    return str(path)
  names = list(weights)
  weight_map = {}
  for k in range(shards):
    file = f'model-{k + 1:05d}-of-{shards:05d}.safetensors'
    part = {n: weights[n] for n in names[k::shards]}
    st.save_file(part, os.path.join(path, file), metadata={'format': 'pt'})
    weight_map.update({n: file for n in part})
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': weight_map}, f)
  return str(path)


# ---------------------------------------------------------------------------
# Independent numpy forwards (HF names and layouts).


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _attention(q, k, v, segments):
  """q [B,T,N,H], k/v [B,T,N,H] (already repeated): causal, within segments."""
  t = q.shape[1]
  s = np.einsum('bqnh,bknh->bnqk', q, k) / np.sqrt(q.shape[-1])
  allowed = np.tril(np.ones((t, t), bool))[None, None] & (segments[:, None, :, None] == segments[:, None, None, :])
  p = _softmax(np.where(allowed, s, -np.inf))
  return np.einsum('bnqk,bknh->bqnh', p, v)


def numpy_llama(config, w, tokens, positions=None, segments=None):
  b, t = tokens.shape
  d, heads, kv = config['hidden_size'], config['num_attention_heads'], config['num_key_value_heads']
  hd, eps = d // heads, config['rms_norm_eps']
  positions = np.broadcast_to(np.arange(t), (b, t)) if positions is None else positions
  segments = np.zeros((b, t), int) if segments is None else segments
  inv = 1.0 / config['rope_theta'] ** (np.arange(0, hd, 2) / hd)
  ang = positions[..., None] * inv
  cos, sin = (np.concatenate([f(ang)] * 2, -1)[:, :, None] for f in (np.cos, np.sin))
  rotate_half = lambda x: np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)  # noqa: E731
  rms = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g  # noqa: E731
  x = w['model.embed_tokens.weight'][tokens].astype(np.float64)
  for i in range(config['num_hidden_layers']):
    p = f'model.layers.{i}.'
    lin = lambda h, n: h @ w[n + '.weight'].T + w.get(n + '.bias', 0)  # noqa: E731
    h = rms(x, w[p + 'input_layernorm.weight'])
    q = lin(h, p + 'self_attn.q_proj').reshape(b, t, heads, hd)
    k = lin(h, p + 'self_attn.k_proj').reshape(b, t, kv, hd)
    v = lin(h, p + 'self_attn.v_proj').reshape(b, t, kv, hd)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, heads // kv, axis=2), np.repeat(v, heads // kv, axis=2)  # HF repeat_kv
    x = x + lin(_attention(q, k, v, segments).reshape(b, t, d), p + 'self_attn.o_proj')
    h = rms(x, w[p + 'post_attention_layernorm.weight'])
    g = lin(h, p + 'mlp.gate_proj')
    x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + 'mlp.up_proj'), p + 'mlp.down_proj')
  x = rms(x, w['model.norm.weight'])
  return x @ w.get('lm_head.weight', w['model.embed_tokens.weight']).T


def numpy_gpt2(config, w, tokens):
  b, t = tokens.shape
  d, heads, eps = config['n_embd'], config['n_head'], config['layer_norm_epsilon']
  w = {k.removeprefix('transformer.'): v for k, v in w.items()}

  def ln(x, n):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w[n + '.weight'] + w[n + '.bias']

  conv = lambda h, n: h @ w[n + '.weight'] + w[n + '.bias']  # noqa: E731  Conv1D: [in, out]
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
  x = (w['wte.weight'][tokens] + w['wpe.weight'][np.arange(t)]).astype(np.float64)
  for i in range(config['n_layer']):
    p = f'h.{i}.'
    q, k, v = np.split(conv(ln(x, p + 'ln_1'), p + 'attn.c_attn'), 3, axis=-1)
    q, k, v = (y.reshape(b, t, heads, d // heads) for y in (q, k, v))
    x = x + conv(_attention(q, k, v, np.zeros((b, t), int)).reshape(b, t, d), p + 'attn.c_proj')
    x = x + conv(gelu(conv(ln(x, p + 'ln_2'), p + 'mlp.c_fc')), p + 'mlp.c_proj')
  return ln(x, 'ln_f') @ w['wte.weight'].T


@nnx.jit
def logits_of(model, tokens, positions=None, segment_ids=None):
  return model(tokens, positions=positions, segment_ids=segment_ids)


# ---------------------------------------------------------------------------


def test_llama_gqa_logits_equal_numpy_forward(tmp_path):
  config, w = llama_weights()
  model = models.from_pretrained(write_checkpoint(tmp_path / 'llama', config, w))
  assert isinstance(model, models.Llama)
  assert model.config.n_kv_heads == 2 and model.config.rope_theta == 500000.0
  assert model.layers[0].attn.k.kernel[...].shape == (32, 16)
  np.testing.assert_allclose(logits_of(model, TOKENS), numpy_llama(config, w, TOKENS), atol=2e-4, rtol=1e-4)


def test_llama_tied_biased_sharded_checkpoint_loads(tmp_path):
  config, w = llama_weights(tied=True, bias=True, kv=1)
  v5_config = {k: v for k, v in config.items() if k != 'rope_theta'}  # transformers 5 spelling
  v5_config['rope_parameters'] = {'rope_type': 'default', 'rope_theta': config['rope_theta']}
  path = write_checkpoint(tmp_path / 'sharded', v5_config, w, shards=3)
  assert not os.path.exists(os.path.join(path, 'model.safetensors'))
  model = models.from_pretrained(path)
  assert model.config.tie_embeddings and not hasattr(model, 'head')
  np.testing.assert_allclose(logits_of(model, TOKENS), numpy_llama(config, w, TOKENS), atol=2e-4, rtol=1e-4)


def test_gpt2_logits_equal_numpy_forward_both_name_styles(tmp_path):
  for prefix in ('', 'transformer.'):  # hub files vs GPT2LMHeadModel.save_pretrained
    config, w = gpt2_weights(prefix=prefix)
    model = models.from_pretrained(write_checkpoint(tmp_path / f'gpt2{prefix}', config, w))
    assert isinstance(model, models.GPT2) and model.config.bias
    np.testing.assert_allclose(logits_of(model, TOKENS), numpy_gpt2(config, w, TOKENS), atol=2e-4, rtol=1e-4)


def test_packed_segments_equal_separate_examples(tmp_path):
  """Two examples packed in one row, positions restarting: each gets its own logits."""
  config, w = llama_weights()
  model = models.from_pretrained(write_checkpoint(tmp_path / 'llama', config, w))
  row = TOKENS[:1]
  segments = np.array([[1] * 4 + [2] * 6], np.int32)
  positions = np.array([list(range(4)) + list(range(6))], np.int32)
  packed = np.asarray(logits_of(model, row, positions, segments))
  np.testing.assert_allclose(packed, numpy_llama(config, w, row, positions, segments), atol=2e-4, rtol=1e-4)
  alone = numpy_llama(config, w, row[:, 4:])
  np.testing.assert_allclose(packed[:, 4:], alone, atol=2e-4, rtol=1e-4)


def test_load_in_bfloat16_into_a_sharding(tmp_path):
  config, w = llama_weights()
  path = write_checkpoint(tmp_path / 'llama', config, w)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  seen = []
  model = models.from_pretrained(path, param_dtype='bfloat16', dtype='bfloat16',
                                 sharding=lambda p, a: seen.append(p) or device)
  kernel = model.layers[1].mlp.down.kernel[...]
  assert kernel.dtype == jnp.bfloat16 and kernel.sharding == device
  np.testing.assert_array_equal(np.asarray(kernel, np.float32),
                                w['model.layers.1.mlp.down_proj.weight'].T.astype(jnp.bfloat16).astype(np.float32))
  assert 'layers/1/mlp/down/kernel' in seen


def test_round_trip_is_exact_and_readable_by_safetensors(tmp_path):
  config, w = llama_weights(bias=True)
  src = write_checkpoint(tmp_path / 'src', config, w)
  with open(os.path.join(src, 'tokenizer.json'), 'w') as f:
    f.write('{}')
  model = models.from_pretrained(src)
  out = models.save_pretrained(model, tmp_path / 'out', source=src, max_shard_bytes=20_000)
  assert os.path.exists(os.path.join(out, 'model.safetensors.index.json'))  # sharded on the way out
  assert os.path.exists(os.path.join(out, 'tokenizer.json'))
  with open(os.path.join(out, 'config.json')) as f:
    saved_config = json.load(f)
  assert saved_config['eos_token_id'] == 2 and saved_config['num_key_value_heads'] == 2
  index = json.load(open(os.path.join(out, 'model.safetensors.index.json')))
  saved = {}
  for file in set(index['weight_map'].values()):
    saved.update(st.load_file(os.path.join(out, file)))
  assert sorted(saved) == sorted(w)
  for name, array in w.items():
    np.testing.assert_array_equal(saved[name], array, err_msg=name)
  again = models.from_pretrained(out)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))
  with pytest.raises(models.PretrainedError, match='already holds a checkpoint'):
    models.save_pretrained(model, out)


def test_lora_is_merged_on_export_and_gpt2_round_trips(tmp_path):
  config, w = gpt2_weights()
  src = write_checkpoint(tmp_path / 'gpt2', config, w)
  factory = models.LinearFactory({'q': 'lora', 'v': 'lora', 'up': 'lora'}, {'lora': {'rank': 2, 'alpha': 4}})
  model = models.from_pretrained(src, linear_factory=factory)
  np.testing.assert_allclose(logits_of(model, TOKENS), numpy_gpt2(config, w, TOKENS), atol=2e-4, rtol=1e-4)
  for layer in model.layers:  # move the adapters away from zero
    for lin in (layer.attn.q, layer.attn.v, layer.mlp.up):
      lin.lora_b[...] = jnp.asarray(_w(*lin.lora_b[...].shape))
  adapted = np.asarray(logits_of(model, TOKENS))
  out = models.save_pretrained(model, tmp_path / 'merged')
  merged = models.from_pretrained(out)  # plain dense layers
  assert not hasattr(merged.layers[0].attn.q, 'lora_a')
  np.testing.assert_allclose(logits_of(merged, TOKENS), adapted, atol=2e-4, rtol=1e-4)
  saved = st.load_file(os.path.join(out, 'model.safetensors'))
  assert 'transformer.h.0.attn.c_attn.weight' in saved and 'lm_head.weight' not in saved


def test_bias_free_gpt2_exports_with_zero_biases(tmp_path):
  model = models.GPT2(models.gpt2_config('tiny', 61, n_layers=1, d_model=32, max_seq_len=16), rngs=nnx.Rngs(0))
  out = models.save_pretrained(model, tmp_path / 'ours')
  again = models.from_pretrained(out)
  assert again.config.bias
  np.testing.assert_array_equal(again.layers[0].attn.o.bias[...], 0.0)
  np.testing.assert_allclose(logits_of(again, TOKENS), logits_of(model, TOKENS), atol=1e-5)


def test_clear_errors(tmp_path):
  config, w = llama_weights(layers=1)
  err = models.PretrainedError

  def attempt(name, cfg, weights, match, **kw):
    path = write_checkpoint(tmp_path / name, cfg, weights)
    with pytest.raises(err, match=match):
      models.from_pretrained(path, **kw)

  attempt('arch', {**config, 'architectures': ['MistralForCausalLM']}, w, 'MistralForCausalLM.*supported')
  missing = dict(w)
  del missing['model.layers.0.mlp.up_proj.weight']
  attempt('missing', config, missing, "'model.layers.0.mlp.up_proj.weight' is missing")
  bad = {**w, 'model.layers.0.self_attn.k_proj.weight': _w(32, 32)}
  attempt('shape', config, bad, r"'model.layers.0.self_attn.k_proj.weight' has shape \(32, 32\)")
  attempt('extra', config, {**w, 'model.layers.0.self_attn.q_norm.weight': _w(8)}, "unexpected tensor 'model")
  attempt('override', config, w, r"\['d_model'\] cannot be overridden", d_model=64)
  attempt('rope', {**config, 'rope_scaling': {'rope_type': 'linear', 'factor': 8.0}}, w, 'rope scaling')
  attempt('rope5', {**config, 'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0}}, w, 'rope scaling')
  with pytest.raises(err, match='no config.json'):
    models.from_pretrained(tmp_path)
  path = write_checkpoint(tmp_path / 'bin', config, w)
  os.replace(os.path.join(path, 'model.safetensors'), os.path.join(path, 'pytorch_model.bin'))
  with pytest.raises(err, match=r'pytorch_model.bin.*convert'):
    models.from_pretrained(path)
