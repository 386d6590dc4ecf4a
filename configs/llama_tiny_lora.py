"""Tiny LLaMA + LoRA (rank 16 on every attention and MLP linear) on the synthetic language.

  python train.py --config configs/llama_tiny_lora.py

Kernels stay at their random initialisation: with LoRA alone a model trained from
scratch learns only through the adapters, embeddings, norms and head.
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.optimizer.name = "lora"
  config.optimizer.lora.rank = 16
  config.optimizer.lora.alpha = 32.0
  return config
