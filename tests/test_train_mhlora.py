"""LTE multi-head LoRA through the trainer: trainable counts, W-only evaluation, exact resume."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.train import ConfigError, train
from lowrank_jax.train.config import resolve, validate
from lowrank_jax.train.setup import build_setup, init_state, param_count, trainable_count
from train_helpers import saved_params, tiny_config

FAST = {"data.seq_len": 32, "train.batch_size": 8, "train.log_every": 2, "train.eval_batches": 1,
        "train.eval_every": 0, "optimizer.name": "mhlora", "optimizer.mhlora.num_heads": 4,
        "optimizer.mhlora.rank": 4, "optimizer.mhlora.alpha": 16.0, "optimizer.mhlora.merge_every": 3}


def test_trainable_count():
  d, ff, layers, heads, r, vocab = 128, 344, 2, 4, 4, 384
  dense = layers * (4 * d * d + 3 * d * ff + 2 * d) + d + 2 * vocab * d
  per_linear_heads = heads * (d * r + r * d)  # A_h and B_h of a d x d attention linear
  snapshots = per_linear_heads  # V_h kept as factored snapshots of A_h and B_h
  setup = build_setup(resolve(tiny_config(**FAST)), 258)
  assert param_count(setup) == dense + layers * 4 * (per_linear_heads + snapshots)
  assert trainable_count(setup) == dense - layers * 4 * d * d + layers * 4 * per_linear_heads


def test_evaluation_uses_the_merged_weights_only():
  config = tiny_config(**FAST)
  setup = build_setup(resolve(config), 258)
  state = init_state(setup, 258)
  tokens = jnp.asarray(np.random.default_rng(0).integers(2, 258, (8, 32), dtype=np.int32))
  bumped = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.5 if "lora_b" in jax.tree_util.keystr(p) else x, state.params)
  # Heads that have not been merged change training outputs but not evaluation.
  assert float(setup.eval_step(bumped, state.rest, tokens)[0]) == float(setup.eval_step(state.params, state.rest, tokens)[0])
  loss = lambda params: float(setup.split.merge(params, state.rest)(tokens).sum())  # noqa: E731
  assert loss(bumped) != loss(state.params)


def test_resume_exactly_across_merges(tmp_path):
  overrides = {**FAST, "train.steps": 12, "train.checkpoint_every": 4, "train.keep_checkpoints": 5}
  straight = tmp_path / "straight"
  train(tiny_config(**overrides), str(straight))
  resumed = tmp_path / "resumed"
  shutil.copytree(straight, resumed)
  for step in ("8", "12"):
    shutil.rmtree(resumed / "checkpoints" / step)
  assert train(tiny_config(**overrides), str(resumed))["resumed_from"] == 4
  jax.tree.map(np.testing.assert_array_equal, saved_params(str(straight)), saved_params(str(resumed)))


@pytest.mark.parametrize("overrides,key", [
    ({"optimizer.mhlora.num_heads": 3}, "optimizer.mhlora.num_heads"),
    ({"parallel.mode": "pmap"}, "optimizer.mhlora.mode"),
    ({"optimizer.mhlora.layers": "q,zz"}, "optimizer.mhlora.layers"),
    ({"model.velora.layers": "q:8"}, "model.velora.layers"),  # q is a multi-head LoRA linear here
    ({"parallel.shard_heads": True, "optimizer.name": "adamw"}, "parallel.shard_heads"),
    ({"parallel.shard_heads": True, "optimizer.mhlora.mode": "mhlora"}, "parallel.shard_heads"),
    ({"parallel.shard_heads": True, "parallel.fsdp": True}, "parallel.fsdp"),
])
def test_bad_mhlora_values(tmp_path, overrides, key):
  with pytest.raises(ConfigError) as info:
    train(tiny_config(**{**FAST, **overrides}), str(tmp_path))
  assert info.value.key == key


def test_heads_over_devices_need_a_multiple_of_the_device_count():
  config = tiny_config(**{**FAST, "parallel.shard_heads": True})
  validate(config, num_devices=4)  # one head per device
  with pytest.raises(ConfigError) as info:
    validate(config, num_devices=8)
  assert info.value.key == "optimizer.mhlora.num_heads" and "multiple of the device count (8)" in str(info.value)


def test_gpt2_family_trains_with_mhlora(tmp_path):
  config = tiny_config(**{**FAST, "model.family": "gpt2", "model.tie_embeddings": True, "train.steps": 8,
                          "train.log_every": 1})
  summary = train(config, str(tmp_path))
  assert summary["model"] == "gpt2-tiny"
  assert np.isfinite(summary["eval_loss"]) and summary["train_loss"] < np.log(384)
  with pytest.raises(ConfigError) as info:
    train(tiny_config(**{"model.family": "gpt2", "model.size": "60m"}), str(tmp_path / "bad"))
  assert info.value.key == "model.size" and "124m" in str(info.value)
