"""Fine-tune a local Hugging Face LLaMA directory on instruction data with LoRA.

  python train.py --config configs/llama_sft_lora.py --workdir runs/sft_lora \
      --config.model.init_from=~/llama-7b-hf --config.data.path=~/alpaca_data.jsonl \
      --config.model.export_to=~/llama-7b-alpaca-lora

The recipe of the VeLoRA paper's LLaMA/Alpaca runs (its scripts/finetune_llama_7b.sh on the
Alpaca-LoRA trainer), without VeLoRA: LoRA rank 32, alpha 16 on q, k, v, o, gate, up, down, the
adapters alone trained (the base weights, embeddings and norms frozen), AdamW lr 4e-4 without
weight decay, batch 16, sequences cut at 512 tokens, 4 epochs of Alpaca's 52,002 examples less
1,024 held out (12,740 steps), the Alpaca prompt template, bf16 (fp16 there).
Differences: LoRA dropout is 0 (0.1 there; the trainer does not support it yet); warmup 100 steps
then cosine to 0 (linear there); the loss counts response tokens only and examples are packed
(the script trains on prompts too: --config.data.instructions.train_on_prompt=True).

`configs/hf/llama_7b` holds LLaMA-7B's config.json alone: enough for
`--memory_report --config.model.init_from=configs/hf/llama_7b` without the weights.
"""

from configs import base


def get_config():
  config = base.get_config()
  config.model.init_from = "configs/hf/llama_7b"  # your model directory (config.json + safetensors)
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.data.source = "instructions"
  config.data.path = "alpaca_data.jsonl"  # Alpaca's JSON-lines: instruction / input / output
  config.data.eval_holdout = 1024 / 52002
  config.data.instructions.format = "alpaca"
  config.data.seq_len = 512
  config.train.steps = 12_740
  config.train.batch_size = 16
  config.train.eval_every = 1000
  config.train.checkpoint_every = 1000
  config.optimizer.name = "lora"
  config.optimizer.lr = 4e-4
  config.optimizer.schedule = "cosine"
  config.optimizer.warmup = 100 / 12_740
  config.optimizer.min_lr_ratio = 0.0
  config.optimizer.weight_decay = 0.0
  config.optimizer.lora.layers = "q,k,v,o,gate,up,down"
  config.optimizer.lora.rank = 32
  config.optimizer.lora.alpha = 16.0
  config.optimizer.lora.train_rest = False
  return config
