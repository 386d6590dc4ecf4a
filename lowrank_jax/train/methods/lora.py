"""LoRA and ReLoRA: adapter linears in the model, frozen kernels in the optimizer.

The LoRA variants are settings of the one layer (`lowrank_jax.nn.LoRALinear`), as PEFT's are
options of its one `LoraLayer`: DoRA (`variant`), rsLoRA (`rank_scaling`), PiSSA (`init`, applied
by `LoRA.prepare` once the base weights are in place) and LoRA+ (`b_lr_ratio`, in the optimizer).

ReLoRA also owns its jagged cosine schedule (restarts at merges) and its optional
full-rank warm start (`WarmStart`), which the loop runs without knowing whose it is.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lowrank_jax.nn.lora import RANK_SCALINGS, VARIANTS, LoRALinear, lora_scale
from lowrank_jax.optim.adapters import path_names
from lowrank_jax.optim.groups import scale_lora_b
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


INITS = ("kaiming", "pissa")  # optimizer.lora.init
_ADAPTER_LEAVES = ("lora_a", "lora_b", "lora_magnitude")  # what a LoRA layer trains (DoRA: the magnitude too)


def _adapter_labels(params):
  """'adapter' for a LoRA layer's trained leaves (`lora_a`, `lora_b`, DoRA's `lora_magnitude`),
  'frozen' for every other leaf."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "adapter" if path_names(path)[-1] in _ADAPTER_LEAVES else "frozen", params)


