"""LLaMA-7B pre-training on one 16 GiB accelerator: the settings all three 7B configs share.

The GaLore paper's single-device 7B setting (C4, sequence 256, micro-batch 16, no gradient
accumulation: the accumulated sum would be one more full set of gradients), with the settings
that make it fit:

* `model.weight_bits=8`: every kernel, the head and the embedding in int8 with stochastic
  rounding (6.3 GiB instead of bf16's 12.6 GiB);
* `optimizer.state_bits=8`: optimizer moments in 8 bits;
* `model.remat=block`: each block keeps only its input for the backward pass;
* `train.nonfinite_guard=loss` and `optimizer.clip_mode=previous`: nothing waits for the global
  gradient norm, so each layer's gradient is freed right after its update;
* `train.loss_chunk_positions=64`: no [tokens, vocab] float32 logits.

`python train.py --config configs/llama_7b_galore.py --memory_report --memory_target=tpu-v5e`
says whether it fits (docs/memory.md).
"""

from configs import c4_recipe


def get_config(steps: int = 150_000):
  config = c4_recipe.get_config("7b", steps=steps)
  config.model.weight_bits = 8
  config.model.remat = "block"
  config.optimizer.state_bits = 8
  config.optimizer.clip_mode = "previous"
  config.train.nonfinite_guard = "loss"
  config.train.loss_chunk_positions = 64
  config.train.batch_size = 16
  config.train.grad_accum = 1
  return config
