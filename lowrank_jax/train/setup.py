"""Everything the loop and the memory report share: model split, optimizer, compiled steps.

Both paths compile exactly the same step function with the same shardings and
donation, so the memory report measures the program that trains.

Parallel modes (`parallel.mode`):
  mesh  `jax.jit` over a `data` mesh axis: batch sharded, state replicated or, with
        `parallel.fsdp`, sharded; the compiler inserts the collectives.
  pmap  the per-device step under `jax.pmap` with an explicit `lax.pmean` of gradients.
In both the train state lives as the same global arrays (pmap takes and returns it
replicated), so checkpoints and evaluation do not depend on the mode.

Heads over devices (`parallel.shard_heads`, LTE): the mesh axis is `heads` and
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

from lowrank_jax import models, optim
from lowrank_jax.train import parallel
from lowrank_jax.train.config import RunConfig, resolve
from lowrank_jax.train.input import make_tokenizer
from lowrank_jax.train.lapack_threads import limit_decomposition_threads
from lowrank_jax.train.model import (ModelSplit, abstract_model, build_model, frozen_kernel_count, linear_factory,
                                     model_image_shape, pretrained_overrides, split_model)
from lowrank_jax.train.optimizer import build_optimizer, heads_of
from lowrank_jax.train.step import TrainState, make_eval_step, make_train_step


def vocab_size_of(run: RunConfig | ml_collections.ConfigDict) -> int:
  """The tokenizer's vocabulary, without reading any data."""
  data = resolve(run).data
  if data.source == "synthetic":
    return data.synthetic.vocab_size + 2  # + pad and eos
  run = resolve(run)
  if run.model.init_from and run.task != "classification" and not run.data.tokenizer and not any(
      os.path.exists(os.path.join(os.path.expanduser(run.model.init_from), f))
      for f in ("tokenizer.json", "tokenizer.model")):
    return models.pretrained_config(run.model.init_from).vocab_size  # (the embedding's; no tokenizer needed)
  return make_tokenizer(run).vocab_size


