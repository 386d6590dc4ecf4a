"""LLaMA-1b + Fira on C4: the Fira paper's recipe (GaLore's: rank 512, SVD refresh every 200 steps, scale 0.25; residual scaled channel-wise, norm-growth limit 1.01, lr 0.01).

  python train.py --config configs/llama_1b_fira.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("1b", steps=100_000)
  config.optimizer.name = "fira"
  config.optimizer.lr = 0.01
  config.optimizer.fira.rank = 512
  config.optimizer.fira.scale = 0.25
  config.optimizer.fira.update_proj_gap = 200
  config.train.grad_accum = 8  # micro-batches of 64 sequences, as the GaLore 1b config
  return config
