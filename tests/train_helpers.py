"""Shared helpers for trainer tests: configs, paths, reading checkpoints back."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import llama_tiny_adamw
from lowrank_jax.train.config import with_overrides

REPO = Path(__file__).resolve().parents[1]


# The TPU targets compile ahead of time through libtpu, an optional extra that CI does not install.
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='the TPU target needs libtpu: pip install -e ".[aot]"')


def tiny_config(**overrides):
  """The tiny AdamW config, quiet, with dotted-key overrides: tiny_config(**{'train.steps': 5})."""
  return with_overrides(llama_tiny_adamw.get_config(), {"train.progress_bar": False, **overrides})


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


def optimizer_updates(config, devices: int | None = None, steps: int = 3) -> dict[str, np.ndarray]:
  """The run's optimizer alone, as the trainer builds it (clipping, the method, 8-bit states),
  with the parameters and optimizer state placed as the trainer places them (`parallel.fsdp`)
  over the first `devices` devices (all by default), after `steps` updates on fixed gradients,
  with the projector refreshes run when due as the trainer runs them:
  {'params' or 'opt_state' + leaf path: array}.

  The gradients are the same for any device count (drawn on the host; small, so the clipping
  does not act), so layouts can be compared update for update without the train step's
  gradient all-reduce, whose summation order depends on the device count.
  """
  import optax

  from lowrank_jax import optim
  from lowrank_jax.train import parallel
  from lowrank_jax.train.config import resolve
  from lowrank_jax.train.model import build_model, split_model
  from lowrank_jax.train.optimizer import build_optimizer
  from lowrank_jax.train.setup import vocab_size_of

  mesh = parallel.make_mesh(devices=jax.devices()[:devices or jax.device_count()])
  run = resolve(config, num_devices=mesh.devices.size)
  _, params, _ = split_model(build_model(run, vocab_size_of(run), seed=run.seed))
  tx, _ = build_optimizer(run)
  shardings = lambda tree: parallel.state_shardings(mesh, tree, fsdp=run.parallel.fsdp)  # noqa: E731
  params_sh = shardings(params)
  state_sh = shardings(jax.eval_shape(tx.init, params))
  params = jax.device_put(params, params_sh)
  opt_state = jax.jit(tx.init, out_shardings=state_sh)(params)

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update = jax.jit(update, out_shardings=(params_sh, state_sh))
  refresh = jax.jit(lambda grads, state, params: optim.refresh_projectors(tx, grads, state, params),
                    out_shardings=state_sh)
  for step in range(steps):
    rng = np.random.default_rng(step)
    grads = jax.device_put(jax.tree.map(lambda p: (1e-3 * rng.standard_normal(p.shape)).astype(p.dtype), params),
                           params_sh)
    if optim.uses_split_refresh(opt_state) and int(optim.steps_to_refresh(opt_state)) == 0:
      opt_state = refresh(grads, opt_state, params)
    params, opt_state = update(params, opt_state, grads)
  flat = jax.tree_util.tree_flatten_with_path({"params": params, "opt_state": opt_state})[0]
  return {jax.tree_util.keystr(path): np.asarray(x) for path, x in flat}
