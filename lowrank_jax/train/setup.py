"""Everything the loop and the memory report share: model split, optimizer, compiled programs.

Both paths compile exactly the same programs with the same shardings and donation,
so the memory report measures the program that trains.

One step body and one refresh body (`step.make_train_step`) serve every parallel mode;
`parallel.compile_program` wraps them (`parallel.mode`):
  mesh  `jax.jit` over a `data` mesh axis: batch sharded, state replicated or, with
        `parallel.fsdp`, sharded; the compiler inserts the collectives.
  pmap  the per-device body under `jax.pmap`, with explicit means over the devices.
In both the train state lives as the same global arrays (pmap takes and returns it
replicated), so checkpoints and evaluation do not depend on the mode.

Heads over devices (`parallel.shard_heads`, LTE): the mesh axis is `heads` and the
body is always the per-device one (under `jax.shard_map` in mesh mode). Each device
holds its block of every head variable and of its optimizer state (global arrays
split along the heads axis, so checkpoints stay layout independent); only replicated
leaves are all-reduced each step, and the heads meet only at merges.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax import models, optim
from lowrank_jax.nn import int8_weight
from lowrank_jax.train import hub, parallel
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.settings import RunConfig
from lowrank_jax.train.lapack_threads import limit_decomposition_threads
from lowrank_jax.train.model import (ModelSplit, abstract_model, build_model, frozen_kernel_count, linear_factory,
                                     pissa_init, pretrained_overrides, split_model, store_base, store_weights)
from lowrank_jax.train.optimizer import build_optimizer, heads_of
from lowrank_jax.train.step import TrainState, make_eval_step, make_train_step


def vocab_size_of(run: RunConfig) -> int:
  """The task's vocabulary (or class count), reading no training data where it can."""
  return run.task.vocab_size(run)


@dataclasses.dataclass
class Setup:
  run: RunConfig
  mesh: Any
  split: ModelSplit
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  compiled_step: Callable  # the train step as the parallel mode compiles it; donates the state
  eval_step: Callable  # jitted
  abstract_state: TrainState  # ShapeDtypeStructs carrying the state's shardings
  # The projector refresh program (split-refresh subspace methods: GaLore, OSD, Fira), run by
  # the loop only when due, so the every-step program holds no decomposition; None otherwise.
  compiled_refresh: Callable | None = None

  @property
  def mode(self) -> str:
    return self.run.parallel.mode

  @property
  def tokens_shape(self) -> tuple[int, int, int]:
    """Global tokens per step: [grad_accum, micro-batch, seq_len]."""
    t = self.run.train
    # Classification: one "token" per image, so tokens/s in the logs counts images.
    return (t.grad_accum, t.micro_batch, self.run.task.positions(self.run))

  def step_tokens(self, local: Any) -> Any:
    """This process's [accum, micro_local, T] rows (or instruction batch dict of them) in the form the
    compiled programs take (`parallel.program_batch`)."""
    return parallel.program_batch(self.mode, self.mesh, local)

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
    """The batch the compiled programs take, as ShapeDtypeStructs: the task's example with
    [grad_accum, micro-batch] in front (`parallel.abstract_batch`)."""
    accum, micro, _ = self.tokens_shape
    return parallel.abstract_batch(self.mode, self.mesh, self.run.task.example(self.run), accum, micro)


def _abstract_state(params, rest, tx, mesh, fsdp: bool, head_mask: Any = None, frozen: Any = None) -> TrainState:
  def make(params, rest):
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        rest=rest,
        opt_state=tx.init(int8_weight.trainable_view(params, frozen)),
        rng=jnp.zeros((2,), jnp.uint32),
    )

  abstract = jax.eval_shape(make, params, rest)
  split = None if head_mask is None else parallel.split_leaf_mask(abstract, params, head_mask)
  shardings = parallel.state_shardings(mesh, abstract, fsdp=fsdp, split=split)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def _shardings(abstract: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, abstract)


_steps_to_refresh = jax.jit(optim.steps_to_refresh)


def _step_options(run: RunConfig) -> dict[str, Any]:
  """The run's settings `make_train_step` takes, the same for every compiled variant."""
  return {"loss": run.task.loss, "accum_dtype": run.train.accum_dtype, "nonfinite_guard": run.train.nonfinite_guard,
          "loss_chunk": run.train.loss_chunk_positions, "frozen": run.method.frozen()}


def _compile(run: RunConfig, split: ModelSplit, tx, schedule, mesh, abstract_state: TrainState, head_mask: Any,
             *, refresh: bool = False) -> Callable:
  """The train step (or with `refresh` the projector refresh) body, compiled for the run's parallel mode."""
  body = make_train_step(split, tx, schedule, axis_name=parallel.body_axis(run.parallel.mode, mesh),
                         split_params=head_mask, refresh=refresh, **_step_options(run))
  return parallel.compile_program(body, run.parallel.mode, mesh, abstract_state, metrics=not refresh)


