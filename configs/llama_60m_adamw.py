"""LLaMA-60M + AdamW on C4, the GaLore paper's baseline (10K steps, 1.3B tokens, lr 1e-3).

  python train.py --config configs/llama_60m_adamw.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("60m", steps=10_000)
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  return config
