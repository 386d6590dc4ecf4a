"""QLoRA in the trainer: `model.base_bits` stores the frozen kernels under LoRA adapters quantized, as
the checkpoint loads; they never change, get no optimizer state, and export as dequantized base + s A B."""

import os

import jax
import numpy as np
import pytest

from lowrank_jax import models
from lowrank_jax.models.safetensors_io import SafetensorsReader
from lowrank_jax.nn import int8_weight, quantized_base
from lowrank_jax.train import ConfigError, train
from lowrank_jax.train import setup as setup_lib
from lowrank_jax.train.config import resolve
from lowrank_jax.train.model import linear_factory, pretrained_overrides, store_base, store_weights, split_model
from test_pretrained import llama_weights, write_checkpoint
from test_pretrained_train import _config

pytest.importorskip('safetensors.numpy')

ADAPTED = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')


def _base(tmp_path):
  config, w = llama_weights(vocab=300, layers=1, positions=256, d=64, heads=4, kv=2, ff=128)
  return write_checkpoint(tmp_path / 'base', config, w), w


@pytest.mark.parametrize('bits', [4, 8])
def test_a_checkpoint_loads_quantized_tensor_by_tensor_as_quantizing_after_the_load(tmp_path, bits):
  base, _ = _base(tmp_path)
  run = resolve(_config(tmp_path, base, **{'model.base_bits': bits}))
  streamed = models.from_pretrained(base, linear_factory=linear_factory(run), seed=0,
                                    store=lambda path, x: store_base(run, path, x), **pretrained_overrides(run, 300))
  plain = models.from_pretrained(base, linear_factory=linear_factory(run), seed=0, **pretrained_overrides(run, 300))
  _, streamed_params, _ = split_model(streamed)
  _, plain_params, _ = split_model(plain)
  after = store_weights(run, plain_params)
  leaves = lambda t: jax.tree_util.tree_flatten_with_path(t, is_leaf=int8_weight.is_stored)[0]  # noqa: E731
  quantized = 0
  for (path, a), (_, b) in zip(leaves(streamed_params), leaves(after)):
    name = jax.tree_util.keystr(path)
    assert quantized_base.is_quantized_base(a) == quantized_base.is_quantized_base(b), name
    if quantized_base.is_quantized_base(a):
      quantized += 1
      assert a.bits == bits and name.split("'")[-4] in ADAPTED, name
      jax.tree.map(np.testing.assert_array_equal, a, b)
    else:
      np.testing.assert_array_equal(a, b)
  assert quantized == len(ADAPTED)  # one layer: every adapted kernel, and nothing else (embedding, head, norms)


def _kernel(w, name):
  return w[f'model.layers.0.{name}.weight'].T.astype(np.float32)  # HF [out, in] -> ours [in, out]


def test_qlora_trains_the_adapters_over_a_fixed_nf4_base_and_exports_dequantized_base_plus_ab(tmp_path):
  base, w = _base(tmp_path)
  out, adapter = str(tmp_path / 'merged'), str(tmp_path / 'adapter')
  config = _config(tmp_path, base, **{'model.base_bits': 4, 'model.export_to': out,
                                      'model.export_adapter_to': adapter, 'train.checkpoint_every': 3})
  summary = train(config, str(tmp_path / 'run'))
  assert np.isfinite(summary['train_loss'])
  setup = setup_lib.build_setup(resolve(_config(tmp_path, base, **{'model.base_bits': 4})), 300)
  # The optimizer sees no frozen base: no moments shaped like a kernel of an adapted layer.
  shapes = {tuple(x.shape) for x in jax.tree.leaves(setup.abstract_state.opt_state)}
  assert (64, 64) not in shapes and (64, 128) not in shapes and (128, 64) not in shapes
  exported = SafetensorsReader(os.path.join(out, 'model.safetensors'))
  lora = SafetensorsReader(os.path.join(adapter, 'adapter_model.safetensors'))
  prefix = 'base_model.model.model.layers.0.'
  for hf in ('self_attn.q_proj', 'self_attn.v_proj', 'mlp.down_proj'):
    kernel = _kernel(w, hf)
    # The base the run held: the checkpoint's kernel in NF4 (double quantized), never changed by training.
    deq = np.asarray(quantized_base.quantize_base(kernel, 4, double_quant=True).dequantize(np.float32))
    a = lora.read(prefix + hf + '.lora_A.weight').astype(np.float32).T  # [in, r]
    b = lora.read(prefix + hf + '.lora_B.weight').astype(np.float32).T  # [r, out]
    assert np.abs(b).max() > 0  # trained
    merged = exported.read(f'model.layers.0.{hf}.weight').astype(np.float32).T
    np.testing.assert_allclose(merged, deq + (16 / 4) * a @ b, rtol=1e-5, atol=1e-6)  # alpha 16, rank 4
    assert np.abs(merged - kernel).max() > 0  # (the NF4 rounding shows: this is not the bf16 base)
  # A new run from the exported adapter (model.init_adapter_from) starts with exactly its factors.
  resumed = resolve(_config(tmp_path, base, **{'model.base_bits': 4, 'model.init_adapter_from': adapter}))
  state = setup_lib.init_state(setup_lib.build_setup(resumed, 300), 300)
  q = state.params['layers'][0]['attn']['q']
  np.testing.assert_array_equal(np.asarray(q['lora_a'], np.float32),
                                lora.read(prefix + 'self_attn.q_proj.lora_A.weight').astype(np.float32).T)
  assert quantized_base.is_quantized_base(q['kernel'])


def test_base_bits_needs_lora_over_a_fixed_base(tmp_path):
  base, _ = _base(tmp_path)
  for overrides, match in [
      ({'model.base_bits': 4, 'optimizer.name': 'galore'}, "model.base_bits.*galore"),
      ({'model.base_bits': 4, 'optimizer.name': 'relora'}, "model.base_bits.*merges into them"),
      ({'model.base_bits': 4, 'model.weight_bits': 8}, "model.base_bits.*model.weight_bits=8"),
      ({'model.export_adapter_to': str(tmp_path / 'a'), 'optimizer.name': 'relora'},
       "model.export_adapter_to.*model.export_to"),
      ({'model.export_adapter_to': str(tmp_path / 'a'), 'optimizer.lora.init': 'pissa'},
       "model.export_adapter_to.*PiSSA"),
      ({'model.base_bits': 3}, "model.base_bits.*16, 8, 4"),
  ]:
    with pytest.raises(ConfigError, match=match):
      resolve(_config(tmp_path, base, **overrides))
