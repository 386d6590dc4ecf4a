"""The jitted train and eval steps.

One step = gradient accumulation over micro-batches (a `lax.scan`, so one
compiled body whatever the count), one optimizer update, metrics left on the
device. The whole train state is donated, so parameters and optimizer state are
updated in place.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.nn import int8_weight
from lowrank_jax.optim import clipping, subspace
from lowrank_jax.train.losses import Loss, language_model_loss
from lowrank_jax.train.model import ModelSplit


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # nested dict of the model's nnx.Param arrays
  rest: Any  # nested dict of the model's other variables
  opt_state: Any
  rng: jax.Array  # uint32 key data, for stochastic layers


def _pmean_floats(tree: Any, axis_name: str) -> Any:
  return jax.tree.map(
      lambda x: jax.lax.pmean(x, axis_name) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _reduce_split_grads(grads: Any, split: Any, axis_name: str) -> Any:
  """Per-device gradients -> those of the global mean loss, leaving split leaves local.

  Every device's loss is the mean over an equal share of the batch, so the global
  loss is their mean: replicated leaves take the mean of the devices' gradients
  (one all-reduce); a split leaf (a head living only on this device, used only by
  this device's share) takes its own gradient divided by the device count, with no
  communication at all.
  """
  n = jax.lax.axis_size(axis_name)
  return jax.tree.map(lambda g, s: g / n if s else jax.lax.pmean(g, axis_name), grads, split)


def _accumulate(grad_fn: Callable, state: TrainState, tokens: Any, accum_dtype: str, view: Callable) -> tuple:
  """(mean loss, model variables after the last micro-batch, mean gradients) over tokens' micro-batches."""
  accum = jax.tree.leaves(tokens)[0].shape[0]  # tokens: [accum, micro, T], or a dict of them
  if accum == 1:
    (loss, rest), grads = grad_fn(state.params, state.rest, jax.tree.map(lambda x: x[0], tokens))
    return loss, rest, grads
  # Accumulate in float32 (or the parameter dtype, see `accum_dtype`), then cast back once.
  sum_dtype = (lambda p: p.dtype) if accum_dtype == "param" else (lambda p: jnp.float32)
  like = jax.eval_shape(view, state.params)  # what the gradients are shaped like
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, sum_dtype(p)), like)

  def body(carry, micro):
    loss_sum, grad_sum, rest = carry
    (loss, rest), grads = grad_fn(state.params, rest, micro)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grad_sum, grads)
    return (loss_sum + loss, grad_sum, rest), None

  (loss_sum, grad_sum, rest), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros, state.rest), tokens)
  loss = loss_sum / accum
  return loss, rest, jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, like)


def _reduce(loss: Any, rest: Any, grads: Any, axis_name: str | None, split_params: Any) -> tuple:
  """In a per-device program, the loss, variables and gradients of the whole batch (see
  `make_train_step`); as they are without `axis_name`."""
  if axis_name is None:
    return loss, rest, grads
  loss, rest = (_pmean_floats(t, axis_name) for t in (loss, rest))
  if split_params is None:
    return loss, rest, _pmean_floats(grads, axis_name)
  return loss, rest, _reduce_split_grads(grads, split_params, axis_name)


def _guarded_update(tx: optax.GradientTransformation, schedule: optax.Schedule, state: TrainState, loss: Any,
                    rest: Any, grads: Any, *, norm_axis: str | None, split_params: Any,
                    nonfinite_guard: str, view: Callable) -> tuple[TrainState, dict]:
  """The optimizer update of `state`, kept only where the loss (and with "step" the global
  gradient norm, over `norm_axis` for split leaves) is finite, and the step's metrics."""
  # The optimizer sees float weights; int8 ones (`model.weight_bits=8`) take the update with stochastic
  # rounding, its randomness from the run's key and the step (a resumed run rounds the same way).
  updates, opt_state = tx.update(grads, state.opt_state, view(state.params))
  grad_norm = clipping.global_norm(grads, norm_axis, split_params)
  # Non-finite guard (as optax.apply_if_finite, on the device, no host sync): a step whose
  # loss or gradient norm is not finite changes nothing and does not count; the loop sees
  # `skipped` at its next log and stops the run after train.max_nonfinite_steps in a row.
  finite = jnp.isfinite(loss) if nonfinite_guard == "loss" else jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  # The parameters take the guard inside `apply_updates` (`where`): int8 weights zero a skipped step's
  # update, so their new codes are written in place (see int8_weight.apply_updates).
  params = int8_weight.apply_updates(state.params, updates, int8_weight.step_seed(state.rng, state.step),
                                     where=finite)
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "lr": jnp.asarray(schedule(state.step), jnp.float32),
      "skipped": jnp.logical_not(finite).astype(jnp.int32),
  }
  return TrainState(state.step + finite.astype(state.step.dtype), params,
                    keep(rest, state.rest), keep(opt_state, state.opt_state), state.rng), metrics


