"""The chunked language-model loss (`train.loss_chunk_positions`) equals the full-logits loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax import models
from lowrank_jax.train import ConfigError
from lowrank_jax.train.config import resolve
from lowrank_jax.train.losses import instruction_loss, language_model_loss
from train_helpers import tiny_config

VOCAB, B, T = 37, 3, 10


def _models():
  llama = models.Llama(models.llama_config('tiny', VOCAB, d_model=32, d_ff=48, n_heads=2, n_layers=1),
                       rngs=nnx.Rngs(0))
  gpt2 = models.GPT2(models.gpt2_config('tiny', VOCAB, d_model=32, n_heads=2, n_layers=1), rngs=nnx.Rngs(1))
  return {'llama (own head)': llama, 'gpt2 (tied head)': gpt2}


_RESULTS = {}


def _loss_and_grads(name, kind, chunk):
  """((mean loss, (summed loss, count)), gradients) of model `name` on batch `kind`, computed once."""
  if (name, kind, chunk) not in _RESULTS:
    graphdef, params, rest = nnx.split(_models()[name], nnx.Param, ...)
    batch = _batches()[kind]

    def mean_loss(params):
      loss = instruction_loss if isinstance(batch, dict) else language_model_loss
      total, count = loss(nnx.merge(graphdef, params, rest), batch, chunk)
      return total / count, (total, count)

    _RESULTS[name, kind, chunk] = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(params)
  return _RESULTS[name, kind, chunk]


def _batches():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (B, T)), jnp.int32)
  segment_ids = jnp.asarray(np.repeat([[1] * 6 + [2] * 4], B, 0), jnp.int32)  # two packed examples per row
  positions = jnp.asarray(np.repeat([list(range(6)) + list(range(4))], B, 0), jnp.int32)
  loss_mask = jnp.asarray(rng.integers(0, 2, (B, T)), jnp.float32).at[:, -1].set(0.0)
  instructions = {'tokens': tokens, 'segment_ids': segment_ids, 'positions': positions, 'loss_mask': loss_mask}
  return {'token rows': tokens, 'instruction batch': instructions}


# 5 divides T = 10, 3 and 4 do not (the last chunk is padded with weight-0 positions).
@pytest.mark.parametrize('name,kind,chunk', [
    ('llama (own head)', 'token rows', 5),
    ('llama (own head)', 'token rows', 3),
    ('llama (own head)', 'instruction batch', 4),
    ('gpt2 (tied head)', 'token rows', 3),
])
def test_chunked_loss_and_gradients_equal_the_full_logits(name, kind, chunk):
  (loss, (total, count)), grads = _loss_and_grads(name, kind, 0)
  (c_loss, (c_total, c_count)), c_grads = _loss_and_grads(name, kind, chunk)
  assert float(c_count) == float(count)
  np.testing.assert_allclose(c_total, total, rtol=2e-6)
  np.testing.assert_allclose(c_loss, loss, rtol=2e-6)
  assert jax.tree.structure(c_grads) == jax.tree.structure(grads)
  for (path, g), got in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(c_grads)):
    np.testing.assert_allclose(got, g, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_chunked_loss_is_the_cross_entropy_of_the_logits():
  """Independent of the full path: numpy's cross-entropy of model(tokens), weighted as next-token prediction."""
  tokens = _batches()['token rows']
  logits = np.asarray(_models()['llama (own head)'](tokens), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  expected = -sum(logp[b, t, int(tokens[b, t + 1])] for b in range(B) for t in range(T - 1))
  (_, (total, count)), _ = _loss_and_grads('llama (own head)', 'token rows', 3)
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  assert float(count) == B * (T - 1)


def test_chunk_setting_is_checked_and_reaches_the_step():
  with pytest.raises(ConfigError) as info:
    resolve(tiny_config(**{'train.loss_chunk_positions': -8}))
  assert info.value.key == 'train.loss_chunk_positions' and '>= 0' in str(info.value)
  assert resolve(tiny_config(**{'train.loss_chunk_positions': 16})).train.loss_chunk_positions == 16
