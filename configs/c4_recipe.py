"""The GaLore paper's C4 pre-training recipe, shared by the 60m/130m/... configs.

Sequence 256, a total batch of 512 sequences, AdamW-style cosine schedule with
10% warmup decaying to 0.1x, bfloat16 weights, the T5 C4 SentencePiece vocabulary.

The data paths default to the team's shared sample (`../shared/data`, relative to
the repository). For the real corpus point them at your own copies:
  --config.data.data_dir=~/tensorflow_datasets   (holding c4/en/3.1.0, prepared by TFDS)
  --config.data.tokenizer=/path/to/c4_t5_32k.model
or train on JSON lines with --config.data.source=jsonl --config.data.path=... .
"""

from configs import base

SHARED = "../shared/data"


def get_config(size: str, steps: int):
  config = base.get_config()
  config.model.size = size
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.data.source = "tfds"
  config.data.tfds_name = "c4/en:3.1.0"
  config.data.data_dir = f"{SHARED}/tfds"
  config.data.tokenizer = f"{SHARED}/tokenizers/c4_t5_32k.model"
  config.data.seq_len = 256
  config.train.steps = steps
  config.train.batch_size = 512
  config.train.grad_accum = 2  # 256 sequences per micro-batch, as the paper's per-GPU batch
  config.train.log_every = 10
  config.train.eval_every = 1000
  config.train.eval_batches = 16
  config.train.checkpoint_every = 1000
  config.optimizer.warmup = 0.1
  config.optimizer.min_lr_ratio = 0.1
  config.optimizer.weight_decay = 0.0
  return config
