"""LLaMA-60m + Muon on C4: the AdamW baseline's recipe (10K steps, lr 1e-3) with Muon on the kernels.

  python train.py --config configs/llama_60m_muon.py

Muon's update is scaled to AdamW's RMS (optimizer.muon.consistent_rms 0.2, Liu et al. 2025), so the lr
and weight decay tuned for AdamW carry over unchanged (not tuned for Muon at this size).
"""

from configs import llama_60m_adamw


def get_config():
  config = llama_60m_adamw.get_config()
  config.optimizer.name = "muon"
  return config
