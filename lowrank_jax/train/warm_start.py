"""A method's full-rank warm start: AdamW on dense linears first, then the method from those weights.

A method asks for one through its `warm_start()` hook (ReLoRA does). The loop runs the
first `WarmStart.steps` steps as the `FullRank` stand-in of the method (same schedule,
no adapters), then switches: same weights, the method's layers added, a fresh
optimizer. Or, with `WarmStart.source`, the run starts from a full-rank run's
parameters. The checkpoint records the phase, so a resumed run knows where it is.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import optax

from lowrank_jax.train.checkpoint import Checkpointer
from lowrank_jax.train.settings import OptimizerSettings, RunConfig
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.methods import Method, WarmStart, build_adamw
from lowrank_jax.train.model import transfer_params
from lowrank_jax.train.setup import Setup, assemble_state, build_setup, init_state

WARM_START, MAIN = "warm_start", "main"  # the phases, as checkpoints record them


@dataclasses.dataclass(frozen=True)
class FullRank(Method):
  """Full-rank AdamW (dense linears) on the schedule of the method `of`, which it warms up for."""
  NAME = "adamw"
  of: Any = None

  def build(self, opt: OptimizerSettings, schedule: optax.Schedule) -> optax.GradientTransformation:
    return build_adamw(opt, schedule)

  def schedule(self, run: RunConfig) -> optax.Schedule:
    return self.of.schedule(run.replace(method=self.of))


def plan(run: RunConfig) -> WarmStart:
  return run.method.warm_start() or WarmStart()


def run_for(run: RunConfig, phase: str) -> RunConfig:
  """The run as trained in `phase`: itself, or its full-rank stand-in."""
  return run.replace(method=FullRank(of=run.method)) if phase == WARM_START else run


def first_phase(run: RunConfig) -> str:
  return WARM_START if plan(run).steps > 0 else MAIN


def leave(warm: Setup, state, vocab: int):
  """Switch from the full-rank phase to the method: same weights, its layers added, a new optimizer."""
  setup = build_setup(warm.run.replace(method=warm.run.method.of), vocab)
  fresh = init_state(setup, vocab)
  params = transfer_params(fresh.params, state.params)
  return setup, assemble_state(setup, params, fresh.rest, step=state.step, rng=state.rng)


def start_from_full_rank(setup: Setup, state, vocab: int):
  """Begin from the parameters of the full-rank run the method's `WarmStart.source` names (its latest checkpoint)."""
  warm = plan(setup.run)
  source = warm.source
  if not os.path.isdir(source):  # (a Checkpointer would create it: a typo must not make a directory)
    raise ConfigError(warm.source_key, f"no such directory: {source!r}; give the workdir of a full-rank run")
  directory = os.path.join(source, "checkpoints") if os.path.isdir(os.path.join(source, "checkpoints")) else source
  source_ckpt = Checkpointer(directory, keep=1000)
  if source_ckpt.latest_step() is None:
    raise ConfigError(warm.source_key, f"no checkpoint in {directory}")
  dense = build_setup(run_for(setup.run, WARM_START), vocab)
  try:
    loaded = source_ckpt.restore_params(dense.abstract_state.params)
  except (ValueError, KeyError) as e:
    raise ConfigError(warm.source_key,
                      f"the checkpoint in {directory} does not hold this model's full-rank parameters: {e}") from None
  params = transfer_params(state.params, loaded)
  return assemble_state(setup, params, state.rest, step=0, rng=state.rng)
