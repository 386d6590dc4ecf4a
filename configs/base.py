"""Shared defaults for every configuration; other configs state only what differs.

Every key is documented here once. Override any of them on the command line, e.g.
`python train.py --config configs/llama_tiny_adamw.py --config.optimizer.lr=3e-3`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # model init, data order and every other random draw

  # --- model -------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.family = "llama"  # llama or gpt2
  config.model.size = "tiny"  # llama: tiny, 60m, 130m, 350m, 1b, 7b (GaLore paper shapes); gpt2: tiny, 124m, ...
  config.model.dtype = "float32"  # compute dtype: float32 or bfloat16
  config.model.param_dtype = "float32"  # storage dtype of parameters (and so of Adam moments)
  config.model.tie_embeddings = False
  config.model.remat = False  # activation checkpointing per transformer block
  config.model.vocab_multiple = 128  # pad the vocabulary up to a multiple (fast matmuls on GPU)
  # Linear layer kind per layer name (q, k, v, o, gate, up, down, head); unnamed layers are
  # 'dense'. Methods such as LoRA fill this in; set it directly to override.
  config.model.linear = ml_collections.ConfigDict()
  # VeLoRA: compress the activations these linears save for backward to rank-1 sub-token
  # projections. "layer[:sub_token_size],..." e.g. "v:8,down:16" (the official choice); empty = off.
  # Works on dense and LoRA linears; composes with any optimizer method.
  config.model.velora = ml_collections.ConfigDict()
  config.model.velora.layers = ""
  config.model.velora.sub_token_size = 16  # for layers listed without a size
  config.model.velora.scale = 1.0  # multiplies the compressed weight gradient
  config.model.velora.v_init = "batch_average_once"  # batch_average_once, batch_average, random

  # --- data --------------------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"  # synthetic, jsonl, text, tfds
  config.data.path = ""  # jsonl/text: file(s) or glob(s) for training, comma separated
  config.data.eval_path = ""  # jsonl/text: validation file(s); empty = hold out eval_holdout
  config.data.eval_holdout = 0.05  # fraction of documents held out when eval_path is empty
  config.data.text_key = "text"  # jsonl/tfds: the field holding the document text
  config.data.tfds_name = "c4/en:3.1.0"  # tfds: dataset/config:version under data_dir
  config.data.data_dir = ""  # tfds: data_dir (empty = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.tokenizer = "byte"  # 'byte' or a SentencePiece .model path (ignored by synthetic)
  config.data.seq_len = 128  # tokens per packed sequence (the model's context)
  config.data.shuffle = True
  # The built-in language (source 'synthetic'): a sparse Markov chain with a known entropy rate.
  config.data.synthetic = ml_collections.ConfigDict()
  config.data.synthetic.vocab_size = 256
  config.data.synthetic.branching = 4
  config.data.synthetic.stop_prob = 1 / 64

  # --- training ----------------------------------------------------------------
  config.train = ml_collections.ConfigDict()
  config.train.steps = 300  # optimizer steps
  config.train.batch_size = 16  # global batch, in sequences, per optimizer step
  config.train.grad_accum = 1  # micro-batches per step (batch_size must divide evenly)
  config.train.log_every = 10  # steps between metric fetches (the only host syncs)
  config.train.eval_every = 100  # steps between evaluations (0: only at the end)
  config.train.eval_batches = 4  # fixed validation batches per evaluation
  config.train.checkpoint_every = 100  # steps between checkpoints (0: only at the end)
  config.train.keep_checkpoints = 2  # checkpoints kept on disk
  config.train.progress_bar = True

  # --- parallelism -------------------------------------------------------------
  config.parallel = ml_collections.ConfigDict()
  config.parallel.mode = "mesh"  # mesh (jit over a device mesh) or pmap (jax.pmap + lax.pmean)
  config.parallel.fsdp = False  # mesh only: shard parameters and optimizer state over devices
  # mhlora parallel mode: each device holds its own heads (A, B, snapshots, optimizer state)
  # on a `heads` mesh axis and trains them on its own part of the batch; only merges
  # communicate. Needs optimizer.mhlora.num_heads to be a multiple of the device count.
  config.parallel.shard_heads = False

  # --- optimizer ---------------------------------------------------------------
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"  # a registered method; see lowrank_jax.train.methods
  config.optimizer.lr = 1e-3  # peak learning rate
  config.optimizer.schedule = "cosine"  # cosine (warmup then cosine decay) or constant
  config.optimizer.warmup = 0.1  # warmup length as a fraction of train.steps
  config.optimizer.min_lr_ratio = 0.1  # cosine decays to min_lr_ratio * lr (GaLore: 0.1)
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip = 1.0  # global-norm clipping (0: off)
  # galore: Adam on gradients projected to rank-r subspaces (attention and MLP kernels).
  config.optimizer.galore = ml_collections.ConfigDict()
  config.optimizer.galore.rank = 128
  config.optimizer.galore.update_proj_gap = 200  # steps between projector refreshes
  config.optimizer.galore.scale = 0.25  # alpha: the projected-back update is scaled by it
  config.optimizer.galore.proj_type = "std"  # std, reverse_std, left, right, full
  config.optimizer.galore.refresh = "svd"  # svd (exact, the paper) or randomized (warm-started)
  config.optimizer.galore.moments = "keep"  # at a refresh: keep (the paper), reset or rotate
  # Projector (and so low-rank moment) dtype: float32 (default) or bfloat16 (as the official
  # code in bf16 training, which casts the projector to the weights' dtype).
  config.optimizer.galore.projector_dtype = "float32"
  # osd: the projector follows the gradients by one online-PCA step per step.
  config.optimizer.osd = ml_collections.ConfigDict()
  config.optimizer.osd.rank = 128
  config.optimizer.osd.proj_type = "std"
  config.optimizer.osd.scale = 0.25
  config.optimizer.osd.projector_lr_ratio = 0.5  # projector LR = ratio x the weight LR schedule
  config.optimizer.osd.orthogonality = 0.0  # lambda of ||P^T P - I||^2 (the paper's; 0 as the code)
  config.optimizer.osd.projector_dtype = "float32"  # or bfloat16
  # lora / relora: which linears get adapters, and their shape.
  config.optimizer.lora = ml_collections.ConfigDict()
  config.optimizer.lora.layers = "q,k,v,o,gate,up,down"  # as the ReLoRA code; head/embeddings stay full
  config.optimizer.lora.rank = 128
  config.optimizer.lora.alpha = 32.0  # scale = alpha / rank
  config.optimizer.lora.dropout = 0.0
  # relora: merge, re-initialise and prune every merge_every steps.
  config.optimizer.relora = ml_collections.ConfigDict()
  config.optimizer.relora.merge_every = 5000
  config.optimizer.relora.restart_warmup_steps = 100  # LR ramp after each merge (jagged cosine)
  config.optimizer.relora.prune = "magnitude"  # magnitude, random (the code's default) or reset
  config.optimizer.relora.prune_ratio = 0.9  # fraction of adapter moments zeroed (README: 0.9)
  config.optimizer.relora.warm_start_steps = 0  # full-rank AdamW steps first (multiple of merge_every)
  config.optimizer.relora.warm_start_from = ""  # or: a full-rank run's workdir to start from
  config.optimizer.relora.seed = 0  # re-drawing A at merges, random pruning
  # mhlora (LTE): N LoRA heads per linear, merged into the main weight every merge_every steps.
  config.optimizer.mhlora = ml_collections.ConfigDict()
  config.optimizer.mhlora.layers = "q,k,v,o"  # attention linears, as the motivating GPT-2 runs
  config.optimizer.mhlora.num_heads = 4
  config.optimizer.mhlora.rank = 32
  config.optimizer.mhlora.alpha = 128.0  # scale = alpha / rank
  config.optimizer.mhlora.mode = "parallel"  # parallel (each head its own batch share) or mhlora
  config.optimizer.mhlora.merge_every = 10
  return config
