"""Tiny LLaMA + AdamW on the built-in synthetic language: trains on a laptop CPU in about a minute.

  python train.py --config configs/llama_tiny_adamw.py

The synthetic language has a known entropy rate; the summary prints it beside the
trained loss. Everything is from configs/base.py; this file only names the run.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.size = "tiny"
  config.data.source = "synthetic"
  config.optimizer.name = "adamw"
  config.optimizer.lr = 3e-3
  return config
