"""What a training method is: its settings (a frozen dataclass), its optimizer, and the hooks it owns.

A method subclasses `Method`, declares its fields with `config.setting(default, *checks)`
(read from `config.optimizer.<SECTION>`), implements `build`, overrides only the hooks
it needs, and registers itself with `@register`. The trainer asks the method object,
never its name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

import jax
import optax

from lowrank_jax.train.settings import OptimizerSettings, RunConfig, Settings
from lowrank_jax.train.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Linears:
  """The linear kinds a method needs in the model (LoRA, multi-head LoRA) and their builder options."""
  kinds: Mapping[str, str] = dataclasses.field(default_factory=dict)  # layer name -> linear kind
  options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)  # kind -> options


@dataclasses.dataclass(frozen=True)
class Heads:
  """A method whose heads can live on separate devices (`parallel.shard_heads`).

  The trainer then runs a per-device program (`shard_map` or `pmap`) over a `heads`
  axis: the leaves `mask` marks, and their optimizer state, are split along their heads
  axis (ndim - 3); every other leaf is replicated and all-reduced.
  """
  count: int  # heads per layer: a multiple of the device count
  count_key: str  # the config key of `count`, for errors
  # (optimizer settings, schedule, axis name) -> the method's per-device transform.
  build: Callable[[OptimizerSettings, optax.Schedule, str], optax.GradientTransformation]
  mask: Callable[[Any], Any]  # params -> bools: the leaves split over the axis


@dataclasses.dataclass(frozen=True)
class WarmStart:
  """Full-rank training before the method takes over (ReLoRA's warm start)."""
  steps: int = 0  # steps of full-rank AdamW (dense linears) first, on the method's schedule
  source: str = ""  # or: start from the parameters of a full-rank run's latest checkpoint (its workdir)
  source_key: str = ""  # the config key of `source`, for errors


@dataclasses.dataclass(frozen=True)
class Method(Settings):
  """Base of every method's settings. Override `build`; the hooks default to "nothing special"."""
  NAME: ClassVar[str] = ""
  DESCRIPTION: ClassVar[str] = ""

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The method's update rule. Gradient clipping is chained in front by the trainer."""
    raise NotImplementedError

  def check_run(self, run: RunConfig) -> None:
    """Checks that need other sections (train sizes, parallel mode); raise ConfigError."""

  def linears(self) -> Linears:
    return Linears()

  def schedule(self, run: RunConfig) -> optax.Schedule:
    return make_schedule(run.optimizer, run.train.steps)

  def warm_start(self) -> WarmStart | None:
    return None

  def frozen(self) -> Callable[[tuple[str, ...]], bool] | None:
    """The leaves the method never trains, as a function of their key names: the step computes no
    gradient for them and the optimizer keeps no state for them. None: every leaf trains."""
    return None

  def prepare(self, model: Any, *, seed: int) -> None:
    """What the method sets up on a new model once its weights are in place (before training, not on
    resume): LoRA's PiSSA and DoRA inits. Nothing by default."""

  def heads(self) -> Heads | None:
    return None

  def sections(self) -> dict[str, dict[str, Any]]:
    """{section name under `optimizer`: its values}, as the config spells them."""
    out, own = {}, {}
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, Method):
        out.update(value.sections())
      else:
        own[f.name] = value
    if self.SECTION:
      out[self.SECTION.rsplit(".", 1)[-1]] = own
    return out


_METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
  """Class decorator: make `cls` selectable as `config.optimizer.name = cls.NAME`."""
  if cls.NAME in _METHODS:
    raise ValueError(f"method {cls.NAME!r} is already registered")
  _METHODS[cls.NAME] = cls
  return cls


def method_names() -> list[str]:
  return sorted(_METHODS)


def registered() -> list[type[Method]]:
  """Every registered method's settings class, by name."""
  return [_METHODS[name] for name in method_names()]


def get_method(name: str) -> type[Method]:
  if name not in _METHODS:
    raise ConfigError("optimizer.name", f"unknown method {name!r}", method_names())
  return _METHODS[name]


# --- shared pieces of the methods' optimizers --------------------------------------------------

def make_schedule(opt: OptimizerSettings, total_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay to `min_lr_ratio * lr` (the GaLore recipe), or constant."""
  if opt.schedule == "constant":
    return optax.constant_schedule(opt.lr)
  warmup_steps = int(round(opt.warmup * total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt.lr,
      warmup_steps=warmup_steps,
      # optax counts decay_steps from step 0, warmup included.
      decay_steps=max(total_steps, warmup_steps + 1),
      end_value=opt.lr * opt.min_lr_ratio,
  )


def decay_mask(params: Any) -> Any:
  """Weight decay on matrices only: norms' scales (1-D) are not decayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_adamw(opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
  """AdamW with the shared settings: the base of the adapter methods."""
  return optax.adamw(learning_rate=schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                     mask=decay_mask)


def adam_moments(opt: OptimizerSettings) -> optax.GradientTransformation:
  """Adam's moment scaling alone: the base optimizer the projected methods run in their subspace."""
  return optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)
