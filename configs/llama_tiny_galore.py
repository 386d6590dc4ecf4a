"""Tiny LLaMA + GaLore (rank 32, refresh every 50 steps) on the synthetic language (CPU, about a minute).

  python train.py --config configs/llama_tiny_galore.py
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.optimizer.name = "galore"
  # Tuned: the best of a 5-point lr sweep (factor 2) in bench/quality.py --quick, C4 sample, 200 steps
  # (bench/results/quality_quick.json as of commit a5d2bc3, in git history; rerun: python bench/quality.py --quick).
  config.optimizer.lr = 2e-2
  config.optimizer.galore.rank = 32
  config.optimizer.galore.update_proj_gap = 50
  return config
