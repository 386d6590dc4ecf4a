"""LLaMA-7B + GaLore (rank 1024) on C4 on one 16 GiB chip: int8 weights, 8-bit states (Q-GaLore's setting).

  python train.py --config configs/llama_7b_galore.py
  python train.py --config configs/llama_7b_galore.py --memory_report --memory_target=tpu-v5e
"""

from configs import llama_7b_recipe


def get_config():
  config = llama_7b_recipe.get_config()
  config.optimizer.name = "galore"
  config.optimizer.lr = 0.005
  config.optimizer.galore.rank = 1024
  config.optimizer.galore.scale = 0.25
  config.optimizer.galore.update_proj_gap = 500
  config.optimizer.galore.projector_dtype = "bfloat16"
  return config
