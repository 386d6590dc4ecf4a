"""lowrank_jax.nn: Flax NNX layers (no dependency on the rest of lowrank_jax).

* `Dense`: the plain bias-free linear every other kind mirrors.
* `LoRALinear`: frozen kernel + trainable low-rank adapter (LoRA, ReLoRA; DoRA, rsLoRA, PiSSA).
* `VeLoRALinear` / `velora_matmul`: rank-1 sub-token compression of the
  activations saved for backward (VeLoRA), as a layer or on any matmul.
* `MultiHeadLoRALinear`: N parallel LoRA heads merged into W (LTE).
* `RMSNorm`, `apply_rope`: LLaMA's building blocks.
* `int8_weight`: trainable weights stored in int8, updated with stochastic rounding.
* `quantized_base`: frozen base kernels in NF4 or int8 under LoRA adapters (QLoRA).
"""

from lowrank_jax.nn import int8_weight, quantized_base
from lowrank_jax.nn.dense import MATMUL_INPUT, Dense
from lowrank_jax.nn.lora import LoRALinear, lora_a_bound, lora_a_init
from lowrank_jax.nn.mhlora import MultiHeadLoRALinear
from lowrank_jax.nn.norm import RMSNorm
from lowrank_jax.nn.rope import apply_rope, rope_frequencies
from lowrank_jax.nn.velora import (
    V_INITS,
    VeLoRAInitialised,
    VeLoRALinear,
    VeLoRAVector,
    next_velora_vector,
    velora_matmul,
)

__all__ = [
    'Dense', 'LoRALinear', 'MATMUL_INPUT', 'MultiHeadLoRALinear', 'RMSNorm', 'V_INITS', 'VeLoRAInitialised', 'VeLoRALinear', 'VeLoRAVector',
    'apply_rope', 'int8_weight', 'lora_a_bound', 'lora_a_init', 'next_velora_vector', 'quantized_base', 'rope_frequencies', 'velora_matmul',
]
