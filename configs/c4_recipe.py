"""The GaLore paper's C4 pre-training recipe, shared by the 60m/130m/... configs.

Sequence 256, a total batch of 512 sequences, AdamW-style cosine schedule with
10% warmup decaying to 0.1x, bfloat16 weights, the T5 C4 SentencePiece vocabulary.

The data: C4 English streamed from the Hugging Face Hub (`allenai/c4`, config `en`; nothing
is downloaded ahead) with the T5 vocabulary by its Hub id (`google-t5/t5-base`, the tokenizer
GaLore used), so a fresh clone needs no data beside it. Other ways:
  --config.data.preset=sample   the C4 sample shipped in the package (300 documents) with its
                                T5 SentencePiece model (T5's pieces plus a BOS, so ids shift
                                by one): a quick check on one machine, no network
  --config.data.source=tfds --config.data.data_dir=~/tensorflow_datasets
                                a prepared c4/en:3.1.0 (TFDS); set data.tokenizer to a local
                                c4_t5_32k.model when offline
  --config.data.source=jsonl --config.data.path=... --config.data.eval_path=...   JSON lines
"""

from configs import base


def get_config(size: str, steps: int):
  config = base.get_config()
  config.model.size = size
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "bfloat16"
  config.data.source = "hf"
  config.data.hf.path = "allenai/c4"
  config.data.hf.name = "en"  # streamed (data.hf.streaming auto: a Hub id), not its 305 GB downloaded first
  config.data.tokenizer = "google-t5/t5-base"
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
