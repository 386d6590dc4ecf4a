"""lowrank_jax.models: LLaMA, GPT-2 and ViT, every linear built through one linear-layer factory;
Hugging Face checkpoints of all three in and out (`from_pretrained`, `save_pretrained`)."""

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
from lowrank_jax.models.pretrained import (
    PretrainedError,
    from_pretrained,
    pretrained_config,
    save_pretrained,
)

from lowrank_jax.models.vit import (
    VIT_SIZES,
    ViT,
    ViTConfig,
    vit_config,
)
from lowrank_jax.models.llama import DTYPES  # dtype names every family accepts (compute and storage)
from lowrank_jax.models.transformer import REMAT_POLICIES, remat_policy  # model.remat's choices
from lowrank_jax.models.transformer import DecoderLM  # LLaMA's and GPT-2's hidden_states() / logits()

# family -> (sizes, config builder, model class): what the trainer chooses from.
FAMILIES = {
    'llama': (LLAMA_SIZES, llama_config, Llama),
    'gpt2': (GPT2_SIZES, gpt2_config, GPT2),
    'vit': (VIT_SIZES, vit_config, ViT),  # images -> classes: vit_config(size, num_classes, ...)
}

__all__ = [
    'PretrainedError', 'from_pretrained', 'pretrained_config', 'save_pretrained',
    'REMAT_POLICIES', 'remat_policy', 'DecoderLM',
    'DTYPES', 'FAMILIES', 'GPT2', 'GPT2_SIZES', 'GPT2Config', 'gpt2_config',
    'LAYER_NAMES', 'LinearFactory', 'get_linear_builder', 'linear_kinds',
    'register_linear_kind', 'LLAMA_SIZES', 'Llama', 'LlamaConfig', 'count_params',
    'llama_config',
    'VIT_SIZES', 'ViT', 'ViTConfig', 'vit_config',
]
