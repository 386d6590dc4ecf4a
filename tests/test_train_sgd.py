"""SGD with momentum, the worked example of adding a method: its update against numpy, its memory, a run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.train import ConfigError, build_optimizer, memory_report, resolve, train
from train_helpers import tiny_config


def _sgd(**overrides):
  return tiny_config(**{"optimizer.name": "sgd", "optimizer.schedule": "constant", "optimizer.lr": 0.1,
                        "optimizer.grad_clip": 0.0, **overrides})


@pytest.mark.parametrize("nesterov", [False, True])
def test_update_matches_momentum_sgd_in_numpy(nesterov):
  lr, mu, wd = 0.1, 0.8, 0.05
  tx, _ = build_optimizer(resolve(_sgd(**{"optimizer.sgd.momentum": mu, "optimizer.sgd.nesterov": nesterov,
                                          "optimizer.weight_decay": wd})))
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "scale": rng.normal(size=(4,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
  state, p = tx.init(params), jax.tree.map(jnp.asarray, params)
  ref, m = {k: v.astype(np.float64) for k, v in params.items()}, {k: 0.0 for k in params}
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = jax.tree.map(lambda a, u: a + u, p, updates)
    for k in ref:
      m[k] = mu * m[k] + g[k]
      step = g[k] + mu * m[k] if nesterov else m[k]
      decay = wd * ref[k] if ref[k].ndim >= 2 else 0.0  # matrices only, decoupled
      ref[k] = ref[k] - lr * (step + decay)
  for k in ref:
    np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)


def test_optimizer_state_is_one_buffer_or_none():
  base = {"train.batch_size": 4, "data.seq_len": 32}
  momentum = memory_report(_sgd(**base))
  assert momentum["params_bytes"] <= momentum["opt_state_bytes"] < momentum["params_bytes"] + 64
  plain = memory_report(_sgd(**base, **{"optimizer.sgd.momentum": 0.0}))
  assert plain["opt_state_bytes"] < 64  # the floor: no per-parameter state at all


def test_trains_and_rejects_bad_momentum(tmp_path):
  from configs import llama_tiny_sgd

  config = llama_tiny_sgd.get_config()
  config.train.progress_bar = False
  config.train.steps, config.train.log_every, config.train.eval_every = 40, 5, 0
  config.data.seq_len, config.train.batch_size, config.optimizer.schedule = 32, 8, "constant"
  summary = train(config, str(tmp_path))
  losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").open() if '"loss"' in line]
  assert summary["method"] == "sgd"
  assert losses[-1] < losses[0] - 1.0, losses  # measured: 5.88 -> 4.24 nats
  with pytest.raises(ConfigError) as info:
    train(_sgd(**{"optimizer.sgd.momentum": 1.5}), str(tmp_path / "bad"))
  assert info.value.key == "optimizer.sgd.momentum"
