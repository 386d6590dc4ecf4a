"""Tiny LLaMA + ReLoRA on the built-in synthetic language (CPU, about a minute).

  python train.py --config configs/llama_tiny_relora.py

A full-rank warm start of 100 steps, then LoRA (rank 16) on every attention and MLP
linear, merged into the kernels every 50 steps with a jagged cosine schedule.
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.optimizer.name = "relora"
  config.optimizer.lora.rank = 16
  config.optimizer.lora.alpha = 32.0
  config.optimizer.relora.merge_every = 50
  config.optimizer.relora.restart_warmup_steps = 10
  config.optimizer.relora.warm_start_steps = 100
  return config
