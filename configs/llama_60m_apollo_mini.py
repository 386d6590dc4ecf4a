"""LLaMA-60m + APOLLO-Mini on C4: the APOLLO paper's recipe (rank 1, tensor-wise scaling, scale sqrt(128), re-drawn every 200 steps, norm-growth limit 1.01, lr 0.01).

  python train.py --config configs/llama_60m_apollo_mini.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("60m", steps=10_000)
  config.optimizer.name = "apollo_mini"
  config.optimizer.lr = 0.01
  config.optimizer.apollo_mini.rank = 1
  config.optimizer.apollo_mini.scale = 128 ** 0.5
  config.optimizer.apollo_mini.update_proj_gap = 200
  return config
