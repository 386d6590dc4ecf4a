"""LoRA and ReLoRA: adapter linears in the model, frozen kernels in the optimizer.

ReLoRA also owns its jagged cosine schedule (restarts at merges) and its optional
full-rank warm start (`WarmStart`), which the loop runs without knowing whose it is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.adapters import path_names
from lowrank_jax.optim.relora import PRUNE_METHODS, freeze_adapted_kernels, relora
from lowrank_jax.optim.schedules import jagged_cosine_schedule
from lowrank_jax.train.settings import (OptimizerSettings, RunConfig, boolean, comma_list, in_range, layer_names,
                                      non_negative_int, one_of, positive, positive_int, section, setting)
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.methods.base import Linears, Method, WarmStart, build_adamw, register


def _dropout(key: str, value) -> float:
  value = in_range(0.0, 1.0)(key, value)
  if value > 0:
    raise ConfigError(key, "> 0 is not supported by the trainer yet (the layer supports it: "
                      "lowrank_jax.nn.LoRALinear(dropout=...)); use 0")
  return value


def _adapter_labels(params):
  """'adapter' for LoRA factors (`lora_a`, `lora_b`), 'frozen' for every other leaf."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "adapter" if path_names(path)[-1] in ("lora_a", "lora_b") else "frozen", params)


@register
@dataclasses.dataclass(frozen=True)
class LoRA(Method):
  NAME = "lora"
  SECTION = "optimizer.lora"
  DESCRIPTION = "LoRA: frozen kernels, AdamW on the adapters and on the non-adapted leaves"
  layers: str = setting("q,k,v,o,gate,up,down", layer_names)  # as the ReLoRA code; head/embeddings stay full
  rank: int = setting(128, positive_int)  # adapter rank r: lora_a is in x r, lora_b r x out
  alpha: float = setting(32.0, positive)  # scale = alpha / rank
  dropout: float = setting(0.0, _dropout)  # on the adapter's input; the trainer takes only 0 (the layer supports more)
  # Also train the leaves without adapters (embeddings, norms, a dense head), as ReLoRA pre-training
  # does; False: the adapters alone (PEFT fine-tuning; the rest gets no update and no optimizer state).
  train_rest: bool = setting(True, boolean)

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    if not self.train_rest:
      return optax.multi_transform({"adapter": build_adamw(opt, schedule), "frozen": optax.set_to_zero()},
                                   _adapter_labels)
    return freeze_adapted_kernels(build_adamw(opt, schedule))

  def linears(self) -> Linears:
    return Linears({name: "lora" for name in comma_list(self.layers)},
                   {"lora": {"rank": self.rank, "alpha": float(self.alpha), "dropout": float(self.dropout)}})


@register
@dataclasses.dataclass(frozen=True)
class ReLoRA(Method):
  NAME = "relora"
  SECTION = "optimizer.relora"
  DESCRIPTION = ("ReLoRA: LoRA merged into the kernels every merge_every steps, adapters re-drawn, adapter "
                 "moments pruned, jagged cosine schedule, optional full-rank warm start")
  lora: LoRA = section(LoRA)  # the adapters: config.optimizer.lora
  merge_every: int = setting(5000, positive_int)  # steps between merges into the kernels (A re-drawn, B zeroed)
  restart_warmup_steps: int = setting(100, positive_int)  # LR ramp after each merge (jagged cosine)
  prune: str = setting("magnitude", one_of(PRUNE_METHODS))  # magnitude, random (the code's default) or reset
  prune_ratio: float = setting(0.9, in_range(0.0, 1.0, hi_inclusive=True))  # adapter moments zeroed (ReLoRA README: 0.9)
  warm_start_steps: int = setting(0, non_negative_int)  # full-rank AdamW steps first (multiple of merge_every)
  warm_start_from: str = setting("")  # or: a full-rank run's workdir to start from
  seed: int = setting(0, non_negative_int)  # re-drawing A at merges, random pruning

  def check(self) -> None:
    if self.restart_warmup_steps >= self.merge_every:
      raise ConfigError("optimizer.relora.restart_warmup_steps", f"must be < optimizer.relora.merge_every="
                        f"{self.merge_every}, got {self.restart_warmup_steps}")
    if self.warm_start_steps % self.merge_every:
      raise ConfigError("optimizer.relora.warm_start_steps", f"must be a multiple of optimizer.relora.merge_every="
                        f"{self.merge_every} (so restarts line up with merges), got {self.warm_start_steps}")
    if self.warm_start_steps and self.warm_start_from:
      raise ConfigError("optimizer.relora.warm_start_from", "give either warm_start_steps or warm_start_from")

  def check_run(self, run: RunConfig) -> None:
    if self.warm_start_steps >= run.train.steps:
      raise ConfigError("optimizer.relora.warm_start_steps", f"must be an integer in [0, train.steps="
                        f"{run.train.steps}), got {self.warm_start_steps!r}")

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    return relora(build_adamw(opt, schedule), merge_every=self.merge_every, scale=float(self.lora.alpha) / self.lora.rank,
                  prune=self.prune, prune_ratio=float(self.prune_ratio), seed=int(self.seed))

  def linears(self) -> Linears:
    return self.lora.linears()

  def schedule(self, run: RunConfig) -> optax.Schedule:
    """Warmup + global cosine; restarts (drop to 0, linear ramp) at every merge, from the switch on."""
    opt, total = run.optimizer, run.train.steps
    warmup = int(round(opt.warmup * total))

    def jagged(restart_every, restart_warmup_steps):
      return jagged_cosine_schedule(peak_value=opt.lr, total_steps=total, warmup_steps=warmup,
                                    restart_every=restart_every, restart_warmup_steps=restart_warmup_steps,
                                    min_ratio=opt.min_lr_ratio)

    restarting = jagged(self.merge_every, self.restart_warmup_steps)
    w = self.warm_start_steps
    if w == 0:
      return restarting
    # No merges during the full-rank warm start, hence no restarts. w is a multiple of
    # merge_every, so the switch itself is a restart and so is every merge after it.
    smooth = jagged(total + 1, 1)
    return lambda step: jnp.where(step < w, smooth(step), restarting(step))

  def warm_start(self) -> WarmStart | None:
    if not (self.warm_start_steps or self.warm_start_from):
      return None
    return WarmStart(self.warm_start_steps, self.warm_start_from, "optimizer.relora.warm_start_from")
