"""LLaMA-1b + Muon on C4: the 1b AdamW baseline's recipe (lr 1e-3, lean settings) with Muon on the kernels.

  python train.py --config configs/llama_1b_muon.py

Muon's update is scaled to AdamW's RMS (optimizer.muon.consistent_rms 0.2, Liu et al. 2025), so the lr
and weight decay tuned for AdamW carry over unchanged (not tuned for Muon at this size). The
Newton-Schulz iterations (5 x 3 matmuls per kernel, once per step) add about 64 TFLOP per step,
6% of the forward and backward passes over 512 x 256 tokens (about 1,000 TFLOP).
"""

from configs import llama_1b_adamw


def get_config():
  config = llama_1b_adamw.get_config()
  config.optimizer.name = "muon"
  return config
