"""ViT-B/16 on PathMNIST, full training (AdamW) with VeLoRA on the linears whose inputs it can drop.

VeLoRA's ViT setting: sub-token size 16 on q, k, v (they read the same normed input, so all
three must be compressed for that input to be freed) and on the MLP's down projection.

  python train.py --config configs/vit_b16_velora.py --config.data.path=/data/pathmnist_224.npz
"""

from configs import vit_b16_full


def get_config():
  config = vit_b16_full.get_config()
  config.model.velora.layers = "q:16,k:16,v:16,down:16"
  return config
