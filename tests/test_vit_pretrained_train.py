"""The trainer fine-tunes a Hugging Face ViT checkpoint (`model.init_from`): the encoder is the
checkpoint's, the head is replaced for the data's classes, images are resized to the
checkpoint's size, and `model.export_to` writes a ViTForImageClassification back."""

import numpy as np
import pytest
from flax import nnx

from lowrank_jax import models
from lowrank_jax.train import ConfigError, train
from test_vit_train import _config

pytest.importorskip('safetensors.numpy')

RANK = 2


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """A 'pretrained' tiny ViT on 16 x 16 RGB images with a 5-class head (the data has 8 x 8 grey
  images and 3 classes)."""
  model = models.ViT(models.vit_config('tiny', 5, image_size=16, num_channels=3, n_layers=2),
                     rngs=nnx.Rngs(7))
  return models.save_pretrained(model, tmp_path_factory.mktemp('hf') / 'vit-tiny-16')


def _pretrained_config(tmp_path, checkpoint, **overrides):
  config = _config(tmp_path, **overrides)
  config.model.init_from = str(checkpoint)
  config.optimizer.lora.rank = RANK
  config.train.checkpoint_every = 0
  return config


def test_lora_from_a_vit_checkpoint_trains_and_exports(tmp_path, checkpoint):
  out = tmp_path / 'export'
  summary = train(_pretrained_config(tmp_path, checkpoint, **{'model.export_to': str(out)}),
                  str(tmp_path / 'run'))
  assert summary['eval_accuracy'] >= 0.9, summary  # chance is 1/3
  before, after = models.from_pretrained(checkpoint), models.from_pretrained(out)
  assert after.config.num_classes == 3 and after.config.image_size == 16 and after.config.num_channels == 3
  assert after.head.kernel[...].shape == (64, 3)
  # The frozen kernels were the checkpoint's: each moved by exactly the merged rank-2 update.
  for layer in ('q', 'o'):
    delta = (np.asarray(getattr(after.layers[1].attn, layer).kernel[...])
             - np.asarray(getattr(before.layers[1].attn, layer).kernel[...]))
    assert 0 < np.linalg.matrix_rank(delta, tol=1e-5) <= RANK, layer


def test_vit_checkpoint_config_errors(tmp_path, checkpoint):
  with pytest.raises(ConfigError, match=r'data.image.size.*takes 16x16x3 images'):
    train(_pretrained_config(tmp_path, checkpoint, **{'data.image.size': 8}), str(tmp_path / 'a'))
  config = _pretrained_config(tmp_path, checkpoint)
  config.data.source = 'synthetic'
  with pytest.raises(ConfigError, match=r"data.source.*a vit checkpoint"):
    train(config, str(tmp_path / 'b'))
