"""LLaMA-130M + ReLoRA on C4: the ReLoRA README's recipe scaled to 130m.

  python train.py --config configs/llama_130m_relora.py

A full-rank AdamW warm start of 5,000 steps, then LoRA rank 128 / alpha 32 on every
attention and MLP linear, merged every 5,000 steps, adapter moments magnitude-pruned
to 10%, learning rate 1e-3 on a jagged cosine with a 100-step ramp after each merge.
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("130m", steps=20_000)
  config.optimizer.name = "relora"
  config.optimizer.lr = 1e-3
  config.optimizer.lora.rank = 128
  config.optimizer.lora.alpha = 32.0
  config.optimizer.relora.merge_every = 5_000
  config.optimizer.relora.restart_warmup_steps = 100
  config.optimizer.relora.prune = "magnitude"
  config.optimizer.relora.prune_ratio = 0.9
  config.optimizer.relora.warm_start_steps = 5_000
  return config
