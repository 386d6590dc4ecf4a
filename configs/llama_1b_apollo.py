"""LLaMA-1b + APOLLO on C4: the APOLLO paper's recipe (random rank-d/4 space re-drawn every 200 steps, channel-wise scaling, scale 1, norm-growth limit 1.01, lr 0.01).

  python train.py --config configs/llama_1b_apollo.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("1b", steps=100_000)
  config.optimizer.name = "apollo"
  config.optimizer.lr = 0.01
  config.optimizer.apollo.rank = 512  # d/4
  config.optimizer.apollo.scale = 1.0
  config.optimizer.apollo.scaling = "channel"
  config.optimizer.apollo.update_proj_gap = 200
  config.train.grad_accum = 8  # micro-batches of 64 sequences, as the GaLore 1b config
  return config
