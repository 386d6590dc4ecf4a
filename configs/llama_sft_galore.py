"""Fine-tune a local Hugging Face LLaMA directory on instruction data with GaLore (full-rank weights).

  python train.py --config configs/llama_sft_galore.py --workdir runs/sft_galore \
      --config.model.init_from=~/llama-7b-hf --config.data.path=~/alpaca_data.jsonl

GaLore's fine-tuning setting (its GLUE runs: rank 8, scale 4, projector refreshed every 500
steps, lr 3e-5) on the data side of configs/llama_sft_lora.py (Alpaca, batch 16, 512 tokens,
4 epochs). Every weight trains, Adam's moments live in the rank-8 subspaces.
"""

from configs import llama_sft_lora


def get_config():
  config = llama_sft_lora.get_config()
  config.optimizer.name = "galore"
  config.optimizer.lr = 3e-5
  config.optimizer.galore.rank = 8
  config.optimizer.galore.scale = 4.0
  config.optimizer.galore.update_proj_gap = 500
  return config
