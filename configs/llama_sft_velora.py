"""Fine-tune a local Hugging Face LLaMA directory on instruction data with LoRA + VeLoRA.

  python train.py --config configs/llama_sft_velora.py --workdir runs/sft_velora \
      --config.model.init_from=~/llama-7b-hf --config.data.path=~/alpaca_data.jsonl

The VeLoRA paper's LLaMA-7B/Alpaca setting (scripts/finetune_llama_7b.sh): the LoRA recipe of
configs/llama_sft_lora.py plus VeLoRA on v and down (its `--velora_layers vd`) with 32 groups per
token, i.e. sub-tokens of 4096 / 32 = 128 (v) and 11008 / 32 = 344 (down) for LLaMA-7B,
`batch_average_once` initialisation and gradient scale 0.1. The LoRA layers compress their adapters'
input. For another model, set `model.velora.layers` to its widths / 32 (e.g. "v:64,down:172" for
LLaMA-1B-shaped d 2048, ff 5504).
"""

from configs import llama_sft_lora


def get_config():
  config = llama_sft_lora.get_config()
  config.model.velora.layers = "v:128,down:344"
  config.model.velora.scale = 0.1
  config.model.velora.v_init = "batch_average_once"
  return config
