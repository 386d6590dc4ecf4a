"""lowrank_jax.models: LLaMA, GPT-2 and ViT, every linear built through one linear-layer factory;
Hugging Face checkpoints of all three in and out (`from_pretrained`, `save_pretrained`).

Each family module registers one `Family` record (sizes, config builder, model class, task,
layer names, Hugging Face format); adding a family is one file and one import line below.
"""

from lowrank_jax.models.family import (
    TASKS,
    Family,
    family_names,
    family_of_architecture,
    get_family,
    hf_architectures,
    layer_names,
    register_family,
    registered_families,
)
from lowrank_jax.models.linear_factory import (
    LinearFactory,
    get_linear_builder,
    linear_kinds,
    register_linear_kind,
)
from lowrank_jax.models.transformer import DTYPES, ModelConfig  # dtype names every family accepts
from lowrank_jax.models.transformer import REMAT_POLICIES, remat_policy  # model.remat's choices
from lowrank_jax.models.transformer import ATTENTION_KERNELS, SPLASH_BLOCK, attend  # model.attention
from lowrank_jax.models.transformer import DecoderLM  # LLaMA's and GPT-2's hidden_states() / logits()
# The families: importing a module registers it.
from lowrank_jax.models.llama import LLAMA_SIZES, Llama, LlamaConfig, count_params, llama_config
from lowrank_jax.models.gpt2 import GPT2, GPT2_SIZES, GPT2Config, gpt2_config
from lowrank_jax.models.vit import VIT_SIZES, ViT, ViTConfig, vit_config
from lowrank_jax.models.hf_format import HFFormat, PretrainedError
from lowrank_jax.models.pretrained import (
    family_of,
    from_pretrained,
    pretrained_config,
    save_pretrained,
)
from lowrank_jax.models.peft_adapter import PeftAdapterError, load_adapter, read_adapter_config, save_adapter

__all__ = [
    'TASKS', 'Family', 'family_names', 'family_of_architecture', 'get_family', 'hf_architectures',
    'layer_names', 'register_family', 'registered_families',
    'HFFormat', 'PretrainedError', 'family_of', 'from_pretrained', 'pretrained_config', 'save_pretrained',
    'PeftAdapterError', 'load_adapter', 'read_adapter_config', 'save_adapter',
    'DTYPES', 'ModelConfig', 'REMAT_POLICIES', 'remat_policy', 'DecoderLM',
    'ATTENTION_KERNELS', 'SPLASH_BLOCK', 'attend',
    'LinearFactory', 'get_linear_builder', 'linear_kinds', 'register_linear_kind',
    'LLAMA_SIZES', 'Llama', 'LlamaConfig', 'count_params', 'llama_config',
    'GPT2', 'GPT2_SIZES', 'GPT2Config', 'gpt2_config',
    'VIT_SIZES', 'ViT', 'ViTConfig', 'vit_config',
]
