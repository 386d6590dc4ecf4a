"""Tiny LLaMA + Online Subspace Descent (rank 32) on the synthetic language (CPU, about a minute).

  python train.py --config configs/llama_tiny_osd.py
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.optimizer.name = "osd"
  config.optimizer.lr = 1e-2
  config.optimizer.osd.rank = 32
  return config
