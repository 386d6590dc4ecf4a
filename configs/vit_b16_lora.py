"""ViT-B/16 on PathMNIST (224 x 224) with LoRA on every attention and MLP linear: the LTE +
GaLore study's LoRA run (it swept the rank: 1, 4, 16, 64, 256; rank 16 here).

  python train.py --config configs/vit_b16_lora.py --config.data.path=/data/pathmnist_224.npz \
      --config.optimizer.lora.rank=64

Kernels frozen; adapters, head, embeddings, norms and biases trained. See vit_b16_full.py.
"""

from configs import vit_b16_full


def get_config():
  config = vit_b16_full.get_config()
  config.optimizer.name = "lora"
  config.optimizer.lora.layers = "q,k,v,o,up,down"
  config.optimizer.lora.rank = 16
  config.optimizer.lora.alpha = 32.0
  config.optimizer.lr = 1e-3
  config.optimizer.weight_decay = 0.0
  return config
