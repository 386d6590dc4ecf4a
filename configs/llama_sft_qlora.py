"""QLoRA: fine-tune a Hugging Face LLaMA held in 4-bit NF4, with bf16 LoRA adapters on every linear.

  python train.py --config configs/llama_sft_qlora.py --workdir runs/sft_qlora \
      --config.model.init_from=meta-llama/Llama-2-7b-hf --config.data.path=~/alpaca_data.jsonl \
      --config.model.export_adapter_to=~/llama-7b-alpaca-qlora

The recipe of QLoRA (Dettmers et al., 2023, arXiv 2305.14314, sec. 4 and appendix B) on the
Alpaca data of configs/llama_sft_lora.py: the frozen base in NF4 with blocks of 64 and double
quantization (its scales in 8 bits), quantized tensor by tensor while the checkpoint loads; LoRA on
q, k, v, o, gate, up, down (QLoRA's "all linear layers"), rank 16 and alpha 16 here (the paper: 64
and 16); AdamW without weight decay, lr 2e-4 held constant after a 3% warmup, gradients clipped at
0.3; batch 16 as micro-batches of 4 x 512 tokens with block rematerialisation and the loss taken 64
positions at a time, bf16. Differences:
LoRA dropout is 0 (0.1 there for 7B); AdamW's moments are float32 (QLoRA pages them to the CPU).
The adapters are written in the PEFT format (`model.export_adapter_to`); the merged bf16 model with
`model.export_to`.

`configs/hf/llama_7b` holds LLaMA-7B's config.json alone: enough for
`--memory_report --memory_target=tpu-v5e` without the weights.
"""

from configs import llama_sft_lora


def get_config():
  config = llama_sft_lora.get_config()
  config.model.base_bits = 4
  config.model.base_double_quant = True
  config.model.remat = "block"
  config.train.grad_accum = 4  # micro-batches of 4 x 512
  config.train.loss_chunk_positions = 64  # no [tokens, vocab] float32 logits at once
  config.optimizer.lr = 2e-4
  config.optimizer.schedule = "constant"
  config.optimizer.warmup = 0.03
  config.optimizer.grad_clip = 0.3
  config.optimizer.lora.rank = 16
  config.optimizer.lora.alpha = 16.0
  return config