def lora_layers(model: nnx.Module) -> list[LoRALinear]:
  """The model's LoRA layers, in module order."""
  return [m for _, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


@register
@dataclasses.dataclass(frozen=True)
class LoRA(Method):
  NAME = "lora"
  SECTION = "optimizer.lora"
  DESCRIPTION = "LoRA: frozen kernels, AdamW on the adapters and on the non-adapted leaves"
  layers: str = setting("q,k,v,o,gate,up,down", layer_names)  # as the ReLoRA code; head/embeddings stay full
  rank: int = setting(128, positive_int)  # adapter rank r: lora_a is in x r, lora_b r x out
  alpha: float = setting(32.0, positive)  # scale = alpha / rank (rank_scaling alpha_over_r) or alpha / sqrt(rank)
  # alpha_over_r: LoRA's scale alpha / rank; rslora: alpha / sqrt(rank), rsLoRA (Kalajdzievski 2023,
  # arXiv 2312.03732), so higher ranks keep learning as fast (PEFT's use_rslora)
  rank_scaling: str = setting("alpha_over_r", one_of(RANK_SCALINGS))
  # lora, or dora: DoRA (Liu et al. 2024, arXiv 2402.09353), a trained magnitude per output column times the
  # direction (W + scale A B) / ||W + scale A B|| (PEFT's use_dora); one more [out] vector per layer
  variant: str = setting("lora", one_of(VARIANTS))
  # kaiming: A Kaiming-uniform, B zero (LoRA's and PEFT's default); pissa: PiSSA (Meng et al. 2024,
  # arXiv 2404.02948), A and B the kernel's top-rank singular directions, the kernel their residual,
  # applied once the pretrained weights are loaded (PEFT's init_lora_weights='pissa')
  init: str = setting("kaiming", one_of(INITS))
  # PiSSA's SVD: 0 the exact one; N > 0 a randomized SVD with N subspace iterations, much faster on
  # large kernels (PEFT's init_lora_weights='pissa_niter_N')
  pissa_iters: int = setting(0, non_negative_int)
  # LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B's learning rate is this x A's (and x the rest's);
  # 1: off (the optimizer and its state exactly as without); the paper suggests 16
  b_lr_ratio: float = setting(1.0, positive)
  dropout: float = setting(0.0, _dropout)  # on the adapter's input; the trainer takes only 0 (the layer supports more)
  # Also train the leaves without adapters (embeddings, norms, a dense head), as ReLoRA pre-training
  # does; False: the adapters alone (PEFT fine-tuning; the rest gets no update and no optimizer state).
  train_rest: bool = setting(True, boolean)

  @property
  def scale(self) -> float:
    """The adapters' scale, as the layers compute it (`lowrank_jax.nn.lora.lora_scale`)."""
    return lora_scale(self.alpha, self.rank, self.rank_scaling)

  def adapter_optimizer(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    """AdamW, with LoRA+'s rate on the B factors when `b_lr_ratio` != 1 (ReLoRA's inner optimizer)."""
    tx = build_adamw(opt, schedule)
    if self.b_lr_ratio == 1:
      return tx
    return optax.chain(tx, scale_lora_b(float(self.b_lr_ratio)))

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    if not self.train_rest:
      return optax.multi_transform({"adapter": self.adapter_optimizer(opt, schedule),
                                    "frozen": optax.set_to_zero()}, _adapter_labels)
    return freeze_adapted_kernels(self.adapter_optimizer(opt, schedule))

  def frozen(self):
    """With the adapters alone trained: everything else (embeddings, head, norms) gets no gradient."""
    if self.train_rest:
      return None
    return lambda names: names[-1] not in _ADAPTER_LEAVES

  def linears(self) -> Linears:
    return Linears({name: "lora" for name in comma_list(self.layers)},
                   {"lora": {"rank": self.rank, "alpha": float(self.alpha), "dropout": float(self.dropout),
                             "variant": self.variant, "rank_scaling": self.rank_scaling}})

  def prepare(self, model: nnx.Module, *, seed: int) -> None:
    """The adapter inits that need the base weights: call once on a new model after its kernels are
    in place (pretrained weights loaded, a full-rank warm start copied in), before training; not
    on resume (the checkpoint holds the result).

    PiSSA: every LoRA layer's `init_pissa` (the layer keeps its function; randomized SVD keys
    from `seed`). DoRA: every magnitude set to its kernel's column norms (`init_magnitude`), the
    paper's init from the pretrained weight. Otherwise nothing. Run it on the float kernels, before
    a quantized base is made: PiSSA of the float kernel, then quantize the residual, is QPiSSA.
    """
    if self.init != "pissa" and self.variant != "dora":
      return
    key = jax.random.key(seed)
    for i, layer in enumerate(lora_layers(model)):
      if self.init == "pissa":
        layer.init_pissa(self.pissa_iters, jax.random.fold_in(key, i) if self.pissa_iters else None)
      else:
        layer.init_magnitude()


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
    if self.lora.variant == "dora" and (self.warm_start_steps or self.warm_start_from):
      raise ConfigError("optimizer.lora.variant", "'dora' with ReLoRA's full-rank warm start is not supported (the "
                        "magnitudes would keep the norms of the kernels before the warm start)", ["lora"])
    if self.lora.init == "pissa":
      raise ConfigError("optimizer.lora.init", "'pissa' is a fine-tuning init; ReLoRA's merges re-draw A and zero "
                        "B, so the principal directions would leave the adapters at the first merge (use "
                        "optimizer.name='lora' for PiSSA)", ["kaiming"])

  def check_run(self, run: RunConfig) -> None:
    if self.warm_start_steps >= run.train.steps:
      raise ConfigError("optimizer.relora.warm_start_steps", f"must be an integer in [0, train.steps="
                        f"{run.train.steps}), got {self.warm_start_steps!r}")

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    # LoRA+ goes in the inner optimizer: relora's merge update of B (to exactly zero) is final.
    # DoRA needs nothing more: the merge keeps lora_magnitude, and m / ||W'|| W' with W' = W + s A B
    # is the function before it.
    return relora(self.lora.adapter_optimizer(opt, schedule), merge_every=self.merge_every, scale=self.lora.scale,
                  prune=self.prune, prune_ratio=float(self.prune_ratio), seed=int(self.seed))

  def linears(self) -> Linears:
    return self.lora.linears()

  def prepare(self, model: nnx.Module, *, seed: int) -> None:
    """As `LoRA.prepare` (DoRA magnitudes from the loaded or warm-started kernels; PiSSA is refused)."""
    self.lora.prepare(model, seed=seed)

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
