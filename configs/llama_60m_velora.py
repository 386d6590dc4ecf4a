"""LLaMA-60M + AdamW with VeLoRA on C4 (the GaLore recipe, as the VeLoRA paper's C4 runs).

  python train.py --config configs/llama_60m_velora.py

Sub-token sizes as the official scripts (8 on the attention side, 16 for down), but
on o and down rather than the official v and down: v shares its input with q and k,
which still save it, so compressing v alone frees nothing (it costs the projections;
see the measured table in docs/results/memory.md, "VeLoRA layer choices at 130m, sequence 1024").
o's and down's inputs have no other consumer.
"""

from configs import c4_recipe


def get_config():
  config = c4_recipe.get_config("60m", steps=10_000)
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  config.model.velora.layers = "o:8,down:16"
  return config
