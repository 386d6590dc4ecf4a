"""ViT-B/16 on PathMNIST at 224 x 224 (MedMNIST+, 9 tissue classes), full training with AdamW:
the baseline of the LTE + GaLore study's memory-versus-rank figure.

  # pathmnist_224.npz from MedMNIST (https://medmnist.com), downloaded by you beforehand
  python train.py --config configs/vit_b16_full.py --config.data.path=/data/pathmnist_224.npz

Random weights by default; fine-tune a Hugging Face ViT with
--config.model.init_from=~/vit-base-patch16-224-in21k (its head is replaced for the 9 classes,
images resized to its size). Batch 32
(one accelerator), 3 epochs of the 89,996 training images, AdamW with a short warm-up
and cosine decay; inputs normalised as Hugging Face's ViT processor (mean = std = 0.5),
random crop (4 pixels of padding) and flips. bench/vit_memory_rank.py measures the
step's peak memory for this and the LoRA / VeLoRA / GaLore variants.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.family = "vit"
  config.model.size = "b16"
  config.model.dtype = "bfloat16"
  config.data.source = "npz"
  config.data.path = "pathmnist_224.npz"
  config.data.train_split = "train"
  config.data.eval_split = "val"
  config.data.image.size = 224
  config.data.image.channels = 3
  config.data.image.crop_padding = 4
  config.data.image.flip = True
  config.train.batch_size = 32
  config.train.steps = 8_400  # ~3 epochs
  config.train.eval_every = 1_000
  config.train.eval_batches = 100
  config.train.checkpoint_every = 1_000
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-4
  config.optimizer.warmup = 0.05
  config.optimizer.weight_decay = 0.05
  return config
