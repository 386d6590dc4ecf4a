"""Image classification in the trainer: a tiny ViT with LoRA trains on an npz, accuracy in the
eval records and the summary; bad image configs fail on their key before compiling."""

import json

import numpy as np
import pytest

from configs import vit_tiny_lora
from lowrank_jax.data import images as I
from lowrank_jax.train import ConfigError, train


def _quadrant_images(n, seed):
  """8 x 8 grey images whose class (0..2) is the quadrant holding a bright 4 x 4 block."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 3
  x = rng.integers(0, 60, (n, 8, 8), dtype=np.uint8)
  for i, c in enumerate(labels):
    r, col = divmod(int(c), 2)
    x[i, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 180
  return x, labels


def _config(tmp_path, **overrides):
  path = tmp_path / 'quadrants.npz'
  if not path.exists():
    I.write_medmnist_npz(path, {'train': _quadrant_images(96, 0), 'val': _quadrant_images(30, 1)})
  config = vit_tiny_lora.get_config()
  config.data.source, config.data.path, config.data.eval_split = 'npz', str(path), 'val'
  config.data.image.crop_padding, config.data.image.flip = 0, False
  config.train.steps, config.train.batch_size, config.train.log_every = 30, 16, 10
  config.train.eval_every, config.train.eval_batches, config.train.progress_bar = 15, 8, False
  for key, value in overrides.items():
    section, leaf = key.rsplit('.', 1)
    node = config
    for part in section.split('.'):
      node = node[part]
    node[leaf] = value
  return config


def test_lora_vit_trains_and_reports_accuracy(tmp_path):
  summary = train(_config(tmp_path), str(tmp_path / 'run'))
  records = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').open()]
  evals = [r for r in records if 'eval_accuracy' in r]
  assert [r['step'] for r in evals] == [15, 30]
  assert summary['eval_accuracy'] == evals[-1]['eval_accuracy']
  assert summary['eval_examples'] == 30  # every validation image once (the last batch padded)
  assert summary['eval_accuracy'] >= 0.9, summary  # chance is 1/3
  assert summary['method'] == 'lora'


@pytest.mark.parametrize('overrides, key', [
    ({'data.source': 'synthetic'}, 'data.source'),
    ({'data.path': '/nonexistent/x.npz'}, 'data.path'),
    ({'data.eval_split': 'validation'}, 'data.eval_split'),
    ({'data.image.size': 10}, 'data.image.size'),
    ({'data.image.std': '0.5,zero'}, 'data.image.std'),
])
def test_bad_image_configs_name_their_key(tmp_path, overrides, key):
  with pytest.raises(ConfigError) as info:
    train(_config(tmp_path, **overrides), str(tmp_path / 'bad'))
  assert info.value.key == key, str(info.value)
