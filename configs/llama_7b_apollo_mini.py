"""LLaMA-7B + APOLLO-Mini on C4 on one 16 GiB chip: int8 weights, 8-bit states (Q-APOLLO-Mini's setting).

  python train.py --config configs/llama_7b_apollo_mini.py
  python train.py --config configs/llama_7b_apollo_mini.py --memory_report --memory_target=tpu-v5e
"""

from configs import llama_7b_recipe


def get_config():
  config = llama_7b_recipe.get_config()
  config.optimizer.name = "apollo_mini"
  config.optimizer.lr = 0.01
  config.optimizer.apollo_mini.rank = 1
  config.optimizer.apollo_mini.scale = 128 ** 0.5
  config.optimizer.apollo_mini.update_proj_gap = 200
  return config
