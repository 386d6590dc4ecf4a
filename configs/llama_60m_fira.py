"""LLaMA-60m + Fira on C4: the Fira paper's recipe (GaLore's: rank 128, SVD refresh every 200 steps, scale 0.25; residual scaled channel-wise, norm-growth limit 1.01, lr 0.01).

  python train.py --config configs/llama_60m_fira.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("60m", steps=10_000)
  config.optimizer.name = "fira"
  config.optimizer.lr = 0.01
  config.optimizer.fira.rank = 128
  config.optimizer.fira.scale = 0.25
  config.optimizer.fira.update_proj_gap = 200
  return config
