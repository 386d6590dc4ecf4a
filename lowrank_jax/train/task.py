"""What a run learns, beside how it learns it (the `Method`): one `Task` record per kind of data.

A task owns everything that depends on what the data is: the batch the compiled step takes, the
loss and the evaluation sums, the vocabulary (or the class count, for images), the input pipeline,
and what the data decides of the model (its vocabulary and context, or its image geometry). It is
chosen once, from `data.source`, when the configuration is resolved (`RunConfig.task`); the trainer
asks the task and never tests the data source or the model family again.

To add a task: write its functions (its loss in `losses.py`, its input in `input.py`), add a `Task`
below with the sources it reads, and give the model family that learns it that task name
(`lowrank_jax.models`' family registry).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from lowrank_jax.train import input as input_lib
from lowrank_jax.train import losses
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.model import padded_vocab
from lowrank_jax.train.settings import IMAGE_SOURCES, RunConfig

@dataclasses.dataclass(frozen=True)
class Task:
  """What a run learns.

  Attributes:
    name: how configs and logs name it.
    model_task: the task a model family must be registered with to learn this one.
    sources: the `data.source` values that hold this task's data.
    positions: run -> the positions of one example that the logs count as tokens (1 per image).
    describe_batch: (run, vocab_size) -> one step's batch in words, for the log.
    example: run -> one example of a training batch as ShapeDtypeStructs (a tree: the step's
      batch is this with [grad_accum, micro-batch] in front).
    batch: the input pipeline's dict of arrays -> the batch as the step and the evaluation take it.
    loss: the training loss of one micro-batch, a sum and a count (`step.make_train_step`).
    evaluate: the sums one validation batch adds up (`step.make_eval_step`): (loss, count) or, for
      images, (loss, count, correct).
    vocab_size: run -> the embedding's vocabulary or the head's class count, reading no training
      data where it can.
    build_input: (run, *, process_index, process_count) -> `input.Input`.
    model_options: (run, vocab_size) -> what the data decides of a new model's config.
    model_options_key: the config key named when those options make no valid config (a ViT's
      image side that its patches do not divide).
    pretrained_options: (run, vocab_size) -> what the run changes of a checkpoint's config.
    check_pretrained: (run, checkpoint config) -> None, or ConfigError when the data does not fit it.
  """

  name: str
  model_task: str
  sources: tuple[str, ...]
  positions: Callable[[RunConfig], int]
  describe_batch: Callable[[RunConfig, int], str]
  example: Callable[[RunConfig], Any]
  batch: Callable[[dict], Any]
  loss: losses.Loss
  evaluate: losses.Loss
  vocab_size: Callable[[RunConfig], int]
  build_input: Callable[..., input_lib.Input]
  model_options: Callable[[RunConfig, int], dict]
  model_options_key: str
  pretrained_options: Callable[[RunConfig, int], dict]
  check_pretrained: Callable[[RunConfig, Any], None]


# --- language modelling (and instruction tuning) ----------------------------------------------------

def _rows(run: RunConfig, dtype: Any = jnp.int32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((run.data.seq_len,), dtype)


def _decoder_options(run: RunConfig, vocab_size: int) -> dict:
  """A new decoder's vocabulary (padded to `model.vocab_multiple`, fast matmuls) and context."""
  m = run.model
  return {"vocab_size": padded_vocab(vocab_size, m.vocab_multiple), "max_seq_len": run.data.seq_len,
          "tie_embeddings": m.tie_embeddings}


def _check_context(run: RunConfig, config: Any) -> None:
  if run.data.seq_len > config.max_seq_len:
    raise ConfigError("data.seq_len", f"must be <= {config.max_seq_len}, the context of {run.model.init_from}")


LANGUAGE_MODEL = Task(
    name="language_model", model_task="language_model",
    sources=("synthetic", "jsonl", "text", "tfds", "hf"),
    positions=lambda run: run.data.seq_len, example=_rows, batch=lambda fields: fields["tokens"],
    describe_batch=lambda run, vocab: f"{run.train.batch_size} x {run.data.seq_len} tokens; vocab {vocab}",
    loss=losses.language_model_loss, evaluate=losses.language_model_loss,
    vocab_size=input_lib.token_vocab_size, build_input=input_lib.token_input,
    model_options=_decoder_options, model_options_key="data.seq_len",
    pretrained_options=lambda run, vocab_size: {}, check_pretrained=_check_context,
)

INSTRUCTIONS = dataclasses.replace(
    LANGUAGE_MODEL, name="instructions", sources=("instructions",),
    example=lambda run: {"tokens": _rows(run), "segment_ids": _rows(run), "positions": _rows(run),
                         "loss_mask": _rows(run, jnp.float32)},
    batch=lambda fields: fields,
    loss=losses.instruction_loss, evaluate=losses.instruction_loss, build_input=input_lib.instruction_input,
)


# --- image classification ------------------------------------------------------------------------

def _image_example(run: RunConfig) -> dict:
  size, channels = input_lib.model_image_shape(run)
  return {"images": jax.ShapeDtypeStruct((size, size, channels), jnp.float32),
          "labels": jax.ShapeDtypeStruct((), jnp.int32)}


def _image_options(run: RunConfig, num_classes: int) -> dict:
  """A new ViT's head (the data's classes) and its image geometry (the data's, or `data.image`)."""
  size, channels = input_lib.model_image_shape(run)
  return {"vocab_size": num_classes, "image_size": size, "num_channels": channels}


def _check_image_fits(run: RunConfig, config: Any) -> None:
  """A pretrained ViT takes images of its own size and channels (no position interpolation)."""
  size, channels = input_lib.model_image_shape(run)
  for key, got, want in (("data.image.size", size, config.image_size),
                         ("data.image.channels", channels, config.num_channels)):
    if got != want:
      raise ConfigError(key, f"is {got}, but {run.model.init_from} takes {config.image_size}x{config.image_size}"
                        f"x{config.num_channels} images: set {want} (or 0: the checkpoint's)")


CLASSIFICATION = Task(
    name="classification", model_task="classification", sources=IMAGE_SOURCES,
    positions=lambda run: 1, example=_image_example, batch=lambda fields: fields,
    describe_batch=lambda run, classes: f"{run.train.batch_size} images of {classes} classes",
    loss=losses.classification_loss, evaluate=losses.classification_eval,
    vocab_size=lambda run: input_lib.image_classes(run).vocab_size, build_input=input_lib.image_input,
    model_options=_image_options, model_options_key="data.image.size",
    # A class count other than the checkpoint's gives the ViT a new head.
    pretrained_options=lambda run, num_classes: {"num_classes": num_classes},
    check_pretrained=_check_image_fits,
)

TASKS = (LANGUAGE_MODEL, INSTRUCTIONS, CLASSIFICATION)


def task_for(source: str) -> Task:
  """The task whose data `data.source` holds (the settings checked the source is a known one)."""
  for task in TASKS:
    if source in task.sources:
      return task
  raise ConfigError("data.source", f"unknown value {source!r}", [s for t in TASKS for s in t.sources])
