"""LoRA adapters in the PEFT format (lowrank_jax.models.peft_adapter), against expectations written here.

The file layout is checked against the exact key list and shapes PEFT writes for these tiny models
(PEFT itself is not in this venv; bench/peft_peer.py runs it). The function an adapter computes is
checked with PEFT's equation in numpy: W + s B A on the HF weights (s = lora_alpha / r, per module
through rank_pattern / alpha_pattern), then the numpy forwards of test_pretrained.
"""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax import models
from lowrank_jax.models import peft_adapter
from lowrank_jax.models.peft_adapter import PeftAdapterError, load_adapter, read_adapter_config, save_adapter
from test_pretrained import TOKENS, gpt2_weights, llama_weights, logits_of, numpy_gpt2, numpy_llama, write_checkpoint

st = pytest.importorskip('safetensors.numpy')

LORA = {'lora': {'rank': 2, 'alpha': 4}}
PREFIX = 'base_model.model.'


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  config, w = llama_weights()  # 2 layers, d 32, 4 heads, 2 kv heads (k, v out 16), ff 48, untied
  return config, w, write_checkpoint(tmp_path_factory.mktemp('llama'), config, w)


@pytest.fixture(scope='module')
def gpt2(tmp_path_factory):
  config, w = gpt2_weights(prefix='transformer.')  # 2 layers, d 32
  return config, w, write_checkpoint(tmp_path_factory.mktemp('gpt2'), config, w)


def build(path, layers, seed=0, options=LORA, layer_options=None):
  factory = models.LinearFactory({n: 'lora' for n in layers}, options, layer_options)
  return models.from_pretrained(path, linear_factory=factory, seed=seed)


def randomize(model, seed):
  """Every adapter factor off zero (B starts at zero); DoRA magnitudes positive, off the norms."""
  rng = np.random.default_rng(seed)
  for _, layer in nnx.iter_modules(model):
    for name in ('lora_a', 'lora_b', 'lora_magnitude'):
      if hasattr(layer, name):
        shape = getattr(layer, name)[...].shape
        value = rng.standard_normal(shape) * 0.3 if name != 'lora_magnitude' else rng.uniform(0.5, 2.0, shape)
        getattr(layer, name)[...] = jnp.asarray(value.astype(np.float32))
  return model


def lora_params(model):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


def read_adapter(path):
  return st.load_file(os.path.join(path, 'adapter_model.safetensors')), read_adapter_config(path)


def peft_scale(config, module):
  """PEFT's scale for `module` (rank_pattern / alpha_pattern keys matched as name suffixes)."""
  pick = lambda pattern, default: next(  # noqa: E731
      (v for k, v in pattern.items() if module == k or module.endswith('.' + k)), default)
  r, alpha = pick(config['rank_pattern'], config['r']), pick(config['alpha_pattern'], config['lora_alpha'])
  return alpha / (np.sqrt(r) if config['use_rslora'] else r)


def merged_weights(w, path, conv1d):
  """The HF weights with each adapted module's W + s B A (torch layout [out, in]; Conv1D stores the
  transpose), DoRA: times m / ||W + s B A|| row by row; in numpy."""
  tensors, config = read_adapter(path)
  merged = {k: v.astype(np.float64) for k, v in w.items()}
  modules = {k[len(PREFIX):-len('.lora_A.weight')] for k in tensors if k.endswith('.lora_A.weight')}
  for module in modules:
    a, b = (tensors[f'{PREFIX}{module}.lora_{x}.weight'].astype(np.float64) for x in 'AB')
    weight = merged[module + '.weight'].T if conv1d else merged[module + '.weight']
    weight = weight + peft_scale(config, module) * (b @ a)
    if config['use_dora']:
      m = tensors[f'{PREFIX}{module}.lora_magnitude_vector'].astype(np.float64)
      weight = weight * (m / np.linalg.norm(weight, axis=1))[:, None]
    merged[module + '.weight'] = weight.T if conv1d else weight
  return merged


# ---------------------------------------------------------------------------


