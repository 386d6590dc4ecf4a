"""Orbax checkpoints of everything a run needs to continue exactly.

Saved every `train.checkpoint_every` steps, at the end and on Ctrl-C: the
parameters, the other model variables, the optimizer state, the step and RNG,
and the data iterator's position. Orbax writes to a temporary directory and
renames it when complete, so a run killed mid-save (kill -9 included) leaves the
previous checkpoint intact and the next start resumes from it.

Saving is synchronous on purpose: the train step donates its state buffers, and
an asynchronous writer could still be reading a buffer that the next step
overwrites in place.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lowrank_jax.train.step import TrainState


class Checkpointer:
  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, state: TrainState, data_state: dict[str, Any], step: int) -> None:
    items = {
        "params": ocp.args.StandardSave(state.params),
        "opt_state": ocp.args.StandardSave(state.opt_state),
        "progress": ocp.args.StandardSave({"step": state.step, "rng": state.rng}),
        "data": ocp.args.JsonSave(data_state),
    }
    if jax.tree.leaves(state.rest):  # orbax refuses empty trees
      items["rest"] = ocp.args.StandardSave(state.rest)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._manager.wait_until_finished()

  def restore(self, abstract: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any], int]:
    """Restore into the shapes, dtypes and shardings of `abstract` (ShapeDtypeStructs)."""
    step = self.latest_step() if step is None else step
    items = {
        "params": ocp.args.StandardRestore(abstract.params),
        "opt_state": ocp.args.StandardRestore(abstract.opt_state),
        "progress": ocp.args.StandardRestore({"step": abstract.step, "rng": abstract.rng}),
        "data": ocp.args.JsonRestore(),
    }
    has_rest = bool(jax.tree.leaves(abstract.rest))
    if has_rest:
      items["rest"] = ocp.args.StandardRestore(abstract.rest)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    state = TrainState(
        step=restored.progress["step"],
        params=restored.params,
        rest=restored.rest if has_rest else abstract.rest,
        opt_state=restored.opt_state,
        rng=restored.progress["rng"],
    )
    return state, restored.data, step

  def read_json(self, step: int) -> dict[str, Any]:
    """The JSON item (data positions, phase) of a checkpoint, without reading any array."""
    return self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

  def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
    """Only the parameters (e.g. of a full-rank run used as a warm start)."""
    step = self.latest_step() if step is None else step
    return self._manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))).params

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
