"""LLaMA-130m + APOLLO on C4: the APOLLO paper's recipe (random rank-d/4 space re-drawn every 200 steps, channel-wise scaling, scale 1, norm-growth limit 1.01, lr 0.01).

  python train.py --config configs/llama_130m_apollo.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("130m", steps=20_000)
  config.optimizer.name = "apollo"
  config.optimizer.lr = 0.01
  config.optimizer.apollo.rank = 192  # d/4
  config.optimizer.apollo.scale = 1.0
  config.optimizer.apollo.scaling = "channel"
  config.optimizer.apollo.update_proj_gap = 200
  return config
