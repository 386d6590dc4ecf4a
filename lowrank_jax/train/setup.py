"""Everything the loop and the memory report share: model split, optimizer, jitted steps.

Both paths compile exactly the same step function with the same shardings and
donation, so the memory report measures the program that trains.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lowrank_jax import data as data_lib
from lowrank_jax.train import parallel
from lowrank_jax.train.model import ModelSplit, abstract_model, build_model, split_model
from lowrank_jax.train.optimizer import build_optimizer
from lowrank_jax.train.step import TrainState, make_eval_step, make_train_step


def vocab_size_of(config: ml_collections.ConfigDict) -> int:
  """The tokenizer's vocabulary, without reading any data."""
  if config.data.source == "synthetic":
    return config.data.synthetic.vocab_size + 2  # + pad and eos
  return data_lib.make_tokenizer(os.path.expanduser(config.data.tokenizer)).vocab_size


@dataclasses.dataclass
class Setup:
  config: ml_collections.ConfigDict
  mesh: Any
  split: ModelSplit
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  train_step: Callable  # jitted, donates the state
  eval_step: Callable  # jitted
  abstract_state: TrainState  # ShapeDtypeStructs with shardings

  @property
  def tokens_shape(self) -> tuple[int, int, int]:
    t = self.config.train
    return (t.grad_accum, t.batch_size // t.grad_accum, self.config.data.seq_len)


def _abstract_state(split_params, split_rest, tx, sharding) -> TrainState:
  def make():
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=split_params,
        rest=split_rest,
        opt_state=tx.init(split_params),
        rng=jnp.zeros((2,), jnp.uint32),
    )

  return parallel.abstract_like(jax.eval_shape(make), sharding)


def build_setup(config: ml_collections.ConfigDict, vocab_size: int) -> Setup:
  mesh = parallel.make_mesh()
  repl = parallel.replicated(mesh)
  tx, schedule = build_optimizer(config)
  split, params, rest = split_model(abstract_model(config, vocab_size))
  abstract_state = _abstract_state(params, rest, tx, repl)
  train_step = jax.jit(
      make_train_step(split, tx, schedule),
      in_shardings=(repl, parallel.batch_sharding(mesh)),
      out_shardings=(repl, repl),
      donate_argnums=0,
  )
  eval_step = jax.jit(
      make_eval_step(split),
      in_shardings=(repl, repl, parallel.eval_sharding(mesh)),
      out_shardings=(repl, repl),
  )
  return Setup(config, mesh, split, tx, schedule, train_step, eval_step, abstract_state)


def init_state(setup: Setup, vocab_size: int) -> TrainState:
  """Real parameters and optimizer state, placed as the abstract state says."""
  config = setup.config
  model = build_model(config, vocab_size, seed=config.seed)
  _, params, rest = split_model(model)
  del model
  repl = parallel.replicated(setup.mesh)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      rest=rest,
      opt_state=jax.jit(setup.tx.init)(params),
      rng=jax.random.key_data(jax.random.key(config.seed + 1)).astype(jnp.uint32),
  )
  return jax.device_put(state, repl)


def count(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def param_count(setup: Setup) -> int:
  return count(setup.abstract_state.params)


def model_summary(setup: Setup) -> str:
  m = setup.config.model
  shapes = jax.tree.leaves(setup.abstract_state.params)
  dtypes = sorted({str(x.dtype) for x in shapes})
  return (f"llama-{m.size}: {param_count(setup) / 1e6:.2f}M parameters ({', '.join(dtypes)}), "
          f"compute {m.dtype}{', remat' if m.remat else ''}")

