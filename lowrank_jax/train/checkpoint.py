"""Orbax checkpoints of everything a run needs to continue exactly.

Saved every `train.checkpoint_every` steps, at the end and on Ctrl-C: the
parameters, the other model variables, the optimizer state, the step and RNG,
and the data iterator's position. Orbax writes to a temporary directory and
renames it when complete, so a run killed mid-save (kill -9 included) leaves the
previous checkpoint intact and the next start resumes from it.

With `background=True` (`train.async_checkpoints`) a save returns
once the arrays are copied to host memory, and the files are written while
training goes on; the next save, or `close`, waits for that write first. The
train step donates its state buffers, but a buffer the writer still holds is
not donated (XLA allocates a fresh one; on CPU the host "copy" is a view of the
buffer), so the step never overwrites what is being written. A write that
fails is reported at that next wait, naming its step, but only after the
tracebacks of its file writes that complete after it failed (printed by the
storage library itself, through no hook Python offers; after a foreground failure
they are waited for with stderr dropped): so the default is to write in the
foreground, where a failure is the one line.

A step that cannot be read back (a truncated or zeroed file) is moved aside to
`<step>.corrupt-<time>`, never deleted, and the run resumes from the step before
(`set_aside`, used by the loop). A save that fails (disk full, directory gone) leaves
no partial step behind and says so in one line.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import sys
import tempfile
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from lowrank_jax.train.errors import TrainingStopped
from lowrank_jax.train.step import TrainState


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def _quiet_stderr():
  """Hold back what is written to stderr (file descriptor 2, threads included) while saving; pass it
  on if the save succeeds (a warning is not lost), drop it if it fails (the caller says why)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as held:
    os.dup2(held.fileno(), 2)
    ok = False
    try:
      yield
      ok = True
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if ok:
        held.seek(0)
        text = held.read().decode(errors="replace")
        if text:
          sys.stderr.write(text)


@contextlib.contextmanager
def _dropped_stderr():
  """Drop what is written to stderr (file descriptor 2, threads included) meanwhile."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


# After a write fails, its other file operations still complete and call back into the asyncio
# loop orbax has closed; the storage library prints each such failure's traceback itself (no
# Python hook reaches it). They come within milliseconds; this long they are waited for, unheard.
_SETTLE_S = 1.0


class _OrbaxThreadFailures(logging.Filter):
  """Drops orbax's background-thread reports of a failed read or write (a page of traceback each,
  logged late from its threads): the trainer says it once, naming the step."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.pathname.endswith(os.path.join("futures", "future.py")) and "orbax" in record.pathname)


def _mute_orbax_thread_failures() -> None:
  logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxThreadFailures) for f in logger.filters):
    logger.addFilter(_OrbaxThreadFailures())


def _reason(error: BaseException) -> str:
  """The operating system's words for a failed write when there are some ("No space left on device")."""
  text = str(error)
  for reason in ("No space left on device", "Permission denied", "Read-only file system", "Disk quota exceeded"):
    if reason in text:
      return reason
  return _first_line(error)


def _first_line(error: BaseException) -> str:
  text = str(error).strip().split(" See full TensorStore details")[0]
  return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


class Checkpointer:
  def __init__(self, directory: str, *, keep: int, background: bool = False):
    self.directory = os.path.abspath(directory)
    self._background = background
    self._writing: int | None = None  # the step being written in the background
    if background:  # a failed write is said once, naming its step, when it is waited for
      _mute_orbax_thread_failures()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=background),
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
    self.wait()
    try:
      with _quiet_stderr():  # orbax's writer threads report a failure many times over, with tracebacks
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        if not self._background:
          self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001 -- disk full, no permission, directory removed: orbax wraps them
      self._failed(step, e)
    self._writing = step if self._background else None

  def wait(self) -> None:
    """Wait for the background write, if one is running; its failure is raised here."""
    if self._writing is None:
      return
    step, self._writing = self._writing, None
    try:
      with _quiet_stderr():
        self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      self._failed(step, e)

  def _failed(self, step: int, error: BaseException) -> None:
    _mute_orbax_thread_failures()
    with _dropped_stderr():
      time.sleep(_SETTLE_S)
      self._remove_partial(step)
    previous = [s for s in self._manager.all_steps() if s != step]
    kept = f"step {max(previous)} is intact" if previous else "no earlier checkpoint"
    raise TrainingStopped(f"cannot write the checkpoint of step {step} in {self.directory} ({_reason(error)}); "
                          f"nothing partial left, {kept}", exit_code=1) from None

  def _remove_partial(self, step: int) -> None:
    """Delete what a failed save of `step` left: its temporary directory (or an incomplete step)."""
    if jax.process_index() == 0:
      for path in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")) + \
          [os.path.join(self.directory, str(step))]:
        shutil.rmtree(path, ignore_errors=True)
    _sync("checkpoint_remove_partial")
    self._manager.reload()

  def other_shapes(self, step: int, abstract: TrainState, error: BaseException | None = None) -> str | None:
    """How the arrays stored at `step` differ from `abstract`'s (their count or shapes), or None
    when they do not (or cannot be read): a restore that failed on a changed setting (a rank,
    the layers adapted, clipping on or off) is the config's doing, not damage, and must not move
    a good checkpoint aside."""
    for item in ("params", "opt_state"):
      try:
        meta = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), item)).item_metadata
        stored = sorted(tuple(m.shape) for m in jax.tree.leaves(meta))
      except Exception:  # noqa: BLE001 -- unreadable metadata: damage
        return None
      wanted = sorted(tuple(x.shape) for x in jax.tree.leaves(getattr(abstract, item)))
      if stored != wanted:
        what = "parameters" if item == "params" else "optimizer state"
        return (f"the checkpoint at step {step} holds {len(stored)} {what} arrays, this config builds {len(wanted)} "
                f"(or of other shapes): a setting that changes them (a rank, the layers adapted, "
                f"optimizer.grad_clip on or off) differs from the run that wrote it; use another --workdir")
    if error is not None and "tree structures do not match" in str(error):  # orbax: the same leaves, nested otherwise
      return (f"the checkpoint at step {step} holds a train state laid out otherwise than this config's: a setting "
              "that changes it (optimizer.grad_clip on or off, the method's options) differs from the run that "
              "wrote it; use another --workdir")
    return None

  def set_aside(self, step: int, error: BaseException) -> str:
    """Move the unreadable `step` to `<step>.corrupt-<time>` (never deleted); say so in one line."""
    _mute_orbax_thread_failures()
    source = os.path.join(self.directory, str(step))
    target = f"{source}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      os.replace(source, target)
    _sync("checkpoint_set_aside")
    self._manager.reload()
    return f"checkpoint step {step} cannot be read ({_first_line(error)}); moved aside to {target}"

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
    with _quiet_stderr():  # a damaged step makes orbax log pages of tracebacks; the loop says it in one line
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
    with _quiet_stderr():
      return self._manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

  def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
    """Only the parameters (e.g. of a full-rank run used as a warm start)."""
    step = self.latest_step() if step is None else step
    return self._manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))).params

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()
