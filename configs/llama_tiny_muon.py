"""Tiny LLaMA + Muon (orthogonalised momentum on the kernels, AdamW on the rest) on the synthetic language.

  python train.py --config configs/llama_tiny_muon.py

The full-rank baseline beside AdamW. Muon's update is scaled to AdamW's RMS (optimizer.muon.consistent_rms
0.2), so one lr serves the kernels and the AdamW leaves.
"""

from configs import llama_tiny_adamw


def get_config():
  config = llama_tiny_adamw.get_config()
  config.optimizer.name = "muon"
  # Tuned: the best of a 5-point lr sweep (factor 2) with bench/quality.py --quick (C4 sample, 200 steps, seed 0):
  # eval loss 2.349, 2.161, 2.104, 2.134, 2.256 at lr 3e-3, 6e-3, 1.2e-2, 2.4e-2, 4.8e-2.
  config.optimizer.lr = 1.2e-2
  return config
