"""Tiny LLaMA + APOLLO on the synthetic language (CPU, about a minute).

  python train.py --config configs/llama_tiny_apollo.py
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.optimizer.name = "apollo"
  # Tuned: the best of the lr sweep in bench/quality.py --quick (docs/results/quality.md); the paper uses 1e-2.
  config.optimizer.lr = 5e-3
  config.optimizer.apollo.rank = 32  # d/4
  config.optimizer.apollo.scale = 1.0
  config.optimizer.apollo.scaling = "channel"
  config.optimizer.apollo.update_proj_gap = 50
  return config
