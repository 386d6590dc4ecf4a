"""LLaMA-130M + AdamW with VeLoRA on C4 (sub-token 8 for o, 16 for down; see llama_60m_velora.py).

  python train.py --config configs/llama_130m_velora.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("130m", steps=20_000)
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  config.model.velora.layers = "o:8,down:16"
  return config
