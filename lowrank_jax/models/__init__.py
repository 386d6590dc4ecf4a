"""lowrank_jax.models: LLaMA built through one linear-layer factory."""

from lowrank_jax.models.linear_factory import (
    LAYER_NAMES,
    LinearFactory,
    get_linear_builder,
    linear_kinds,
    register_linear_kind,
)
from lowrank_jax.models.llama import (
    LLAMA_SIZES,
    Llama,
    LlamaConfig,
    count_params,
    llama_config,
)

__all__ = [
    'LAYER_NAMES', 'LinearFactory', 'get_linear_builder', 'linear_kinds',
    'register_linear_kind', 'LLAMA_SIZES', 'Llama', 'LlamaConfig', 'count_params',
    'llama_config',
]
