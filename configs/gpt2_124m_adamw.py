"""GPT-2 124M + AdamW (full training): the baseline for multi-head LoRA.

  python train.py --config configs/gpt2_124m_adamw.py
"""

from configs import gpt2_recipe


def get_config():
  config = gpt2_recipe.get_config("124m")
  config.optimizer.name = "adamw"
  return config
