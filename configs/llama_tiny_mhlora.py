"""Tiny LLaMA + LTE multi-head LoRA (4 parallel heads of rank 8 on the attention linears,
merged every 10 steps) on the synthetic language (CPU, about a minute).

  python train.py --config configs/llama_tiny_mhlora.py

Each head trains on its own quarter of every batch; evaluation uses the merged weights only.
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.optimizer.name = "mhlora"
  # Tuned: the best of a 5-point lr sweep (factor 2) in bench/quality.py --quick, C4 sample, 200 steps
  # (bench/results/quality_quick.json as of commit a5d2bc3, in git history; rerun: python bench/quality.py --quick).
  config.optimizer.lr = 1.5e-3
  config.optimizer.mhlora.rank = 8
  config.optimizer.mhlora.alpha = 32.0
  config.optimizer.mhlora.num_heads = 4
  config.optimizer.mhlora.merge_every = 10
  return config
