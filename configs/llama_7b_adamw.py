"""LLaMA-7B + AdamW on C4, the baseline of the 7B configs: the same lean settings (int8 weights,
8-bit states, remat, loss guard, chunked loss), full-rank moments. It does not fit one 16 GiB chip;
its memory report says by how much.

  python train.py --config configs/llama_7b_adamw.py --memory_report --memory_target=tpu-v5e
"""

from configs import llama_7b_recipe


def get_config():
  config = llama_7b_recipe.get_config()
  config.optimizer.name = "adamw"
  config.optimizer.lr = 3e-4
  return config
