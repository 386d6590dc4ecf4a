"""The jitted train and eval steps.

One step = gradient accumulation over micro-batches (a `lax.scan`, so one
compiled body whatever the count), one optimizer update, metrics left on the
device. The whole train state is donated, so parameters and optimizer state are
updated in place.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

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


def next_token_weights(tokens: jax.Array) -> jax.Array:
  """float32 [B, T]: 1 where position t predicts tokens[:, t+1], 0 at the last position (nothing to predict)."""
  return jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)


def _summed_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(ce * weights)


def next_token_loss(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy of predicting tokens[:, t+1] at position t, and the count.

  Computed on the full logits with the last position weighted 0 (rather than
  slicing logits[:, :-1]) so no copy of the largest activation is made.
  """
  weights = next_token_weights(tokens)
  return _summed_cross_entropy(logits, jnp.roll(tokens, -1, axis=1), weights), jnp.sum(weights)


def masked_next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy of tokens[:, t+1] at the positions t where `loss_mask` is 1, and the count.

  Instruction data: `loss_mask` marks the predictions of response tokens (prediction-aligned,
  last position 0), so prompt tokens and padding contribute nothing.
  """
  weights = loss_mask.astype(jnp.float32)
  return _summed_cross_entropy(logits, jnp.roll(tokens, -1, axis=1), weights), jnp.sum(weights)


def chunked_cross_entropy(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
                          weights: jax.Array, chunk: int) -> jax.Array:
  """sum over b, t of weights[b, t] * CE(logits_fn(hidden[b, t]), labels[b, t]), `chunk` positions at a time.

  The same sum as `logits_fn` on all of `hidden` followed by the cross-entropy, up to float
  rounding, without the [B, T, vocab] logits: a `lax.scan` over chunks of `chunk` sequence
  positions (every row of the batch in each chunk, so a batch split over devices stays split),
  each chunk under `jax.checkpoint`, so the backward pass recomputes one chunk's logits at a
  time. The head's gradient is summed over the chunks in the head's dtype. A last partial chunk is
  padded with weight-0 positions.

  Args:
    logits_fn: final hidden states [..., d] -> logits [..., vocab] (e.g. `DecoderLM.logits`).
    hidden: [B, T, d]; labels: int [B, T]; weights: [B, T] (0 where nothing is predicted).
    chunk: sequence positions per chunk, > 0.

  Returns:
    The summed weighted cross-entropy, float32 scalar.
  """
  b, t = labels.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    widths = lambda a: [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2)  # noqa: E731
    hidden, labels, weights = (jnp.pad(a, widths(a)) for a in (hidden, labels, weights))
  chunks = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)  # noqa: E731

  @jax.checkpoint
  def chunk_loss(h, y, w):
    return _summed_cross_entropy(logits_fn(h), y, w)

  def body(total, xs):
    return total + chunk_loss(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(hidden), chunks(labels), chunks(weights)))
  return total


def classify(model: Any, batch: dict) -> dict[str, jax.Array]:
  """Image classification: summed cross-entropy, correct predictions and count of a batch of
  images [B, H, W, C] and labels [B] (a padded eval batch also has `mask` [B])."""
  return vit.classification_metrics(model(batch["images"]), batch["labels"], batch.get("mask"))


def batch_loss(model: Any, batch: Any, loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """(summed loss, count) of a batch: token rows [B, T] (language modelling), or the dict of an
  instruction batch (tokens, segment_ids, positions, loss_mask: packed examples kept apart, the loss
  on responses only), or of images (classification).

  `loss_chunk` (`train.loss_chunk_positions`; language models): 0 computes the full logits; N > 0
  runs the output head and the cross-entropy over N sequence positions at a time
  (`chunked_cross_entropy` on `model.hidden_states` and `model.logits`, see `models.DecoderLM`).
  """
  if isinstance(batch, dict) and "images" in batch:
    metrics = classify(model, batch)
    return metrics["loss"], metrics["count"]
  if isinstance(batch, dict):
    tokens, weights = batch["tokens"], batch["loss_mask"].astype(jnp.float32)
    kw = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
  else:
    tokens, weights, kw = batch, next_token_weights(batch), {}
  labels = jnp.roll(tokens, -1, axis=1)
  if loss_chunk:
    if not hasattr(model, "hidden_states"):
      raise TypeError(f"loss_chunk={loss_chunk} needs a model with hidden_states() and logits() "
                      f"(lowrank_jax.models.DecoderLM); {type(model).__name__} has none: use loss_chunk=0")
    total = chunked_cross_entropy(model.logits, model.hidden_states(tokens, **kw), labels, weights, loss_chunk)
  else:
    total = _summed_cross_entropy(model(tokens, **kw), labels, weights)
  return total, jnp.sum(weights)


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
                    accum_dtype: str = "float32", nonfinite_guard: str = "step", loss_chunk: int = 0):
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

  `loss_chunk` (`train.loss_chunk_positions`): see `batch_loss`.
  """

  def loss_fn(params, rest, tokens):
    model = split.merge(params, rest)
    total, count = batch_loss(model, tokens, loss_chunk)
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


def make_eval_step(split: ModelSplit, loss_chunk: int = 0):
  """eval(params, rest, tokens[B, T]) -> (summed loss, token count); for images (summed loss,
  image count, correct predictions). `loss_chunk`: see `batch_loss`."""

  def eval_step(params, rest, tokens):
    model = split.merge(params, rest, evaluation=True)
    if isinstance(tokens, dict) and "images" in tokens:
      metrics = classify(model, tokens)
      return metrics["loss"], metrics["count"], metrics["correct"]
    return batch_loss(model, tokens, loss_chunk)

  return eval_step
