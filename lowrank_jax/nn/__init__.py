"""lowrank_jax.nn: Flax NNX layers (no dependency on the rest of lowrank_jax)."""

from lowrank_jax.nn.dense import Dense
from lowrank_jax.nn.norm import RMSNorm
from lowrank_jax.nn.rope import apply_rope, rope_frequencies

__all__ = ['Dense', 'RMSNorm', 'apply_rope', 'rope_frequencies']
