"""LLaMA-130m + GaLore on C4: the GaLore paper's recipe (rank 256, projector refreshed every 200 steps, scale 0.25, lr 0.01).

  python train.py --config configs/llama_130m_galore.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("130m", steps=20_000)
  config.optimizer.name = "galore"
  config.optimizer.lr = 0.01
  config.optimizer.galore.rank = 256
  config.optimizer.galore.scale = 0.25
  config.optimizer.galore.update_proj_gap = 200
  return config
