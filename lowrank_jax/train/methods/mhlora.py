"""LTE multi-head LoRA: N LoRA heads per linear merged into the kernel every merge_every steps.

In parallel mode each head trains on its own share of the batch, so the heads can live
on separate devices (`Heads`, used by `parallel.shard_heads`).
"""

from __future__ import annotations

import dataclasses

import optax

from lowrank_jax.nn.mhlora import MODES
from lowrank_jax.optim.lte import lte_head_mask, lte_merge
from lowrank_jax.train.settings import (OptimizerSettings, RunConfig, comma_list, layer_names, one_of, positive,
                                      positive_int, setting)
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.methods.base import Heads, Linears, Method, build_adamw, register


@register
@dataclasses.dataclass(frozen=True)
class MultiHeadLoRA(Method):
  NAME = "mhlora"
  SECTION = "optimizer.mhlora"
  DESCRIPTION = ("LTE multi-head LoRA: N LoRA heads (each on its own share of the batch in parallel mode) "
                 "merged into the main weights every merge_every steps")
  layers: str = setting("q,k,v,o", layer_names)  # attention linears, as the motivating GPT-2 runs
  num_heads: int = setting(4, positive_int)  # LoRA heads per adapted linear; parallel mode: must divide the micro-batch
  rank: int = setting(32, positive_int)  # rank of every head
  alpha: float = setting(128.0, positive)  # scale = alpha / rank
  mode: str = setting("parallel", one_of(MODES))  # parallel (each head its own batch share) or mhlora
  merge_every: int = setting(10, positive_int)  # steps between merges of the heads' average progress into the kernels

  def check_run(self, run: RunConfig) -> None:
    parallel = self.mode == "parallel"
    micro = run.train.micro_batch
    if parallel and micro % self.num_heads:
      raise ConfigError("optimizer.mhlora.num_heads", f"parallel heads each train on their own share of the "
                        f"micro-batch, so it ({micro} sequences) must be divisible by num_heads={self.num_heads}")
    if parallel and run.parallel.mode == "pmap" and not run.parallel.shard_heads:
      raise ConfigError("optimizer.mhlora.mode", "parallel heads under parallel.mode='pmap' would split each "
                        "device's share of the batch, not the global batch; set parallel.shard_heads=True "
                        "(each device trains its own heads), use parallel.mode='mesh', or mode 'mhlora'")
    if run.parallel.shard_heads and not parallel:
      raise ConfigError("parallel.shard_heads", "needs optimizer.mhlora.mode='parallel' (sequential heads see "
                        f"every example, so they cannot live apart), got {self.mode!r}")

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule,
            axis_name: str | None = None) -> optax.GradientTransformation:
    return lte_merge(build_adamw(opt, schedule), merge_every=self.merge_every, scale=float(self.alpha) / self.rank,
                     axis_name=axis_name)

  def linears(self) -> Linears:
    return Linears({name: "mhlora" for name in comma_list(self.layers)},
                   {"mhlora": {"num_heads": self.num_heads, "rank": self.rank, "alpha": float(self.alpha),
                               "mode": self.mode}})

  def heads(self) -> Heads:
    return Heads(self.num_heads, "optimizer.mhlora.num_heads", self.build, lte_head_mask)