def test_llama_round_trip_restores_adapters_and_logits(llama, tmp_path):
  _, _, src = llama
  layers = ('q', 'k', 'v', 'o', 'gate', 'up', 'down', 'head')
  model = randomize(build(src, layers), 1)
  out = save_adapter(model, tmp_path / 'adapter')
  other = randomize(build(src, layers, seed=5), 2)
  load_adapter(other, out)
  want, got = lora_params(model), lora_params(other)
  assert sorted(want) == sorted(got)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  np.testing.assert_array_equal(logits_of(other, TOKENS), logits_of(model, TOKENS))
  _, config = read_adapter(out)
  assert sorted(config['target_modules']) == ['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj',
                                              'up_proj', 'v_proj']


def test_llama_file_has_peft_names_shapes_and_config(llama, tmp_path):
  _, _, src = llama
  model = randomize(build(src, ('q', 'v')), 3)
  out = save_adapter(model, tmp_path / 'adapter', base_model_name_or_path='org/tiny-llama')
  tensors, config = read_adapter(out)
  expected = {}  # what PEFT writes for LoraConfig(r=2, target_modules=['q_proj', 'v_proj']) on this model
  for i in range(2):
    p = f'base_model.model.model.layers.{i}.self_attn.'
    expected.update({p + 'q_proj.lora_A.weight': (2, 32), p + 'q_proj.lora_B.weight': (32, 2),
                     p + 'v_proj.lora_A.weight': (2, 32), p + 'v_proj.lora_B.weight': (16, 2)})
  assert sorted(tensors) == sorted(expected)
  assert {k: v.shape for k, v in tensors.items()} == expected
  assert all(v.dtype == np.float32 for v in tensors.values())
  q = model.layers[1].attn.q
  q1 = f'{PREFIX}model.layers.1.self_attn.q_proj'
  np.testing.assert_array_equal(tensors[q1 + '.lora_A.weight'], np.asarray(q.lora_a[...]).T)
  np.testing.assert_array_equal(tensors[q1 + '.lora_B.weight'], np.asarray(q.lora_b[...]).T)
  assert {k: config[k] for k in ('peft_type', 'task_type', 'r', 'lora_alpha', 'use_dora', 'use_rslora', 'bias',
                                 'fan_in_fan_out', 'lora_dropout', 'inference_mode', 'rank_pattern', 'alpha_pattern',
                                 'modules_to_save', 'base_model_name_or_path')} == {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': 2, 'lora_alpha': 4, 'use_dora': False,
      'use_rslora': False, 'bias': 'none', 'fan_in_fan_out': False, 'lora_dropout': 0.0, 'inference_mode': True,
      'rank_pattern': {}, 'alpha_pattern': {}, 'modules_to_save': None, 'base_model_name_or_path': 'org/tiny-llama'}
  assert sorted(config['target_modules']) == ['q_proj', 'v_proj']
  with pytest.raises(PeftAdapterError, match='already holds an adapter'):
    save_adapter(model, out)
  save_adapter(model, out, overwrite=True)


def test_gpt2_fused_c_attn_round_trip(gpt2, tmp_path):
  """q and v adapted, k not: one c_attn adapter of rank 4 with k's rows zero; read back at rank 2."""
  _, _, src = gpt2
  model = randomize(build(src, ('q', 'v', 'up')), 4)
  out = save_adapter(model, tmp_path / 'adapter')
  tensors, config = read_adapter(out)
  expected = {}
  for i in range(2):
    p = f'base_model.model.transformer.h.{i}.'
    expected.update({p + 'attn.c_attn.lora_A.weight': (4, 32), p + 'attn.c_attn.lora_B.weight': (96, 4),
                     p + 'mlp.c_fc.lora_A.weight': (2, 32), p + 'mlp.c_fc.lora_B.weight': (128, 2)})
  assert {k: v.shape for k, v in tensors.items()} == expected
  assert sorted(config['target_modules']) == ['c_attn', 'c_fc'] and config['fan_in_fan_out'] is True
  assert (config['r'], config['lora_alpha'], config['rank_pattern'], config['alpha_pattern']) == (
      2, 4, {'c_attn': 4}, {'c_attn': 8})  # scale 8 / 4 = 2 = ours (4 / 2)
  b = tensors[f'{PREFIX}transformer.h.0.attn.c_attn.lora_B.weight']
  np.testing.assert_array_equal(b[32:64], 0.0)  # k
  np.testing.assert_array_equal(b[:32, 2:], 0.0)  # q's block uses components 0, 1
  np.testing.assert_array_equal(b[64:, :2], 0.0)  # v's 2, 3
  other = randomize(build(src, ('q', 'v', 'up'), seed=3), 5)
  load_adapter(other, out)
  want, got = lora_params(model), lora_params(other)
  for path in want:
    np.testing.assert_array_equal(got[path], want[path], err_msg=str(path))
  np.testing.assert_array_equal(logits_of(other, TOKENS), logits_of(model, TOKENS))