@dataclasses.dataclass
class Setup:
  run: RunConfig
  mesh: Any
  split: ModelSplit
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  compiled_step: Callable  # jit or pmap of the train step; donates the state
  eval_step: Callable  # jitted
  abstract_state: TrainState  # ShapeDtypeStructs carrying the state's shardings
  # The projector refresh program (split-refresh subspace methods: GaLore, OSD, Fira), run by
  # the loop only when due, so the every-step program holds no decomposition; None otherwise.
  compiled_refresh: Callable | None = None

  @property
  def mode(self) -> str:
    return self.run.parallel.mode

  @property
  def heads_split(self) -> bool:
    """Whether the heads are spread over the devices of a `heads` axis."""
    return heads_of(self.run) is not None

  @property
  def _pmap_tokens(self) -> bool:
    """Whether the step takes tokens as [devices, ...] (plain pmap) rather than a global array."""
    return self.mode == "pmap" and not self.heads_split

  @property
  def tokens_shape(self) -> tuple[int, int, int]:
    """Global tokens per step: [grad_accum, micro-batch, seq_len]."""
    t = self.run.train
    # Classification: one "token" per image, so tokens/s in the logs counts images.
    return (t.grad_accum, t.micro_batch, 1 if self.run.task == "classification" else self.run.data.seq_len)

  def step_tokens(self, local: Any) -> Any:
    """This process's [accum, micro_local, T] rows (or instruction batch dict of them) in the form the
    compiled step takes."""
    if self._pmap_tokens:
      return jax.tree.map(parallel.pmap_tokens, local)
    return jax.tree.map(lambda x: parallel.global_array(x, parallel.batch_sharding(self.mesh)), local)

  def train_step(self, state: TrainState, local_tokens: np.ndarray):
    return self.compiled_step(state, self.step_tokens(local_tokens))

  def refresh_step(self, state: TrainState, local_tokens: np.ndarray) -> TrainState:
    """The state with its projectors refreshed on this batch's gradients (then run `train_step`)."""
    return self.compiled_refresh(state, self.step_tokens(local_tokens))

  def steps_to_refresh(self, state: TrainState) -> int | None:
    """Steps before the next projector refresh is due (0: due now; one host sync); None without one."""
    if self.compiled_refresh is None:
      return None
    return int(jax.device_get(_steps_to_refresh(state.opt_state)))

  def abstract_tokens(self) -> Any:
    accum, micro, seq = self.tokens_shape
    if self._pmap_tokens:
      n = jax.local_device_count()
      micro_local = micro // jax.process_count()
      rows = lambda dtype: jax.ShapeDtypeStruct((n, accum, micro_local // n, seq), dtype)  # noqa: E731
    else:
      rows = lambda dtype: jax.ShapeDtypeStruct((accum, micro, seq), dtype,  # noqa: E731
                                                sharding=parallel.batch_sharding(self.mesh))
    if self.run.task == "classification":
      size, channels = model_image_shape(self.run)
      per_example = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
          rows(dtype).shape[:-1] + shape, dtype, sharding=rows(dtype).sharding)
      return {"images": per_example((size, size, channels), jnp.float32), "labels": per_example((), jnp.int32)}
    if self.run.data.source == "instructions":
      return {"tokens": rows(jnp.int32), "segment_ids": rows(jnp.int32), "positions": rows(jnp.int32),
              "loss_mask": rows(jnp.float32)}
    return rows(jnp.int32)


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


_steps_to_refresh = jax.jit(optim.steps_to_refresh)


def _step_options(run: RunConfig) -> dict[str, Any]:
  """The run's settings `make_train_step` takes, the same for every compiled variant."""
  return {"accum_dtype": run.train.accum_dtype, "nonfinite_guard": run.train.nonfinite_guard,
          "loss_chunk": run.train.loss_chunk_positions}


def _compile_refresh(run: RunConfig, split: ModelSplit, tx, schedule, mesh,
                     abstract_state: TrainState) -> Callable | None:
  """The refresh program, compiled as the step is (jit over the mesh or pmap), if the optimizer has one."""
  if not optim.uses_split_refresh(abstract_state.opt_state):
    return None
  state_sh, batch_sh = _shardings(abstract_state), parallel.batch_sharding(mesh)
  if run.parallel.mode == "pmap":
    return jax.pmap(make_train_step(split, tx, schedule, axis_name=parallel.DATA_AXIS, refresh=True, **_step_options(run)),
                    axis_name=parallel.DATA_AXIS, in_axes=(None, 0), out_axes=None, donate_argnums=0)
  return jax.jit(make_train_step(split, tx, schedule, refresh=True, **_step_options(run)), in_shardings=(state_sh, batch_sh),
                 out_shardings=state_sh, donate_argnums=0)


def _compile_step(run: RunConfig, split: ModelSplit, tx, schedule, mesh, abstract_state: TrainState,
                  head_mask: Any) -> Callable:
  """The train step under jit over the mesh, under pmap, or per device over the `heads` axis."""
  state_sh, batch_sh, repl = _shardings(abstract_state), parallel.batch_sharding(mesh), parallel.replicated(mesh)
  if head_mask is not None:
    step = make_train_step(split, tx, schedule, axis_name=parallel.HEADS_AXIS, split_params=head_mask,
                           **_step_options(run))
    return jax.jit(_heads_split_step(step, run.parallel.mode, mesh, abstract_state),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl), donate_argnums=0)
  if run.parallel.mode == "pmap":
    return jax.pmap(make_train_step(split, tx, schedule, axis_name=parallel.DATA_AXIS, **_step_options(run)),
                    axis_name=parallel.DATA_AXIS, in_axes=(None, 0), out_axes=(None, None), donate_argnums=0)
  return jax.jit(make_train_step(split, tx, schedule, **_step_options(run)), in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, repl), donate_argnums=0)


