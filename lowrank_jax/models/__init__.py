"""lowrank_jax.models: LLaMA and GPT-2, every linear built through one linear-layer factory."""

from lowrank_jax.models.linear_factory import (
    LAYER_NAMES,
    LinearFactory,
    get_linear_builder,
    linear_kinds,
    register_linear_kind,
)
from lowrank_jax.models.gpt2 import GPT2, GPT2_SIZES, GPT2Config, gpt2_config
from lowrank_jax.models.llama import (
    LLAMA_SIZES,
    Llama,
    LlamaConfig,
    count_params,
    llama_config,
)

# family -> (sizes, config builder, model class): what the trainer chooses from.
FAMILIES = {
    'llama': (LLAMA_SIZES, llama_config, Llama),
    'gpt2': (GPT2_SIZES, gpt2_config, GPT2),
}

__all__ = [
    'FAMILIES', 'GPT2', 'GPT2_SIZES', 'GPT2Config', 'gpt2_config',
    'LAYER_NAMES', 'LinearFactory', 'get_linear_builder', 'linear_kinds',
    'register_linear_kind', 'LLAMA_SIZES', 'Llama', 'LlamaConfig', 'count_params',
    'llama_config',
]
