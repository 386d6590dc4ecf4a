"""VeLoRA through the trainer: measured memory vs the analytic saving, v in checkpoints, LoRA + VeLoRA."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from lowrank_jax.train import ConfigError, memory_report, train
from train_helpers import saved_params, tiny_config

FAST = {"data.seq_len": 32, "train.batch_size": 8, "train.log_every": 5, "train.eval_batches": 1,
        "train.eval_every": 0}


@pytest.mark.xfail(strict=True, reason=(
    "the train step's non-finite guard (train/step.py: every update is kept or dropped on a finite check) "
    "moves the step's peak: with the default train.nonfinite_guard=loss o+down saves 26.41 of the analytic "
    "28.48 MB (0.927); with nonfinite_guard=step 27.49 MB (0.965), and v alone costs 0.45 instead of 1.05 MB. "
    "With the guard replaced by `finite = True` the same step gives 28.30 MB (0.994) and exactly 1,048,576 "
    "bytes; the layers are not the cause (issue #17 notes)"))
def test_memory_saving_matches_the_analytic_one():
  """Compressing an input frees it only when no other consumer keeps it.

  o's and down's inputs have one consumer each: compressing both frees, per layer and
  token, their inputs minus the sub-token projections. v shares its input with q and k,
  so compressing v alone frees nothing and only adds its projections. Measured on the
  60m shape (8 layers, where the peak is at the start of the backward pass, so every
  saved activation counts); XLA:CPU holds these activations as float32, hence 4 bytes.
  """
  d, ff, layers, batch, seq = 512, 1376, 8, 4, 128
  base = {"model.size": "60m", "train.batch_size": batch, "data.seq_len": seq}
  temp = {spec: memory_report(tiny_config(**base, **{"model.velora.layers": spec}))["temp_bytes"]
          for spec in ("", "o:8,down:16", "v:8")}
  tokens = batch * seq
  analytic = layers * tokens * ((d - d // 8) + (ff - ff // 16)) * 4
  saved = temp[""] - temp["o:8,down:16"]
  assert abs(saved - analytic) <= 0.02 * analytic, (saved, analytic)
  overhead = layers * tokens * (d // 8) * 4  # v's projections, kept on top of the shared input
  assert abs((temp["v:8"] - temp[""]) - overhead) <= 0.02 * overhead + 4096


def test_v_is_set_by_the_first_batch_checkpointed_and_resumed_exactly(tmp_path):
  overrides = {**FAST, "model.velora.layers": "o:8,down:8", "train.steps": 12, "train.checkpoint_every": 4,
               "train.keep_checkpoints": 5}
  straight = tmp_path / "straight"
  train(tiny_config(**overrides), str(straight))
  import orbax.checkpoint as ocp

  rest = ocp.StandardCheckpointer().restore(straight / "checkpoints" / "12" / "rest")
  for name in ("o", "down"):
    layer = rest["layers"]["0"]["attn" if name == "o" else "mlp"][name]
    assert int(layer["initialised"]) == 1  # batch_average_once: set by the first batch...
    np.testing.assert_allclose(np.linalg.norm(layer["v"]), 1.0, rtol=1e-5)
  first = ocp.StandardCheckpointer().restore(straight / "checkpoints" / "4" / "rest")
  np.testing.assert_array_equal(first["layers"]["1"]["mlp"]["down"]["v"],
                                rest["layers"]["1"]["mlp"]["down"]["v"])  # ...and then fixed
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  for step in ("8", "12"):
    shutil.rmtree(resumed / "checkpoints" / step)
  assert train(tiny_config(**overrides), str(resumed))["resumed_from"] == 4
  jax.tree.map(np.testing.assert_array_equal, saved_params(str(straight)), saved_params(str(resumed)))


def test_lora_with_velora_compresses_the_adapter_input(tmp_path):
  config = tiny_config(**{**FAST, "optimizer.name": "lora", "optimizer.lora.rank": 8,
                          "model.velora.layers": "o:8,down:8", "train.steps": 10})
  summary = train(config, str(tmp_path))
  assert np.isfinite(summary["eval_loss"])
  plain = memory_report(tiny_config(**{**FAST, "optimizer.name": "lora", "optimizer.lora.rank": 8}))
  assert memory_report(config)["temp_bytes"] < plain["temp_bytes"]


@pytest.mark.parametrize("layers,hint", [("down:7", "must divide"), ("head:8", "unknown layer"),
                                         ("v:x", "layer[:sub_token_size]")])
def test_bad_velora_specs(tmp_path, layers, hint):
  with pytest.raises(ConfigError) as info:
    train(tiny_config(**{"model.velora.layers": layers}), str(tmp_path))
  assert info.value.key == "model.velora.layers" and hint in str(info.value)


@pytest.mark.parametrize("method", ["galore", "osd"])
def test_velora_with_projected_optimizers(tmp_path, method):
  config = tiny_config(**{**FAST, "optimizer.name": method, f"optimizer.{method}.rank": 16,
                          "model.velora.layers": "o:8,down:8", "train.steps": 6, "train.log_every": 1})
  summary = train(config, str(tmp_path))
  assert np.isfinite(summary["eval_loss"]) and summary["train_loss"] < np.log(384)