def make_train_step(split: ModelSplit, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, loss: Loss = language_model_loss, axis_name: str | None = None, split_params: Any = None,
                    refresh: bool = False, accum_dtype: str = "float32", nonfinite_guard: str = "loss",
                    loss_chunk: int = 0, frozen: int8_weight.Frozen | None = None):
  """step(state, tokens[accum, micro, T]) -> (state, metrics); not yet jitted. Every parallel
  mode compiles this one body (`parallel.compile_program`).

  `loss` is the task's (`Task.loss`): the summed loss and count of one micro-batch; the step
  minimises their ratio. The default is next-token prediction on token rows.

  With `refresh` it is the projector refresh program instead (`refresh(state, tokens)
  -> state`): the same gradients, then only `optim.refresh_projectors` (the
  split-refresh subspace transforms' new projectors; no update, no step counted).

  With `axis_name` the step is a per-device program for `jax.pmap` / `jax.shard_map`:
  gradients, the loss and floating model variables are averaged over that axis
  before the update, so every replica applies the same update. Without it (jit over
  a mesh) the compiler inserts the same all-reduce from the shardings.

  `split_params` (with `axis_name`; bools over the params) marks the leaves that
  hold only this device's block (LTE heads spread over devices): their gradients
  stay local (see `_reduce_split_grads`) and the reported gradient norm sums them
  over the axis. The optimizer `tx` must be the matching per-device one.

  `accum_dtype` (`train.accum_dtype`): micro-batch gradients are summed in float32, or
  with "param" in each parameter's dtype. The sum is one copy of every gradient held
  across the micro-batches; with bfloat16 weights "param" halves it (each addition
  rounds to bfloat16).

  `nonfinite_guard` (`train.nonfinite_guard`): "step" skips a step whose loss or global
  gradient norm is not finite; its update waits for every gradient, so an accelerator holds one
  full set of gradients at the end of the backward pass. "loss" checks the loss alone, and the
  compiler frees each layer's gradient right after its update.

  `loss_chunk` (`train.loss_chunk_positions`): see `losses.language_model_loss`.

  `frozen` (the method's `Method.frozen`, e.g. LoRA's adapters alone): the leaves it marks get no
  gradient (not even computed: a fine-tune's embedding and head gradients would be a float32 copy of
  each, held across the micro-batches) and are not in the optimizer's tree.
  """

  def loss_fn(params, rest, tokens):
    model = split.merge(params, rest)
    total, count = loss(model, tokens, loss_chunk)
    return total / jnp.maximum(count, 1.0), split.rest_of(model)  # (a fully padded batch counts 0)

  # Gradients of the float weights, also where they are stored in int8 (then of the dequantized ones).
  grad_fn = int8_weight.value_and_grad(loss_fn, has_aux=True, frozen=frozen)
  view = functools.partial(int8_weight.trainable_view, frozen=frozen)  # what the optimizer sees

  def step(state: TrainState, tokens: jax.Array):
    mean_loss, rest, grads = _reduce(*_accumulate(grad_fn, state, tokens, accum_dtype, view), axis_name,
                                     split_params)
    if refresh:
      return state._replace(opt_state=subspace.refresh_projectors(tx, grads, state.opt_state,
                                                                  view(state.params)))
    return _guarded_update(tx, schedule, state, mean_loss, rest, grads, split_params=split_params,
                           norm_axis=None if split_params is None else axis_name, nonfinite_guard=nonfinite_guard,
                           view=view)

  return step


def make_eval_step(split: ModelSplit, loss_chunk: int = 0, evaluate: Loss = language_model_loss):
  """eval(params, rest, batch) -> the task's sums (`Task.evaluate`): (summed loss, count), for images
  (summed loss, image count, correct predictions). `loss_chunk`: see `losses.language_model_loss`."""

  def eval_step(params, rest, batch):
    return evaluate(split.merge(params, rest, evaluation=True), batch, loss_chunk)

  return eval_step
