"""Tiny LLaMA + Online Subspace Descent (rank 32) on the synthetic language (CPU, about a minute).

  python train.py --config configs/llama_tiny_osd.py
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.optimizer.name = "osd"
  # Tuned: the best of a 5-point lr sweep (factor 2) in bench/quality.py --quick, C4 sample, 200 steps
  # (bench/results/quality_quick.json as of commit a5d2bc3, in git history; the best lr sat at the top of the grid).
  config.optimizer.lr = 4e-2
  config.optimizer.osd.rank = 32
  return config
