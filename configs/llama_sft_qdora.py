"""QDoRA: the QLoRA recipe of configs/llama_sft_qlora.py with DoRA adapters.

  python train.py --config configs/llama_sft_qdora.py --workdir runs/sft_qdora \
      --config.model.init_from=meta-llama/Llama-2-7b-hf --config.data.path=~/alpaca_data.jsonl

DoRA (Liu et al., 2024, arXiv 2402.09353) splits each adapted weight into a magnitude per output
column, trained, and a direction, W + s A B normalised column by column; the norm is held out of the
gradient as the paper's sec. 4.3 and PEFT do. Over the NF4 base this is QDoRA: the base is
dequantized one layer at a time for the product and for the norm. The adapters export in the PEFT
format with `use_dora` (`model.export_adapter_to`).
"""

from configs import llama_sft_qlora


def get_config():
  config = llama_sft_qlora.get_config()
  config.optimizer.lora.variant = "dora"
  return config
