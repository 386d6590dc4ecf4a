"""The jitted train and eval steps.

One step = gradient accumulation over micro-batches (a `lax.scan`, so one
compiled body whatever the count), one optimizer update, metrics left on the
device. The whole train state is donated, so parameters and optimizer state are
updated in place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.models import vit
from lowrank_jax.optim import clipping, subspace
from lowrank_jax.train.model import ModelSplit


class TrainState(NamedTuple):
  step: jax.Array  # int32 scalar: optimizer steps taken
  params: Any  # nested dict of the model's nnx.Param arrays
  rest: Any  # nested dict of the model's other variables
  opt_state: Any
  rng: jax.Array  # uint32 key data, for stochastic layers


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy of predicting tokens[:, t+1] at position t, and the count.

  Computed on the full logits with the last position weighted 0 (rather than
  slicing logits[:, :-1]) so no copy of the largest activation is made.
  """
  labels = jnp.roll(tokens, -1, axis=1)
  weights = jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(ce * weights), jnp.sum(weights)


def masked_next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy of tokens[:, t+1] at the positions t where `loss_mask` is 1, and the count.

  Instruction data: `loss_mask` marks the predictions of response tokens (prediction-aligned,
  last position 0), so prompt tokens and padding contribute nothing.
  """
  labels = jnp.roll(tokens, -1, axis=1)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  weights = loss_mask.astype(jnp.float32)
  return jnp.sum(ce * weights), jnp.sum(weights)


def classify(model: Any, batch: dict) -> dict[str, jax.Array]:
  """Image classification: summed cross-entropy, correct predictions and count of a batch of
  images [B, H, W, C] and labels [B] (a padded eval batch also has `mask` [B])."""
  return vit.classification_metrics(model(batch["images"]), batch["labels"], batch.get("mask"))


def batch_loss(model: Any, batch: Any) -> tuple[jax.Array, jax.Array]:
  """(summed loss, count) of a batch: token rows [B, T] (language modelling), or the dict of an
  instruction batch (tokens, segment_ids, positions, loss_mask: packed examples kept apart, the loss
  on responses only)."""
  if not isinstance(batch, dict):
    return next_token_loss(model(batch), batch)
  if "images" in batch:
    metrics = classify(model, batch)
    return metrics["loss"], metrics["count"]
  logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
  return masked_next_token_loss(logits, batch["tokens"], batch["loss_mask"])


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


def make_train_step(split: ModelSplit, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, axis_name: str | None = None, split_params: Any = None, refresh: bool = False,
                    accum_dtype: str = "float32", nonfinite_guard: str = "step"):
  """step(state, tokens[accum, micro, T]) -> (state, metrics); not yet jitted.

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
  """

  def loss_fn(params, rest, tokens):
    model = split.merge(params, rest)
    total, count = batch_loss(model, tokens)
    return total / jnp.maximum(count, 1.0), split.rest_of(model)  # (a fully padded batch counts 0)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state: TrainState, tokens: jax.Array):
    accum = jax.tree.leaves(tokens)[0].shape[0]  # tokens: [accum, micro, T], or a dict of them
    if accum == 1:
      (loss, rest), grads = grad_fn(state.params, state.rest, jax.tree.map(lambda x: x[0], tokens))
    else:
      # Accumulate in float32 (or the parameter dtype, see `accum_dtype`), then cast back once.
      sum_dtype = (lambda p: p.dtype) if accum_dtype == "param" else (lambda p: jnp.float32)
      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, sum_dtype(p)), state.params)

      def body(carry, micro):
        loss_sum, grad_sum, rest = carry
        (loss, rest), grads = grad_fn(state.params, rest, micro)
        grad_sum = jax.tree.map(lambda a, g: a + g.astype(a.dtype), grad_sum, grads)
        return (loss_sum + loss, grad_sum, rest), None

      (loss_sum, grad_sum, rest), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros, state.rest), tokens)
      loss = loss_sum / accum
      grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grad_sum, state.params)
    if axis_name is not None:
      loss, rest = (_pmean_floats(t, axis_name) for t in (loss, rest))
      if split_params is None:
        grads = _pmean_floats(grads, axis_name)
      else:
        grads = _reduce_split_grads(grads, split_params, axis_name)
    if refresh:
      return state._replace(opt_state=subspace.refresh_projectors(tx, grads, state.opt_state, state.params))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    norm_axis = None if split_params is None else axis_name
    grad_norm = clipping.global_norm(grads, norm_axis, split_params)
    # Non-finite guard (as optax.apply_if_finite, on the device, no host sync): a step whose
    # loss or gradient norm is not finite changes nothing and does not count; the loop sees
    # `skipped` at its next log and stops the run after train.max_nonfinite_steps in a row.
    finite = jnp.isfinite(loss) if nonfinite_guard == "loss" else jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "skipped": jnp.logical_not(finite).astype(jnp.int32),
    }
    return TrainState(state.step + finite.astype(state.step.dtype), keep(params, state.params),
                      keep(rest, state.rest), keep(opt_state, state.opt_state), state.rng), metrics

  return step


def make_eval_step(split: ModelSplit):
  """eval(params, rest, tokens[B, T]) -> (summed loss, token count); for images (summed loss,
  image count, correct predictions)."""

  def eval_step(params, rest, tokens):
    model = split.merge(params, rest, evaluation=True)
    if isinstance(tokens, dict) and "images" in tokens:
      metrics = classify(model, tokens)
      return metrics["loss"], metrics["count"], metrics["correct"]
    return batch_loss(model, tokens)

  return eval_step
