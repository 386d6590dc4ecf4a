"""ViT-B/16 on PathMNIST with LoRA (rank 16) and VeLoRA compressing the adapters' inputs
(sub-token 16 on q, k, v and down): the LoRA + VeLoRA row of VeLoRA's ViT table.

  python train.py --config configs/vit_b16_lora_velora.py --config.data.path=/data/pathmnist_224.npz
"""

from configs import vit_b16_lora


def get_config():
  config = vit_b16_lora.get_config()
  config.model.velora.layers = "q:16,k:16,v:16,down:16"
  return config