def test_adapter_reproduces_the_merged_model_in_numpy(llama, gpt2, tmp_path):
  """Base + adapter (ours, saved and loaded) == the HF weights with W + s B A, forward in numpy."""
  config, w, src = llama
  model = randomize(build(src, ('q', 'k', 'v', 'o', 'gate', 'up', 'down'),
                          layer_options={'down': {'rank': 3, 'alpha': 5.0}}), 6)
  out = save_adapter(model, tmp_path / 'llama')
  assert read_adapter(out)[1]['rank_pattern'] == {'down_proj': 3}
  fresh = build(src, ('q', 'k', 'v', 'o', 'gate', 'up', 'down'), seed=9,
                layer_options={'down': {'rank': 3, 'alpha': 5.0}})
  load_adapter(fresh, out)
  want = numpy_llama(config, merged_weights(w, out, conv1d=False), TOKENS)
  np.testing.assert_allclose(logits_of(fresh, TOKENS), want, atol=3e-4, rtol=1e-4)
  np.testing.assert_allclose(logits_of(model, TOKENS), want, atol=3e-4, rtol=1e-4)

  config, w, src = gpt2
  layer_options = {'v': {'rank': 3}}  # q scale 4/2, v scale 4/3: v's ratio is folded into its block of B
  model = randomize(build(src, ('q', 'k', 'v', 'o', 'up'), layer_options=layer_options), 7)
  out = save_adapter(model, tmp_path / 'gpt2')
  _, adapter_config = read_adapter(out)
  assert adapter_config['rank_pattern'] == {'c_attn': 7} and sorted(adapter_config['target_modules']) == [
      'attn.c_proj', 'c_attn', 'c_fc']  # not 'c_proj': that would also adapt mlp.c_proj
  fresh = build(src, ('q', 'k', 'v', 'o', 'up'), seed=4, layer_options=layer_options)
  load_adapter(fresh, out)
  want = numpy_gpt2(config, merged_weights(w, out, conv1d=True), TOKENS)
  np.testing.assert_allclose(logits_of(fresh, TOKENS), want, atol=3e-4, rtol=1e-4)
  np.testing.assert_allclose(logits_of(model, TOKENS), want, atol=3e-4, rtol=1e-4)


def write_adapter(path, tensors, config):
  os.makedirs(path, exist_ok=True)
  st.save_file(tensors, os.path.join(path, 'adapter_model.safetensors'), metadata={'format': 'pt'})
  with open(os.path.join(path, 'adapter_config.json'), 'w') as f:
    json.dump(config, f)
  return str(path)


