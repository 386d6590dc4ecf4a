"""The trainer fine-tunes a Hugging Face checkpoint on instruction data and exports it back."""

import numpy as np
import pytest

from configs import llama_sft_lora
from lowrank_jax import models
from lowrank_jax.train import ConfigError, train
from lowrank_jax.train.losses import masked_next_token_loss
from test_instructions import ALPACA, write_jsonl
from test_pretrained import llama_weights, write_checkpoint

pytest.importorskip('safetensors.numpy')


def test_masked_loss_counts_response_targets_only():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((2, 6, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, (2, 6)).astype(np.int32)
  mask = np.array([[0, 0, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0]], np.float32)  # prediction-aligned
  total, count = masked_next_token_loss(logits, tokens, mask)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = sum(-logp[b, t, tokens[b, t + 1]] for b, t in zip(*np.nonzero(mask)))
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  assert count == 5
  scrambled = logits.copy()
  scrambled[mask == 0] = rng.standard_normal(scrambled[mask == 0].shape)  # prompt / padding predictions
  np.testing.assert_allclose(masked_next_token_loss(scrambled, tokens, mask)[0], total, rtol=1e-6)


def _config(tmp_path, base, **overrides):
  config = llama_sft_lora.get_config()
  config.model.init_from = base
  config.model.dtype = config.model.param_dtype = 'float32'
  config.data.path = write_jsonl(tmp_path / 'alpaca.jsonl', ALPACA * 4)
  config.data.eval_holdout = 0.25
  config.data.tokenizer = 'byte'
  config.data.seq_len = 256
  config.train.steps = 3
  config.train.batch_size = 4
  config.train.eval_every = 0
  config.train.eval_batches = 1
  config.train.checkpoint_every = 0
  config.train.progress_bar = False
  config.optimizer.lora.rank = 4
  config.optimizer.lr = 1e-2
  config.update_from_flattened_dict(overrides)
  return config


def test_sft_with_lora_from_a_checkpoint_exports_merged_weights(tmp_path):
  config, w = llama_weights(vocab=300, layers=1, positions=256)  # the byte tokenizer's 259 ids fit
  base = write_checkpoint(tmp_path / 'base', config, w)
  out = str(tmp_path / 'export')
  summary = train(_config(tmp_path, base, **{'model.export_to': out}), str(tmp_path / 'run'))
  assert np.isfinite(summary['train_loss']) and np.isfinite(summary['eval_loss'])
  exported = models.from_pretrained(out)
  before = models.from_pretrained(base)
  # Adapters only (train_rest=False): the embedding and norms are the checkpoint's; the adapted
  # kernels moved by exactly the merged low-rank update.
  np.testing.assert_array_equal(exported.embed.embedding[...], before.embed.embedding[...])
  np.testing.assert_array_equal(exported.layers[0].attn_norm.scale[...], before.layers[0].attn_norm.scale[...])
  delta = np.asarray(exported.layers[0].attn.q.kernel[...]) - np.asarray(before.layers[0].attn.q.kernel[...])
  assert 0 < np.linalg.matrix_rank(delta, tol=1e-6) <= 4
  with pytest.raises(ConfigError, match='model.export_to'):  # never overwritten
    train(_config(tmp_path, base, **{'model.export_to': out}), str(tmp_path / 'run2'))


def test_sft_config_errors(tmp_path):
  config, w = llama_weights(vocab=100, layers=1, positions=256)
  base = write_checkpoint(tmp_path / 'base', config, w)
  with pytest.raises(ConfigError, match='data.tokenizer.*259 tokens, more than the 100'):
    train(_config(tmp_path, base), str(tmp_path / 'run'))
  with pytest.raises(ConfigError, match='model.init_from.*no config.json'):
    train(_config(tmp_path, str(tmp_path)), str(tmp_path / 'run'))
  config, w = llama_weights(vocab=300, layers=1)
  short = write_checkpoint(tmp_path / 'short', config, w)
  with pytest.raises(ConfigError, match='data.seq_len.*<= 64'):
    train(_config(tmp_path, short), str(tmp_path / 'run'))
