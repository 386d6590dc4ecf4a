"""The Task record: every data source has one task, the compiled step's batch is what the task's
input pipeline yields, and a model that does not learn the data's task is one error."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lowrank_jax.data import images as I
from lowrank_jax.train import ConfigError, resolve
from lowrank_jax.train.settings import SOURCES
from lowrank_jax.train.setup import build_setup, vocab_size_of
from lowrank_jax.train.task import CLASSIFICATION, INSTRUCTIONS, LANGUAGE_MODEL, TASKS, task_for
from test_instructions import ALPACA, write_jsonl
from train_helpers import tiny_config


def test_every_source_has_exactly_one_task():
  owners = {source: [t.name for t in TASKS if source in t.sources] for source in SOURCES}
  assert all(len(names) == 1 for names in owners.values()), owners
  assert task_for("synthetic") is LANGUAGE_MODEL and task_for("instructions") is INSTRUCTIONS
  assert task_for("npz") is CLASSIFICATION
  with pytest.raises(ConfigError, match="data.source"):
    task_for("parquet")


def _npz(tmp_path, size=8, classes=3):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, (24, size, size, 1), dtype=np.uint8)
  y = np.arange(24) % classes
  return str(I.write_medmnist_npz(tmp_path / "tiny.npz", {"train": (x, y), "val": (x[:8], y[:8])}))


def _configs(tmp_path):
  lm = tiny_config(**{"train.batch_size": 4, "train.grad_accum": 2})
  ins = tiny_config(**{"data.source": "instructions", "data.tokenizer": "byte", "data.eval_holdout": 0.25,
                       "data.seq_len": 256,  # (the Alpaca prompt alone is over 128 bytes)
                       "data.path": write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 4),
                       "train.batch_size": 4, "train.grad_accum": 2})
  images = tiny_config(**{"model.family": "vit", "model.size": "tiny", "data.source": "npz",
                          "data.path": _npz(tmp_path), "data.eval_split": "val", "train.batch_size": 4,
                          "train.grad_accum": 2})
  return {"language_model": lm, "instructions": ins, "classification": images}


@pytest.mark.parametrize("name", ["language_model", "instructions", "classification"])
def test_step_batch_is_what_the_input_yields(tmp_path, name):
  """The abstract batch the step is compiled for (Task.example) has the structure, shapes and dtypes of
  a real training batch from the task's pipeline, and the vocabulary read without data is the input's."""
  run = resolve(_configs(tmp_path)[name])
  assert run.task.name == name
  inputs = run.task.build_input(run, process_index=0, process_count=1)
  assert vocab_size_of(run) == inputs.tokenizer.vocab_size
  setup = build_setup(run, vocab_size_of(run))
  local = next(inputs.train_iter)
  accum = run.train.grad_accum
  local = {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in local.items()}
  real = run.task.batch(local)
  shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)  # noqa: E731
  assert shapes(setup.abstract_tokens()) == shapes(real)
  # One step compiles and runs on it, and the task's evaluation sums a validation batch.
  from lowrank_jax.train.setup import init_state

  state, metrics = setup.train_step(init_state(setup, vocab_size_of(run)), real)
  assert np.isfinite(float(metrics["loss"]))
  sums = [setup.eval_step(state.params, state.rest, run.task.batch(b)) for b in inputs.eval_batches]
  assert {len(s) for s in sums} == {3 if name == "classification" else 2}
  assert sum(float(s[1]) for s in sums) > 0


def test_model_must_learn_the_datas_task(tmp_path):
  with pytest.raises(ConfigError, match=r"data\.source.*'synthetic' is data for language_model.*learns "
                                         r"classification"):
    resolve(tiny_config(**{"model.family": "vit", "model.size": "tiny"}))
  with pytest.raises(ConfigError, match=r"data\.source.*'npz' is data for classification"):
    resolve(tiny_config(**{"data.source": "npz", "data.path": _npz(tmp_path), "data.eval_split": "val"}))