def build_setup(run: RunConfig | ml_collections.ConfigDict, vocab_size: int, devices: Any = None) -> Setup:
  """Model split, optimizer and compiled steps of `run` (a ConfigDict is resolved first), over every
  device or `devices` (the memory report's target)."""
  run = resolve(run)
  if jax.default_backend() == "cpu":
    limit_decomposition_threads()  # SVD/QR refreshes on one LAPACK thread: fast under load (#19)
  heads = heads_of(run)
  mesh = parallel.make_mesh(parallel.HEADS_AXIS if heads else parallel.DATA_AXIS, devices)
  tx, schedule = build_optimizer(run)
  split, params, rest = split_model(abstract_model(run, vocab_size))
  head_mask = heads.mask(params) if heads else None
  abstract_state = _abstract_state(params, rest, tx, mesh, fsdp=run.parallel.fsdp, head_mask=head_mask)
  compiled_step = _compile_step(run, split, tx, schedule, mesh, abstract_state, head_mask)
  state_sh, repl = _shardings(abstract_state), parallel.replicated(mesh)
  eval_step = jax.jit(make_eval_step(split, run.train.loss_chunk_positions),
                      in_shardings=(state_sh.params, state_sh.rest, parallel.eval_sharding(mesh)),
                      out_shardings=repl)  # (loss, count), or (loss, count, correct) for images
  compiled_refresh = None if head_mask is not None else _compile_refresh(run, split, tx, schedule, mesh,
                                                                          abstract_state)
  return Setup(run, mesh, split, tx, schedule, compiled_step, eval_step, abstract_state, compiled_refresh)


def init_state(setup: Setup, vocab_size: int) -> TrainState:
  """Real parameters and optimizer state, placed as the abstract state says.

  With `model.init_from` the weights are the checkpoint's, each tensor read straight into
  its sharding (adapters and other leaves it lacks keep their initialisation).
  """
  seed = setup.run.seed
  if setup.run.model.init_from:
    model = _pretrained_model(setup, vocab_size)
  else:
    model = build_model(setup.run, vocab_size, seed=seed)
  _, params, rest = split_model(model)
  del model
  return assemble_state(setup, params, rest, step=0,
                        rng=jax.random.key_data(jax.random.key(seed + 1)).astype(jnp.uint32))


def _pretrained_model(setup: Setup, vocab_size: int):
  m, abstract = setup.run.model, setup.abstract_state
  shardings = {}
  for tree in (abstract.params, abstract.rest):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shardings["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf.sharding
  replicated = parallel.replicated(setup.mesh)
  return models.from_pretrained(m.init_from, linear_factory=linear_factory(setup.run), seed=setup.run.seed,
                                sharding=lambda path, _: shardings.get(path, replicated),
                                **pretrained_overrides(setup.run, vocab_size))


def export_model(setup: Setup, state: TrainState) -> str:
  """Writes the trained model to `model.export_to` as a Hugging Face directory (adapters merged)."""
  m = setup.run.model
  model = setup.split.merge(state.params, state.rest)
  return models.save_pretrained(model, m.export_to, source=m.init_from or None)


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


def param_count(setup: Setup) -> int:
  return models.count_params(setup.abstract_state.params)


def trainable_count(setup: Setup) -> int:
  """Parameters the optimizer trains directly: all but the kernels under LoRA adapters."""
  return param_count(setup) - frozen_kernel_count(setup.abstract_state.params)


def model_summary(setup: Setup) -> str:
  m = setup.run.model
  dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(setup.abstract_state.params)})
  total, trained = param_count(setup), trainable_count(setup)
  trained_note = f", {trained / 1e6:.2f}M trained" if trained != total else ""
  return (f"{m.name}: {total / 1e6:.2f}M parameters{trained_note} ({', '.join(dtypes)}), "
          f"compute {m.dtype}{'' if m.remat == 'none' else f', remat {m.remat}'}")
