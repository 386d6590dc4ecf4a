"""GPT-2 runs as in the project that motivated multi-head LoRA: GPT-2 124M, context 512.

The data default to the C4 sample with the T5 vocabulary (the GPT-2 BPE vocabulary is not
shipped); point `data.*` at your own corpus and tokenizer. With GPT-2's own vocabulary, give its
local tiktoken file, `--config.data.tokenizer=/path/to/r50k_base.tiktoken` (50,257 tokens, EOS
`<|endoftext|>`), or a GPT-2 model directory / `tokenizer.json`. Batch, steps and learning rate
are our choices (the motivating project did not state them).
"""

from configs import c4_recipe


def get_config(size: str = "124m"):
  config = c4_recipe.get_config(size, steps=10_000)
  config.model.family = "gpt2"
  config.model.tie_embeddings = True  # GPT-2 ties the head to the token embedding
  config.data.seq_len = 512
  config.train.batch_size = 64
  config.train.grad_accum = 1
  config.optimizer.lr = 1e-3
  return config
