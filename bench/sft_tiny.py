"""A tiny end-to-end fine-tuning run on real instruction-style text, offline.

1. Pre-train a tiny LLaMA on the C4 sample (trainer, AdamW, byte or T5 vocabulary) and
   export it with `model.export_to` as a Hugging Face directory: the "pretrained checkpoint".
2. Build an Alpaca-format instruction file from C4 (bench/c4_instructions.py: "continue the
   text" and "which website is this from" examples; train from C4 train, held out from C4
   validation).
3. Held-out response loss of the base model (library: from_pretrained + instruction batches).
4. Fine-tune it with `configs/llama_sft_lora.py` (adapters only) from `model.init_from`,
   evaluating the held-out response loss as it goes, and export the merged model.
5. The exported model's held-out response loss, recomputed from the export (the round trip).

    python bench/sft_tiny.py --pretrain_steps 150 --seq_len 512 --sft_steps 60 --eval_batches 2
Writes bench/results/sft_tiny.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import jax
from flax import nnx

import c4_instructions
from _common import RESULTS, SHARED_DATA as SHARED, meta, write_json
from configs import base, llama_sft_lora  # importable once _common is imported
from lowrank_jax import data as data_lib
from lowrank_jax import models
from lowrank_jax.train import train
from lowrank_jax.train.losses import instruction_loss


def response_loss(model_dir: str, eval_file: str, tokenizer: str, seq_len: int, batches: int) -> float:
  """Mean cross-entropy of the held-out responses under the model in `model_dir`."""
  model = models.from_pretrained(model_dir)
  tok = data_lib.make_tokenizer(tokenizer)
  source = data_lib.InstructionSource(eval_file)
  evals = data_lib.make_instruction_eval_batches(source, tok, seq_len=seq_len, batch_size=8, num_batches=batches)
  loss = nnx.jit(instruction_loss)
  totals = [jax.device_get(loss(model, b)) for b in evals]
  return float(sum(t for t, _ in totals) / sum(c for _, c in totals))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--pretrain_steps', type=int, default=400)
  parser.add_argument('--sft_steps', type=int, default=150)
  parser.add_argument('--seq_len', type=int, default=256)
  parser.add_argument('--sft_seq_len', type=int, default=512)
  parser.add_argument('--eval_batches', type=int, default=4)
  parser.add_argument('--tokenizer', default='byte', help="'byte' or a SentencePiece model (e.g. the T5 one)")
  args = parser.parse_args()
  info = meta(args)
  work = tempfile.mkdtemp(prefix='sft_tiny_')
  data_dir = os.path.join(work, 'c4_sft')
  counts = c4_instructions.build(data_dir, prompt_chars=160, response_chars=80)  # rows of ~450 bytes

  config = base.get_config()
  config.model.size = 'tiny'
  config.data.source = 'jsonl'
  config.data.path = os.path.join(SHARED, 'c4', 'train.jsonl')
  config.data.eval_path = os.path.join(SHARED, 'c4', 'validation.jsonl')
  config.data.tokenizer = args.tokenizer
  config.data.seq_len = args.seq_len
  config.train.steps = args.pretrain_steps
  config.train.batch_size = 8
  config.train.eval_every = 0
  config.train.checkpoint_every = 0
  config.train.progress_bar = False
  config.optimizer.lr = 3e-3
  config.model.export_to = os.path.join(work, 'base_hf')
  pre = train(config, os.path.join(work, 'pretrain'))
  base_dir = config.model.export_to

  eval_file = os.path.join(data_dir, 'eval.jsonl')
  before = response_loss(base_dir, eval_file, args.tokenizer, args.sft_seq_len, args.eval_batches)

  sft = llama_sft_lora.get_config()
  sft.model.init_from = base_dir
  sft.model.dtype = sft.model.param_dtype = 'float32'
  sft.model.export_to = os.path.join(work, 'sft_hf')
  sft.data.path = os.path.join(data_dir, 'train.jsonl')
  sft.data.eval_path = eval_file
  sft.data.tokenizer = args.tokenizer
  sft.data.seq_len = args.sft_seq_len
  sft.train.steps = args.sft_steps
  sft.train.batch_size = 8
  sft.train.eval_every = max(1, args.sft_steps // 5)
  sft.train.eval_batches = args.eval_batches
  sft.train.checkpoint_every = 0
  sft.train.progress_bar = False
  sft.optimizer.lr = 2e-3
  sft.optimizer.warmup = 0.05
  sft.optimizer.lora.rank = 16
  sft.optimizer.lora.alpha = 32.0
  run_dir = os.path.join(work, 'sft')
  summary = train(sft, run_dir)
  with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
    curve = [(r['step'], r['eval_loss']) for r in map(json.loads, f) if 'eval_loss' in r]
  after = response_loss(sft.model.export_to, eval_file, args.tokenizer, args.sft_seq_len, args.eval_batches)

  print(f'instruction data: {counts} (Alpaca format from the C4 sample; eval = C4 validation documents)')
  print(f'base: tiny LLaMA (d 128, 2 layers), pre-trained {args.pretrain_steps} steps on C4, '
        f'final train loss {pre["train_loss"]:.3f}; tokenizer {args.tokenizer}; exported to HF format')
  print(f'SFT: LoRA rank 16 on q,k,v,o,gate,up,down (adapters only), {args.sft_steps} steps x 8 x {args.sft_seq_len}')
  print(f'held-out response loss (nats/token): base {before:.4f}')
  for step, loss in curve:
    print(f'  step {step:5d}: {loss:.4f}')
  print(f'exported SFT model, reloaded: {after:.4f}')
  result = {'instruction_examples': counts, 'pretrain_steps': args.pretrain_steps, 'sft_steps': args.sft_steps,
            'seq_len': args.seq_len, 'sft_seq_len': args.sft_seq_len, 'tokenizer': args.tokenizer,
            'base_response_loss': before, 'eval_curve': curve,
            'exported_response_loss': after, 'sft_trainable_params': summary.get('trainable_params')}
  out = write_json(os.path.join(RESULTS, 'sft_tiny.json'), result, meta=info, indent=2)
  print('wrote', out)
  shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
