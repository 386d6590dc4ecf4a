"""The registry of training methods: `config.optimizer.name` -> a `Method` (settings + optimizer + hooks).

One file per method family; each registers itself on import:
  adamw.py     full-rank AdamW, the baseline
  sgd.py       SGD with momentum, the full-rank memory floor (the worked example of CONTRIBUTING.md)
  lora.py      LoRA and ReLoRA (adapter linears; ReLoRA's merges, jagged schedule and warm start)
  subspace.py  GaLore, Online Subspace Descent, APOLLO, APOLLO-Mini and Fira (optimizers in a subspace)
  mhlora.py    LTE multi-head LoRA (heads that can live on separate devices)
  muon.py      Muon (orthogonalised momentum on kernels, AdamW on the rest): the other full-rank baseline
"""

from lowrank_jax.train.methods.base import (Heads, Linears, Method, WarmStart, adam_moments, build_adamw, decay_mask,
                                            get_method, make_schedule, method_names, register,
                                            registered)
from lowrank_jax.train.methods import adamw as _adamw  # noqa: F401  (registers)
from lowrank_jax.train.methods import lora as _lora  # noqa: F401
from lowrank_jax.train.methods import mhlora as _mhlora  # noqa: F401
from lowrank_jax.train.methods import muon as _muon  # noqa: F401
from lowrank_jax.train.methods import sgd as _sgd  # noqa: F401
from lowrank_jax.train.methods import subspace as _subspace  # noqa: F401

__all__ = ["Heads", "Linears", "Method", "WarmStart", "adam_moments", "build_adamw", "decay_mask", "get_method",
           "make_schedule", "method_names", "register", "registered"]
