"""Tiny LLaMA + SGD with momentum on the built-in synthetic language (CPU, about a minute).

  python train.py --config configs/llama_tiny_sgd.py

The full-rank memory floor: one momentum buffer per parameter (AdamW keeps two), or
none with --config.optimizer.sgd.momentum=0. SGD wants a far larger learning rate
than Adam; global-norm clipping (optimizer.grad_clip, 1.0) keeps the first steps stable.
lr 0.3 was the best of 0.1, 0.3, 1.0 over 150 steps (eval loss 1.428, 1.408, 1.994; the
language's floor is 1.369).
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.optimizer.name = "sgd"
  config.optimizer.lr = 0.3
  config.optimizer.sgd.momentum = 0.9
  config.optimizer.sgd.nesterov = True
  return config
