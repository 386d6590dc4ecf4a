"""LLaMA-130m + Online Subspace Descent on C4: the GaLore paper's recipe (rank 256, scale 0.25, lr 0.01).

  python train.py --config configs/llama_130m_osd.py
  python train.py --config configs/llama_130m_osd.py --memory_report
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("130m", steps=20_000)
  config.optimizer.name = "osd"
  config.optimizer.lr = 0.01
  config.optimizer.osd.rank = 256
  config.optimizer.osd.scale = 0.25
  return config
