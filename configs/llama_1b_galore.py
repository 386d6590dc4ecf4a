"""LLaMA-1b + GaLore on C4: the GaLore paper's recipe (rank 512, projector refreshed every 200 steps, scale 0.25, lr 0.01).

  python train.py --config configs/llama_1b_galore.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("1b", steps=100_000)
  config.optimizer.name = "galore"
  config.optimizer.lr = 0.01
  config.optimizer.galore.rank = 512
  config.optimizer.galore.scale = 0.25
  config.optimizer.galore.update_proj_gap = 200
  config.train.grad_accum = 8  # micro-batches of 64 sequences, as the paper's per-GPU batch
  config.optimizer.galore.projector_dtype = "bfloat16"  # projectors and low-rank moments
  # Lean settings (docs/memory.md): clip by the previous step's norm, so no update waits for the
  # whole backward pass, and the output head over 64 positions at a time (no [tokens, vocab] logits).
  config.optimizer.clip_mode = "previous"
  config.train.loss_chunk_positions = 64
  return config
