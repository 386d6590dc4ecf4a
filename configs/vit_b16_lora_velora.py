"""ViT-B/16 on PathMNIST with LoRA (rank 16) and VeLoRA compressing the adapters' inputs
(sub-token 16) on q, k, v, o and up: the LoRA + VeLoRA row of VeLoRA's ViT table.

VeLoRA's ViT code compresses the input of every LoRA-adapted layer (its LoRA adapts q and v).
Here LoRA adapts q, k, v, o, up and down (the LTE + GaLore study's layers); VeLoRA is on those
whose input the LoRA step keeps only for the adapter: the first LayerNorm's output (read by q, k
and v: all three must be compressed to free it), the attention output (o) and the second
LayerNorm's output (up). Not on down: its input, the GELU's output, is never kept (the step
rebuilds it from the GELU's own saved values), so compressing it would only add its scalars.
bench/vit_memory_rank.py measures both choices (docs/vision.md, "Memory: what the measurements show").

  python train.py --config configs/vit_b16_lora_velora.py --config.data.path=/data/pathmnist_224.npz
"""

from configs import vit_b16_lora


def get_config():
  config = vit_b16_lora.get_config()
  config.model.velora.layers = "q:16,k:16,v:16,o:16,up:16"
  return config
