"""LoRA and ReLoRA through the trainer: trainable counts, memory, warm starts, exact resume."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest

from lowrank_jax.train import ConfigError, memory_report, resolve, train
from lowrank_jax.train import warm_start
from lowrank_jax.train.setup import build_setup, init_state
from train_helpers import saved_params, tiny_config

FAST = {"data.seq_len": 32, "train.batch_size": 8, "train.log_every": 5, "train.eval_batches": 1,
        "train.eval_every": 0}
RANK = 8


def lora_config(method="lora", **overrides):
  return tiny_config(**{**FAST, "optimizer.name": method, "optimizer.lora.rank": RANK,
                        "optimizer.lora.alpha": 16.0, **overrides})


def _independent_counts(config, vocab=258):
  """(all parameters, trainable) from the LLaMA shapes, written out by hand."""
  d, ff, layers = 128, 344, 2  # the tiny size
  v = -(-vocab // 128) * 128
  dense = layers * (4 * d * d + 3 * d * ff + 2 * d) + d + 2 * v * d  # blocks, final norm, embed + head
  adapters = layers * (4 * (d * RANK + RANK * d) + 2 * (d * RANK + RANK * ff) + (ff * RANK + RANK * d))
  kernels = layers * (4 * d * d + 3 * d * ff)
  return dense + adapters, dense + adapters - kernels


@pytest.mark.parametrize("method", ["lora", "relora"])
def test_trainable_count_and_optimizer_memory(method):
  config = lora_config(method)
  total, trainable = _independent_counts(config)
  from lowrank_jax.train.setup import param_count, trainable_count

  setup = build_setup(resolve(config), 258)
  assert param_count(setup) == total
  assert trainable_count(setup) == trainable
  # AdamW moments for exactly the trained parameters: no state for the frozen kernels.
  report = memory_report(config)
  assert 8 * trainable <= report["opt_state_bytes"] <= 8 * trainable + 64


def test_relora_resumes_exactly_mid_cycle_and_across_the_warm_start(tmp_path):
  overrides = {"train.steps": 48, "train.checkpoint_every": 8, "train.keep_checkpoints": 10,
               "optimizer.relora.warm_start_steps": 16, "optimizer.relora.merge_every": 16,
               "optimizer.relora.restart_warmup_steps": 4}
  straight = tmp_path / "straight"
  train(lora_config("relora", **overrides), str(straight))
  final = saved_params(str(straight), 48)
  assert any("lora_a" in str(path) for path, _ in jax.tree_util.tree_flatten_with_path(final)[0])
  # A run that died after step 8 (inside the warm start) and one after step 24 (mid-cycle:
  # merges at 32 and 48), each resumed by running the same config again.
  for died_after in (8, 24):
    run = tmp_path / f"died_{died_after}"
    shutil.copytree(straight, run)
    for ckpt in (run / "checkpoints").iterdir():
      if ckpt.name.isdigit() and int(ckpt.name) > died_after:
        shutil.rmtree(ckpt)
    summary = train(lora_config("relora", **overrides), str(run))
    assert summary["resumed_from"] == died_after
    jax.tree.map(np.testing.assert_array_equal, final, saved_params(str(run), 48))


def test_warm_start_from_a_full_rank_run(tmp_path):
  full = tmp_path / "full_rank"
  train(tiny_config(**{**FAST, "train.steps": 6}), str(full))
  dense = saved_params(str(full))
  config = lora_config("relora", **{"train.steps": 4, "optimizer.relora.merge_every": 2,
                                    "optimizer.relora.restart_warmup_steps": 1,
                                    "optimizer.relora.warm_start_from": str(full)})
  setup = build_setup(resolve(config), 258)
  fresh = init_state(setup, 258)
  started = warm_start.start_from_full_rank(setup, fresh, 258)
  flat = {_names(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(started.params)[0]}
  dense_leaves = jax.tree_util.tree_flatten_with_path(dense)[0]
  assert len(dense_leaves) == 3 + 2 * (2 + 7)  # embed, final norm, head; 2 norms + 7 kernels per layer
  for path, value in dense_leaves:
    np.testing.assert_array_equal(flat[_names(path)], value)  # every full-rank weight carried over
  q = started.params["layers"][0]["attn"]["q"]
  assert not np.any(np.asarray(q["lora_b"]))  # adapters start as a no-op
  np.testing.assert_array_equal(q["lora_a"], fresh.params["layers"][0]["attn"]["q"]["lora_a"])
  assert int(started.step) == 0
  summary = train(config, str(tmp_path / "relora"))
  assert np.isfinite(summary["eval_loss"]) and summary["steps"] == 4


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


@pytest.mark.parametrize("overrides,key", [
    ({"optimizer.lora.layers": "q,qq"}, "optimizer.lora.layers"),
    ({"optimizer.lora.rank": 0}, "optimizer.lora.rank"),
    ({"optimizer.relora.warm_start_steps": 30, "optimizer.relora.merge_every": 20, "train.steps": 100,
      "optimizer.relora.restart_warmup_steps": 5},
     "optimizer.relora.warm_start_steps"),
    ({"optimizer.relora.prune": "l1"}, "optimizer.relora.prune"),
    ({"optimizer.relora.restart_warmup_steps": 50, "optimizer.relora.merge_every": 50},
     "optimizer.relora.restart_warmup_steps"),
])
def test_bad_relora_values(tmp_path, overrides, key):
  with pytest.raises(ConfigError) as info:
    train(lora_config("relora", **overrides), str(tmp_path))
  assert info.value.key == key