def test_reads_a_peft_trained_c_attn_adapter_at_its_rank(gpt2, tmp_path):
  """A c_attn adapter with a full B (as PEFT trains one): exact when q, k, v have its rank."""
  config, w, src = gpt2
  rng = np.random.default_rng(11)
  tensors = {}
  for i in range(2):
    p = f'{PREFIX}transformer.h.{i}.attn.c_attn.'
    tensors[p + 'lora_A.weight'] = rng.standard_normal((3, 32)).astype(np.float32) * 0.3
    tensors[p + 'lora_B.weight'] = rng.standard_normal((96, 3)).astype(np.float32) * 0.3
  adapter = {'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'r': 3, 'lora_alpha': 6, 'target_modules': ['c_attn'],
             'fan_in_fan_out': True, 'bias': 'none', 'use_dora': False, 'use_rslora': False, 'rank_pattern': {},
             'alpha_pattern': {}, 'peft_version': '0.21.2', 'megatron_core': 'megatron.core'}
  out = write_adapter(tmp_path / 'peft', tensors, adapter)
  model = build(src, ('q', 'k', 'v'), options={'lora': {'rank': 3, 'alpha': 6}})
  load_adapter(model, out)
  np.testing.assert_array_equal(np.asarray(model.layers[1].attn.k.lora_a[...]),
                                tensors[f'{PREFIX}transformer.h.1.attn.c_attn.lora_A.weight'].T)
  np.testing.assert_array_equal(np.asarray(model.layers[1].attn.k.lora_b[...]),
                                tensors[f'{PREFIX}transformer.h.1.attn.c_attn.lora_B.weight'][32:64].T)
  want = numpy_gpt2(config, merged_weights(w, out, conv1d=True), TOKENS)
  np.testing.assert_allclose(logits_of(model, TOKENS), want, atol=3e-4, rtol=1e-4)
  with pytest.raises(PeftAdapterError, match=r"c_attn' has rank 3.*set optimizer.lora.rank=3"):
    load_adapter(build(src, ('q', 'k', 'v')), out)
  # Our own rank-2 q, v export (c_attn rank 4) also reads into rank-4 q, k, v layers (alpha 8: same scale 2).
  ours = save_adapter(randomize(build(src, ('q', 'v')), 8), tmp_path / 'ours')
  wide = build(src, ('q', 'k', 'v'), options={'lora': {'rank': 4, 'alpha': 8}})
  load_adapter(wide, ours)
  np.testing.assert_allclose(logits_of(wide, TOKENS), numpy_gpt2(config, merged_weights(w, ours, conv1d=True), TOKENS),
                             atol=3e-4, rtol=1e-4)


# Each bad input: (name, how to break a good q,v LLaMA adapter or the model, the one-line error).
def _edit_config(**changes):
  def edit(path):
    config = read_adapter_config(path)
    config.update(changes)
    with open(os.path.join(path, 'adapter_config.json'), 'w') as f:
      json.dump(config, f)
  return edit


def _edit_tensors(fn):
  def edit(path):
    file = os.path.join(path, 'adapter_model.safetensors')
    tensors = dict(st.load_file(file))
    fn(tensors)
    st.save_file(tensors, file, metadata={'format': 'pt'})
  return edit


Q0 = f'{PREFIX}model.layers.0.self_attn.q_proj'
Q2 = f'{PREFIX}model.layers.2.self_attn.q_proj'  # the model has layers 0 and 1


def _add_magnitudes(tensors):
  for key in [k for k in tensors if k.endswith('.lora_B.weight')]:
    tensors[key.replace('.lora_B.weight', '.lora_magnitude_vector')] = np.ones(tensors[key].shape[0], np.float32)


def _remove(name):
  return lambda path: os.remove(os.path.join(path, name))


