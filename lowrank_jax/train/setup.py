"""Everything the loop and the memory report share: model split, optimizer, compiled steps.

Both paths compile exactly the same step function with the same shardings and
donation, so the memory report measures the program that trains.

Parallel modes (`config.parallel.mode`):
  mesh  `jax.jit` over a `data` mesh axis: batch sharded, state replicated or, with
        `config.parallel.fsdp`, sharded; the compiler inserts the collectives.
  pmap  the per-device step under `jax.pmap` with an explicit `lax.pmean` of gradients.
In both the train state lives as the same global arrays (pmap takes and returns it
replicated), so checkpoints and evaluation do not depend on the mode.

Heads over devices (`config.parallel.shard_heads`, LTE): the mesh axis is `heads` and
the step is always the explicit per-device program, under `jax.shard_map` (mesh) or
`jax.pmap` (pmap), both inside one `jax.jit`. Each device holds its block of every
head variable and of its optimizer state (global arrays split along the heads axis,
so checkpoints stay layout independent); only replicated leaves are all-reduced each
step, and the heads meet only at merges.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

from lowrank_jax import data as data_lib
from lowrank_jax.train import parallel
from lowrank_jax.train.model import ModelSplit, abstract_model, build_model, frozen_kernel_count, split_model
from lowrank_jax.train.optimizer import MAIN, build_optimizer, split_heads
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
  compiled_step: Callable  # jit or pmap of the train step; donates the state
  eval_step: Callable  # jitted
  abstract_state: TrainState  # ShapeDtypeStructs carrying the state's shardings
  phase: str = MAIN  # or WARM_START: a method's full-rank warm start (dense linears, AdamW)

  @property
  def mode(self) -> str:
    return self.config.parallel.mode

  @property
  def heads_split(self) -> bool:
    """Whether the heads are spread over the devices of a `heads` axis."""
    return split_heads(self.config, self.phase) is not None

  @property
  def _pmap_tokens(self) -> bool:
    """Whether the step takes tokens as [devices, ...] (plain pmap) rather than a global array."""
    return self.mode == "pmap" and not self.heads_split

  @property
  def tokens_shape(self) -> tuple[int, int, int]:
    """Global tokens per step: [grad_accum, micro-batch, seq_len]."""
    t = self.config.train
    return (t.grad_accum, t.batch_size // t.grad_accum, self.config.data.seq_len)

  def step_tokens(self, local: np.ndarray) -> Any:
    """This process's [accum, micro_local, T] rows in the form the compiled step takes."""
    if self._pmap_tokens:
      return parallel.pmap_tokens(local)
    return parallel.global_array(local, parallel.batch_sharding(self.mesh))

  def train_step(self, state: TrainState, local_tokens: np.ndarray):
    return self.compiled_step(state, self.step_tokens(local_tokens))

  def abstract_tokens(self) -> jax.ShapeDtypeStruct:
    accum, micro, seq = self.tokens_shape
    if self._pmap_tokens:
      n = jax.local_device_count()
      micro_local = micro // jax.process_count()
      return jax.ShapeDtypeStruct((n, accum, micro_local // n, seq), jnp.int32)
    return jax.ShapeDtypeStruct((accum, micro, seq), jnp.int32, sharding=parallel.batch_sharding(self.mesh))


def _abstract_state(params, rest, tx, mesh, fsdp: bool, head_mask: Any = None) -> TrainState:
  def make():
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        rest=rest,
        opt_state=tx.init(params),
        rng=jnp.zeros((2,), jnp.uint32),
    )

  abstract = jax.eval_shape(make)
  split = None if head_mask is None else parallel.split_leaf_mask(abstract, params, head_mask)
  shardings = parallel.state_shardings(mesh, abstract, fsdp=fsdp, split=split)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def _shardings(abstract: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, abstract)


def _heads_split_step(step: Callable, mode: str, mesh: Any, abstract_state: TrainState) -> Callable:
  """The per-device `step` over the `heads` axis, as a function of the global state and batch.

  mesh: `jax.shard_map` hands each device its blocks directly. pmap: the heads axis
  (ndim - 3) of every split leaf is folded into (devices, heads per device) and mapped
  by `jax.pmap`; the batch [accum, micro, T] is mapped along micro the same way.
  """
  axis = parallel.HEADS_AXIS
  specs = jax.tree.map(lambda x: x.sharding.spec, abstract_state)
  if mode == "mesh":
    return jax.shard_map(step, mesh=mesh, in_specs=(specs, P(None, axis, None)), out_specs=(specs, P()),
                         check_vma=False)
  n = mesh.devices.size
  is_split = jax.tree.map(lambda x: axis in x.sharding.spec, abstract_state)
  axes = jax.tree.map(lambda x, split: len(x.shape) - 3 if split else None, abstract_state, is_split)
  mapped = jax.pmap(step, axis_name=axis, in_axes=(axes, 1), out_axes=(axes, None))

  def fold(x, split):
    if not split:
      return x
    k = x.ndim - 3
    return x.reshape(x.shape[:k] + (n, x.shape[k] // n) + x.shape[k + 1:])

  def unfold(x, split):
    if not split:
      return x
    k = x.ndim - 4
    return x.reshape(x.shape[:k] + (x.shape[k] * x.shape[k + 1],) + x.shape[k + 2:])

  def body(state, tokens):
    accum, micro, seq = tokens.shape
    state, metrics = mapped(jax.tree.map(fold, state, is_split), tokens.reshape(accum, n, micro // n, seq))
    return jax.tree.map(unfold, state, is_split), metrics

  return body


def build_setup(config: ml_collections.ConfigDict, vocab_size: int, phase: str = MAIN) -> Setup:
  heads = split_heads(config, phase)
  mesh = parallel.make_mesh(parallel.HEADS_AXIS if heads else parallel.DATA_AXIS)
  repl = parallel.replicated(mesh)
  tx, schedule = build_optimizer(config, phase)
  split, params, rest = split_model(abstract_model(config, vocab_size, phase))
  head_mask = heads.head_mask(params) if heads else None
  abstract_state = _abstract_state(params, rest, tx, mesh, fsdp=config.parallel.fsdp, head_mask=head_mask)
  state_sh = _shardings(abstract_state)
  batch_sh = parallel.batch_sharding(mesh)
  if heads:
    step = make_train_step(split, tx, schedule, axis_name=parallel.HEADS_AXIS, split_params=head_mask)
    compiled_step = jax.jit(_heads_split_step(step, config.parallel.mode, mesh, abstract_state),
                            in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0)
  elif config.parallel.mode == "pmap":
    compiled_step = jax.pmap(
        make_train_step(split, tx, schedule, axis_name=parallel.DATA_AXIS),
        axis_name=parallel.DATA_AXIS, in_axes=(None, 0), out_axes=(None, None), donate_argnums=0)
  else:
    compiled_step = jax.jit(
        make_train_step(split, tx, schedule),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, repl),
        donate_argnums=0,
    )
  eval_step = jax.jit(
      make_eval_step(split),
      in_shardings=(state_sh.params, state_sh.rest, parallel.eval_sharding(mesh)),
      out_shardings=(repl, repl),
  )
  return Setup(config, mesh, split, tx, schedule, compiled_step, eval_step, abstract_state, phase)


def init_state(setup: Setup, vocab_size: int) -> TrainState:
  """Real parameters and optimizer state, placed as the abstract state says."""
  config = setup.config
  model = build_model(config, vocab_size, seed=config.seed, phase=setup.phase)
  _, params, rest = split_model(model)
  del model
  return assemble_state(setup, params, rest, step=0,
                        rng=jax.random.key_data(jax.random.key(config.seed + 1)).astype(jnp.uint32))


def assemble_state(setup: Setup, params: Any, rest: Any, *, step: Any, rng: Any) -> TrainState:
  """A train state from parameters, with a fresh optimizer state, placed as the setup says."""
  shardings = _shardings(setup.abstract_state)
  params = jax.device_put(params, shardings.params)
  state = TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      rest=rest,
      opt_state=jax.jit(setup.tx.init, out_shardings=shardings.opt_state)(params),
      rng=rng,
  )
  return jax.device_put(state, shardings)


def count(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def param_count(setup: Setup) -> int:
  return count(setup.abstract_state.params)


def trainable_count(setup: Setup) -> int:
  """Parameters the optimizer trains directly: all but the kernels under LoRA adapters."""
  return param_count(setup) - frozen_kernel_count(setup.abstract_state.params)


def model_summary(setup: Setup) -> str:
  m = setup.config.model
  dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(setup.abstract_state.params)})
  total, trained = param_count(setup), trainable_count(setup)
  trained_note = f", {trained / 1e6:.2f}M trained" if trained != total else ""
  return (f"{m.family}-{m.size}: {total / 1e6:.2f}M parameters{trained_note} ({', '.join(dtypes)}), "
          f"compute {m.dtype}{', remat' if m.remat else ''}")
