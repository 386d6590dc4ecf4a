"""lowrank-jax: memory-efficient LLM training in JAX.

Packages (imports point one way: train -> models, data, optim -> nn):
  lowrank_jax.optim   Optax transforms and schedules (usable in any Optax code).
  lowrank_jax.nn      Flax NNX layers (usable in any NNX model).
  lowrank_jax.models  LLaMA (and later GPT-2) built through one linear-layer factory.
  lowrank_jax.data    source -> tokenizer -> packing -> grain loader.
  lowrank_jax.train   config -> model + optimizer -> jit step -> loop, checkpoints.
"""

__version__ = "0.1.0"