BAD = [
    ('ia3', _edit_config(peft_type='IA3'), None, r"peft_type='IA3' is not supported; supported: \"LORA\""),
    ('task', _edit_config(task_type='SEQ_CLS'), None, r"task_type='SEQ_CLS'"),
    ('target', _edit_config(target_modules=['q_proj', 'c_attn']), None,
     r"target module 'c_attn' is not a linear module of this model; the model adapts \['q_proj', 'v_proj'\]"),
    ('module', _edit_tensors(lambda t: t.update({Q2 + '.lora_A.weight': t[Q0 + '.lora_A.weight'],
                                                 Q2 + '.lora_B.weight': t[Q0 + '.lora_B.weight']})),
     None, r"module 'model.layers.2.self_attn.q_proj' is not a linear module of this model; the model adapts"),
    ('not adapted', None, dict(layers=('q',)),
     r"'model.layers.0.self_attn.v_proj' is adapted.*add it to optimizer.lora.layers"),
    ('uncovered', None, dict(layers=('q', 'v', 'o')),
     r"adapts 'model.layers.0.self_attn.o_proj'.*remove 'o' from optimizer.lora.layers"),
    ('rank', None, dict(rank=4), r"has rank 2, but .* ranks \[\('q', 4\)\]: set optimizer.lora.rank=2"),
    ('alpha', None, dict(alpha=8.0), r"scale 2 \(lora_alpha 4, rank 2\).*scales by 4: set optimizer.lora.alpha=4"),
    ('dora tensors', _edit_config(use_dora=True), None, r"lacks lora_magnitude_vector but .* use_dora=True"),
    ('dora', lambda p: (_edit_config(use_dora=True)(p), _edit_tensors(_add_magnitudes)(p)), None,
     r"use_dora=True but the model's LoRA layers are 'lora': set optimizer.lora.variant=dora"),
    ('rslora', _edit_config(use_rslora=True), None, r"use_rslora=True .* set optimizer.lora.rank_scaling=rslora"),
    ('modules_to_save', _edit_config(modules_to_save=['lm_head']), None,
     r"modules_to_save=\['lm_head'\] is not supported"),
    ('bias', _edit_config(bias='lora_only'), None, r"bias='lora_only' is not supported \(only 'none'\)"),
    ('layers_to_transform', _edit_config(layers_to_transform=[0]), None, r"layers_to_transform=\[0\] is not supported"),
    ('layer_replication', _edit_config(layer_replication=[[0, 1]]), None, r"layer_replication=.* is not supported"),
    ('pissa', _edit_config(init_lora_weights='pissa'), None, r"init_lora_weights='pissa' changes the base weights"),
    ('unknown', _edit_config(use_future_trick=True), None, r"use_future_trick=True is not supported by this reader"),
    ('no weights', _remove('adapter_model.safetensors'), None, r"no adapter_model.safetensors$"),
    ('bin', lambda p: os.replace(os.path.join(p, 'adapter_model.safetensors'), os.path.join(p, 'adapter_model.bin')),
     None, r"found \['adapter_model.bin'\]: convert"),
    ('no config', _remove('adapter_config.json'), None, r"no adapter_config.json"),
    ('shape', _edit_tensors(lambda t: t.update({Q0 + '.lora_A.weight': np.zeros((2, 31), np.float32)})), None,
     r"tensor 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' has shape \(2, 31\).*need \(2, 32\)"),
    ('no B', _edit_tensors(lambda t: t.pop(Q0 + '.lora_B.weight')), None, r"q_proj' has no lora_B.weight"),
    ('embedding', _edit_tensors(lambda t: t.update({f'{PREFIX}model.embed_tokens.weight': np.zeros((61, 32))})), None,
     r"tensor 'base_model.model.model.embed_tokens.weight' is not a LoRA factor"),
]


def test_each_bad_input_is_one_clear_error_and_loads_nothing(llama, tmp_path):
  _, _, src = llama
  good = save_adapter(randomize(build(src, ('q', 'v')), 12), tmp_path / 'good')
  models_by_options = {}
  for name, edit, model_options, match in BAD:
    path = shutil.copytree(good, tmp_path / re.sub(r'\W', '_', name))
    if edit is not None:
      edit(path)
    options = {'layers': ('q', 'v'), 'rank': 2, 'alpha': 4.0, **(model_options or {})}
    key = (options['layers'], options['rank'], options['alpha'])
    if key not in models_by_options:
      lora = {'lora': {'rank': options['rank'], 'alpha': options['alpha']}}
      models_by_options[key] = randomize(build(src, options['layers'], options=lora), 13)
    model = models_by_options[key]
    before = lora_params(model)
    with pytest.raises(PeftAdapterError) as info:
      load_adapter(model, path)
    message = str(info.value)
    assert '\n' not in message, name
    assert re.search(match, message), f'{name}: {message}'
    for p, value in lora_params(model).items():
      np.testing.assert_array_equal(value, before[p], err_msg=f'{name}: {p} changed')


