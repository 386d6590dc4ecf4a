"""LLaMA-130M + LoRA on C4 (rank 128, alpha 32, all attention and MLP linears): the
low-rank baseline of the ReLoRA and GaLore papers.

  python train.py --config configs/llama_130m_lora.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("130m", steps=20_000)
  config.optimizer.name = "lora"
  config.optimizer.lr = 1e-3
  config.optimizer.lora.rank = 128
  config.optimizer.lora.alpha = 32.0
  return config
