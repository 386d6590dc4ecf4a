"""LLaMA-1b + AdamW on C4: the full-rank baseline of the 1b configs (lr 1e-3, as the GaLore paper's 1b AdamW).

  python train.py --config configs/llama_1b_adamw.py
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("1b", steps=100_000)
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  config.train.grad_accum = 8  # micro-batches of 64 sequences, as the GaLore 1b config
  # Lean settings (docs/memory.md): clip by the previous step's norm, so no update waits for the
  # whole backward pass, and the output head over 64 positions at a time (no [tokens, vocab] logits).
  config.optimizer.clip_mode = "previous"
  config.train.loss_chunk_positions = 64
  return config