def build_setup(run: RunConfig, vocab_size: int, devices: Any = None) -> Setup:
  """Model split, optimizer and compiled steps of `run`, over every device or `devices` (the memory
  report's target)."""
  if jax.default_backend() == "cpu":
    limit_decomposition_threads()  # SVD/QR refreshes on one LAPACK thread: fast under load (#19)
  heads = heads_of(run)
  mesh = parallel.make_mesh(parallel.HEADS_AXIS if heads else parallel.DATA_AXIS, devices)
  tx, schedule = build_optimizer(run)
  split, params, rest = split_model(abstract_model(run, vocab_size))
  params = jax.eval_shape(lambda p: store_weights(run, p), params)
  head_mask = heads.mask(params) if heads else None
  abstract_state = _abstract_state(params, rest, tx, mesh, fsdp=run.parallel.fsdp, head_mask=head_mask,
                                   frozen=run.method.frozen())
  compiled_step = _compile(run, split, tx, schedule, mesh, abstract_state, head_mask)
  state_sh, repl = _shardings(abstract_state), parallel.replicated(mesh)
  eval_step = jax.jit(make_eval_step(split, run.train.loss_chunk_positions, run.task.evaluate),
                      in_shardings=(state_sh.params, state_sh.rest, parallel.eval_sharding(mesh)),
                      out_shardings=repl)  # (loss, count), or (loss, count, correct) for images
  # The refresh program, only for optimizers with a split refresh (GaLore, OSD, Fira).
  compiled_refresh = (_compile(run, split, tx, schedule, mesh, abstract_state, head_mask, refresh=True)
                      if optim.uses_split_refresh(abstract_state.opt_state) else None)
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
  _prepare(setup.run, model)
  _, params, rest = split_model(model)
  del model
  return assemble_state(setup, store_weights(setup.run, params), rest, step=0,
                        rng=jax.random.key_data(jax.random.key(seed + 1)).astype(jnp.uint32))


def _pretrained_model(setup: Setup, vocab_size: int):
  """The model with the checkpoint's weights; with `model.base_bits` the frozen kernels under LoRA
  adapters are quantized as they load (QLoRA), so a 7B checkpoint never sits in host memory in bf16."""
  m, abstract = setup.run.model, setup.abstract_state
  if m.n_layers:
    raise ConfigError("model.n_layers", f"cannot cut the checkpoint {m.init_from} to {m.n_layers} blocks; set 0 "
                      "(its own depth) to train from it (another depth is for memory reports and --fit)")
  shardings = {}
  for tree in (abstract.params, abstract.rest):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shardings["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf.sharding
  replicated = parallel.replicated(setup.mesh)
  return models.from_pretrained(m.init_from, linear_factory=linear_factory(setup.run), seed=setup.run.seed,
                                sharding=lambda path, _: shardings.get(path, replicated),
                                # PiSSA must see the float kernels: the base is quantized after it (QPiSSA)
                                store=None if pissa_init(setup.run) else lambda path, x: store_base(setup.run, path, x),
                                **pretrained_overrides(setup.run, vocab_size))


def _prepare(run: RunConfig, model) -> None:
  """The method's inits that need the loaded weights (PiSSA, DoRA's magnitudes), then a PEFT adapter to
  start from (`model.init_adapter_from`), in place."""
  run.method.prepare(model, seed=run.seed + 2)
  if run.model.init_adapter_from:
    models.peft_adapter.load_adapter(model, run.model.init_adapter_from)


def export_adapter(setup: Setup, state: TrainState) -> str:
  """Writes the trained LoRA adapters to `model.export_adapter_to` in the PEFT format."""
  m = setup.run.model
  model = setup.split.merge(state.params, state.rest)  # (a quantized base stays quantized: only adapters are read)
  return models.peft_adapter.save_adapter(model, m.export_adapter_to,
                                          base_model_name_or_path=hub.spec_of(m.init_from) if m.init_from else None)


def export_model(setup: Setup, state: TrainState) -> str:
  """Writes the trained model to `model.export_to` as a Hugging Face directory (adapters merged)."""
  m = setup.run.model
  model = setup.split.merge(int8_weight.float_view(state.params), state.rest)  # (int8 weights dequantized)
  return models.save_pretrained(model, m.export_to, source=m.init_from or None)


def assemble_state(setup: Setup, params: Any, rest: Any, *, step: Any, rng: Any) -> TrainState:
  """A train state from parameters, with a fresh optimizer state, placed as the setup says."""
  shardings = _shardings(setup.abstract_state)
  params = jax.device_put(params, shardings.params)
  state = TrainState(
      step=jnp.asarray(step, jnp.int32),
      params=params,
      rest=rest,
      opt_state=jax.jit(lambda p: setup.tx.init(int8_weight.trainable_view(p, setup.run.method.frozen())),
                        out_shardings=shardings.opt_state)(params),
      rng=rng,
  )
  return jax.device_put(state, shardings)


def param_count(setup: Setup) -> int:
  """The model's parameters (an int8 weight counts its elements, not its scales)."""
  return models.count_params(jax.eval_shape(int8_weight.float_view, setup.abstract_state.params))


def trainable_count(setup: Setup) -> int:
  """Parameters the optimizer trains directly: all but the kernels under LoRA adapters."""
  return param_count(setup) - frozen_kernel_count(setup.abstract_state.params)


def model_summary(setup: Setup) -> str:
  m = setup.run.model
  dtypes = sorted({str(x.dtype) for x in jax.tree.leaves(setup.abstract_state.params)})
  total, trained = param_count(setup), trainable_count(setup)
  trained_note = f", {trained / 1e6:.2f}M trained" if trained != total else ""
  return (f"{m.name}: {total / 1e6:.2f}M parameters{trained_note} ({', '.join(dtypes)}), "
          f"compute {m.dtype}{'' if m.remat == 'none' else f', remat {m.remat}'}, attention {setup.run.attention}"
          f"{' (auto)' if m.attention == 'auto' else ''}")
