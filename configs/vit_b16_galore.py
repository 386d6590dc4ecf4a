"""ViT-B/16 on PathMNIST with GaLore-AdamW (rank 128, projector refresh every 200 steps,
scale 0.25: GaLore's fine-tuning settings) on the attention and MLP kernels.

  python train.py --config configs/vit_b16_galore.py --config.data.path=/data/pathmnist_224.npz
"""

from configs import vit_b16_full


def get_config():
  config = vit_b16_full.get_config()
  config.optimizer.name = "galore"
  config.optimizer.galore.rank = 128
  config.optimizer.galore.update_proj_gap = 200
  config.optimizer.galore.scale = 0.25
  return config