def test_gpt2_unadapted_block_must_be_zero(gpt2, tmp_path):
  _, _, src = gpt2
  out = save_adapter(randomize(build(src, ('q', 'v')), 14), tmp_path / 'adapter')
  key = f'{PREFIX}transformer.h.1.attn.c_attn.lora_B.weight'
  _edit_tensors(lambda t: t[key].__setitem__((40, 0), 1.0))(out)
  with pytest.raises(PeftAdapterError, match=r"c_attn' changes the 'k' block, which the model does not adapt: "
                                             r"add it to optimizer.lora.layers"):
    load_adapter(build(src, ('q', 'v')), out)
  assert peft_adapter.read_adapter_config(out)['peft_type'] == 'LORA'


def test_dora_and_rslora_round_trip_and_merged_model(llama, gpt2, tmp_path):
  """DoRA (LLaMA), DoRA + rsLoRA on GPT-2's fused c_attn with k not adapted: the magnitude splits by
  columns, k's block is its base columns' norm, PEFT's alpha for rank 4 gives our scale alpha / sqrt(2)."""
  config, w, src = llama
  dora = {'lora': {'rank': 2, 'alpha': 4, 'variant': 'dora'}}
  model = randomize(build(src, ('q', 'v', 'down'), options=dora), 15)
  out = save_adapter(model, tmp_path / 'llama')
  tensors, adapter = read_adapter(out)
  assert adapter['use_dora'] is True and adapter['use_rslora'] is False
  assert tensors[f'{Q0}.lora_magnitude_vector'].shape == (32,)
  assert tensors[f'{PREFIX}model.layers.1.mlp.down_proj.lora_magnitude_vector'].shape == (32,)
  assert len(tensors) == 2 * 3 * 3
  fresh = randomize(build(src, ('q', 'v', 'down'), seed=2, options=dora), 16)
  load_adapter(fresh, out)
  for p, value in lora_params(model).items():
    np.testing.assert_array_equal(lora_params(fresh)[p], value, err_msg=str(p))
  want = numpy_llama(config, merged_weights(w, out, conv1d=False), TOKENS)
  np.testing.assert_allclose(logits_of(fresh, TOKENS), want, atol=3e-4, rtol=1e-4)

  config, w, src = gpt2
  both = {'lora': {'rank': 2, 'alpha': 4, 'variant': 'dora', 'rank_scaling': 'rslora'}}
  model = randomize(build(src, ('q', 'v'), options=both), 17)
  out = save_adapter(model, tmp_path / 'gpt2')
  tensors, adapter = read_adapter(out)
  assert adapter['use_dora'] is True and adapter['use_rslora'] is True
  assert (adapter['r'], adapter['lora_alpha']) == (4, adapter['alpha_pattern'].get('c_attn', adapter['lora_alpha']))
  np.testing.assert_allclose(adapter['lora_alpha'] / np.sqrt(4), 4 / np.sqrt(2), rtol=1e-12)
  m = tensors[f'{PREFIX}transformer.h.0.attn.c_attn.lora_magnitude_vector']
  np.testing.assert_array_equal(m[:32], np.asarray(model.layers[0].attn.q.lora_magnitude[...]))
  np.testing.assert_allclose(m[32:64], np.linalg.norm(w['transformer.h.0.attn.c_attn.weight'][:, 32:64], axis=0),
                             rtol=1e-6)
  fresh = randomize(build(src, ('q', 'v'), seed=3, options=both), 18)
  load_adapter(fresh, out)
  for p, value in lora_params(model).items():
    np.testing.assert_array_equal(lora_params(fresh)[p], value, err_msg=str(p))
  want = numpy_gpt2(config, merged_weights(w, out, conv1d=True), TOKENS)
  np.testing.assert_allclose(logits_of(fresh, TOKENS), want, atol=3e-4, rtol=1e-4)
  np.testing.assert_allclose(logits_of(model, TOKENS), want, atol=3e-4, rtol=1e-4)
