"""Tiny LLaMA + APOLLO-Mini on the synthetic language (CPU, about a minute).

  python train.py --config configs/llama_tiny_apollo_mini.py
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.optimizer.name = "apollo_mini"
  # Tuned: the best of a 5-point lr sweep (factor 2) in bench/quality.py --quick, C4 sample, 200 steps
  # (bench/results/quality_quick.json; README, Quality).
  config.optimizer.lr = 5e-3
  config.optimizer.apollo_mini.rank = 1
  config.optimizer.apollo_mini.scale = 128 ** 0.5
  config.optimizer.apollo_mini.update_proj_gap = 50
  return config
