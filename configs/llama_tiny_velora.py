"""Tiny LLaMA + AdamW with VeLoRA on the built-in synthetic language (CPU, about a minute).

  python train.py --config configs/llama_tiny_velora.py

The o and down projections keep only rank-1 sub-token projections of their inputs
for the backward pass (their inputs have no other consumer, so memory really drops).
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.model.velora.layers = "o:8,down:8"
  return config
