"""LLaMA-130M with VeLoRA (activations) and GaLore (optimizer state) together on C4.

  python train.py --config configs/llama_130m_velora_galore.py

The two compose: VeLoRA compresses what o and down save for backward (model side),
GaLore keeps Adam's moments in rank-256 subspaces (optimizer side).
"""

from configs import llama_130m_galore


def get_config():
  config = llama_130m_galore.get_config()
  config.model.velora.layers = "o:8,down:16"
  return config
