"""Shared helpers for trainer tests: configs, paths, reading checkpoints back."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from configs import llama_tiny_adamw

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def tiny_config(**overrides):
  """The tiny AdamW config, quiet, with dotted-key overrides: tiny_config(**{'train.steps': 5})."""
  config = llama_tiny_adamw.get_config()
  config.train.progress_bar = False
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def saved_params(workdir: str, step: int | None = None) -> dict:
  """The parameters of a run's checkpoint, as numpy, read independently of the trainer."""
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = manager.latest_step() if step is None else step
  # Onto this process's first device, whatever topology wrote the checkpoint.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  meta = ocp.StandardCheckpointer().metadata(os.path.join(workdir, "checkpoints", str(step), "params"))
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta.item_metadata)
  restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
  return jax.tree.map(np.asarray, restored.params)
