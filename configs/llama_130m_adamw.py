"""LLaMA-130M + AdamW on C4, the GaLore paper's baseline (20K steps, 2.6B tokens, lr 1e-3).

  python train.py --config configs/llama_130m_adamw.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("130m", steps=20_000)
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  return config
