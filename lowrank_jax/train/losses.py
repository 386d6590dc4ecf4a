"""The losses the tasks train on: next-token cross-entropy (whole, masked or in chunks) and
image classification. Each returns a sum and a count, so micro-batches, devices and evaluation
batches combine exactly (mean = total sum / total count)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.models import vit
from lowrank_jax.nn import int8_weight

Loss = Callable[[Any, Any, int], tuple]  # (model, batch, loss_chunk) -> (summed loss, count, ...): a Task's


def next_token_weights(tokens: jax.Array) -> jax.Array:
  """float32 [B, T]: 1 where position t predicts tokens[:, t+1], 0 at the last position (nothing to predict)."""
  return jnp.ones(tokens.shape, jnp.float32).at[:, -1].set(0.0)


def _summed_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array) -> jax.Array:
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  return jnp.sum(ce * weights)


def masked_next_token_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy of tokens[:, t+1] at the positions t where `loss_mask` is 1, and the count.

  Computed on the full logits with the masked positions weighted 0 (rather than slicing
  logits[:, :-1]) so no copy of the largest activation is made. Language modelling masks only
  the last position (`next_token_weights`); instruction data marks the predictions of response
  tokens (prediction-aligned, last position 0), so prompt tokens and padding contribute nothing.
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


def classification_metrics(model: Any, batch: dict) -> dict[str, jax.Array]:
  """Image classification: summed cross-entropy, correct predictions and count of a batch of
  images [B, H, W, C] and labels [B] (a padded eval batch also has `mask` [B])."""
  return vit.classification_metrics(model(batch["images"]), batch["labels"], batch.get("mask"))


def classification_loss(model: Any, batch: dict, loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """(summed cross-entropy, image count) of an image batch (`loss_chunk` has no meaning here)."""
  del loss_chunk
  metrics = classification_metrics(model, batch)
  return metrics["loss"], metrics["count"]


def classification_eval(model: Any, batch: dict, loss_chunk: int = 0) -> tuple[jax.Array, ...]:
  """(summed cross-entropy, image count, correct predictions) of an evaluation batch."""
  del loss_chunk
  metrics = classification_metrics(model, batch)
  return metrics["loss"], metrics["count"], metrics["correct"]


def language_model_loss(model: Any, tokens: jax.Array, loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """(summed loss, count) of token rows [B, T]: every position predicts the next token.

  `loss_chunk` (`train.loss_chunk_positions`): 0 computes the full logits; N > 0 runs the output
  head and the cross-entropy over N sequence positions at a time (`chunked_cross_entropy` on
  `model.hidden_states` and `model.logits`, see `models.DecoderLM`).
  """
  return _decoder_loss(model, tokens, next_token_weights(tokens), {}, loss_chunk)


def instruction_loss(model: Any, batch: dict, loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """(summed loss, count) of an instruction batch (tokens, segment_ids, positions, loss_mask:
  packed examples kept apart, the loss on responses only); `loss_chunk` as `language_model_loss`."""
  return _decoder_loss(model, batch["tokens"], batch["loss_mask"].astype(jnp.float32),
                       {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}, loss_chunk)


def _decoder_loss(model: Any, tokens: jax.Array, weights: jax.Array, kw: dict, loss_chunk: int
                  ) -> tuple[jax.Array, jax.Array]:
  if not loss_chunk:
    return masked_next_token_loss(model(tokens, **kw), tokens, weights)
  if not hasattr(model, "hidden_states"):
    raise TypeError(f"loss_chunk={loss_chunk} needs a model with hidden_states() and logits() "
                    f"(lowrank_jax.models.DecoderLM); {type(model).__name__} has none: use loss_chunk=0")
  labels = jnp.roll(tokens, -1, axis=1)
  hidden = model.hidden_states(tokens, **kw)
  # The head's int8 weights are read once, outside the loop over chunks: inside, their gradient
  # carriers would be loop operands, arrays of the head's size that must exist (nn.int8_weight).
  return chunked_cross_entropy(int8_weight.read_once(model).logits, hidden, labels, weights,
                               loss_chunk), jnp.sum(weights)
