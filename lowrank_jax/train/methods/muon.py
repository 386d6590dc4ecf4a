"""Muon: Newton-Schulz orthogonalised momentum on the linears' kernels, AdamW on the rest.

The full-rank baseline beside AdamW (`lowrank_jax.optim.muon`). With the default
`consistent_rms` (Liu et al.'s update RMS match) `optimizer.lr` and `optimizer.weight_decay`
mean what they mean for AdamW, for both kinds of leaves; the parameter groups
(`optimizer.embed_lr_scale`, `optimizer.other_lr_scale`) set the AdamW leaves' rates apart.
`optimizer.state_bits=8` stores the Muon momentum in 8 bits as Adam's moments.
"""

from __future__ import annotations

import dataclasses

import optax

from lowrank_jax.optim.muon import muon
from lowrank_jax.train.settings import OptimizerSettings, boolean, in_range, non_negative, positive_int, setting
from lowrank_jax.train.methods.base import Method, decay_mask, register


@register
@dataclasses.dataclass(frozen=True)
class Muon(Method):
  NAME = "muon"
  SECTION = "optimizer.muon"
  DESCRIPTION = ("Muon: Newton-Schulz orthogonalised Nesterov momentum on the linears' kernels, AdamW on the "
                 "embeddings, head and norms (decoupled weight decay on matrices)")
  beta: float = setting(0.95, in_range(0.0, 1.0))  # momentum decay of the kernels (b1, b2 are the AdamW leaves')
  nesterov: bool = setting(True, boolean)  # Nesterov momentum, as the reference Muon
  ns_steps: int = setting(5, positive_int)  # Newton-Schulz iterations (quintic, optax's coefficients)
  # Shape factor of the orthogonalised update: r * sqrt(max(fan_in, fan_out)) (update RMS about r, AdamW's:
  # AdamW's lr and weight decay then serve the kernels too; Liu et al. 2025), or 0 for the reference Muon's
  # sqrt(max(1, fan_out / fan_in)) (lr about 0.02 for the kernels: lower the others with the lr groups).
  consistent_rms: float = setting(0.2, non_negative)

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    return muon(schedule, beta=float(self.beta), ns_steps=self.ns_steps, nesterov=self.nesterov,
                consistent_rms=float(self.consistent_rms) or None, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                weight_decay=opt.weight_decay, weight_decay_mask=decay_mask)
