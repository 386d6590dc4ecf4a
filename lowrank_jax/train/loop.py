"""The training loop: resume or start, step, log, evaluate, checkpoint, summarise.

Steps are dispatched back to back: the host fetches the next batch while the
device runs the previous step, and metrics stay on the device until the next
`train.log_every` boundary, which is the only place the host waits.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm import tqdm

from lowrank_jax import data as data_lib
from lowrank_jax.train import parallel, warm_start
from lowrank_jax.train.checkpoint import Checkpointer
from lowrank_jax.train.config import RunConfig, default_config, full_rank_layers, resolve
from lowrank_jax.train.errors import ConfigError, StopSignal, TrainingStopped, signal_name
from lowrank_jax.train.input import Input
from lowrank_jax.train.memory_check import check_memory
from lowrank_jax.train.metrics import MetricsWriter
from lowrank_jax.train.setup import (Setup, build_setup, export_adapter, export_model, init_state, model_summary, param_count,
                                     trainable_count)

# Keys whose change makes an existing checkpoint unusable for this run.
_RESUME_KEYS = ("seed", "model", "optimizer.name", "data.seq_len", "data.source", "data.tokenizer")
_RESUME_FREE = ("model.remat",)  # recomputes activations, changes no result: may differ on resume


def _say(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(message, file=sys.stderr)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of every leaf of a nested dict."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
  return out


def _check_resumable(workdir: str, run: RunConfig, has_checkpoint: bool) -> None:
  """Refuse to resume a checkpoint written by a run with another model, method or seed.

  A key the saved config lacks (written before the key existed) counts as its default.
  """
  path = os.path.join(workdir, "config.json")
  if has_checkpoint and os.path.exists(path):
    with open(path) as f:
      saved = _leaves(json.load(f))
    current, default = _leaves(run.to_dict()), _leaves(default_config().to_dict())
    for key in sorted(set(saved) | set(current)):
      if not any(key == k or key.startswith(k + ".") for k in _RESUME_KEYS) or key in _RESUME_FREE:
        continue
      was, now = saved.get(key, default.get(key)), current.get(key)
      if was != now:
        raise ConfigError(key, f"differs from the run that wrote the checkpoints in {workdir} ({was!r} there, "
                          f"{now!r} now); use another --workdir to start a new run")


def _writable_workdir(workdir: str) -> None:
  """Create `workdir` and prove it takes a file, or say in one line why not."""
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise TrainingStopped(f"--workdir {workdir}: cannot write there ({e.strerror or e})", exit_code=2) from None


def _metrics_records(workdir: str) -> tuple[int, int | None]:
  """(records, last step) of the workdir's metrics.jsonl."""
  count, last = 0, None
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        try:
          last, count = json.loads(line).get("step", last), count + 1
        except json.JSONDecodeError:
          continue
  except FileNotFoundError:
    pass
  return count, last


def _refuse_silent_restart(workdir: str, restart: bool) -> None:
  """A workdir with a run's records but no checkpoint to resume: starting over needs --restart,
  and then the old metrics are kept beside the new ones."""
  count, last = _metrics_records(workdir)
  if not count:
    return
  if not restart:
    raise TrainingStopped(f"{workdir} holds metrics.jsonl ({count} records, up to step {last}) but no readable "
                          "checkpoint to resume from; rerun with --restart to start over (the old metrics are "
                          "kept), or use another --workdir", exit_code=2)
  if jax.process_index() == 0:
    kept = os.path.join(workdir, f"metrics.before-restart-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
    os.replace(os.path.join(workdir, "metrics.jsonl"), kept)
    _say(f"--restart: starting over from step 0; the old metrics are in {kept}")


def _finished(workdir: str, run: RunConfig, latest: int) -> dict[str, Any]:
  """A rerun of a finished run changes nothing: it says so and returns the saved summary."""
  _say(f"the run in {workdir} is finished (checkpoint at step {latest}, train.steps={run.train.steps}); "
       "nothing to do: raise train.steps to train on")
  try:
    with open(os.path.join(workdir, "summary.json")) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError):
    saved = {"steps": latest}
  return {**saved, "resumed_from": latest, "already_finished": True}  # (the file is left as it was)


def _diverged(run: RunConfig, progress: "_Progress", last_saved: int | None, directory: str) -> TrainingStopped:
  kept = (f"the last checkpoint, step {last_saved} in {directory}, is kept" if last_saved is not None
          else "no checkpoint was written")
  return TrainingStopped(
      f"training diverged: the loss or gradient norm was not finite for {progress.nonfinite_run} steps in a row "
      f"(up to step {progress.step}; skipped, no update); {kept}; lower optimizer.lr ({run.optimizer.lr:g}) or "
      f"raise train.max_nonfinite_steps ({run.train.max_nonfinite_steps})", exit_code=3)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class _Saver:
  """Writes checkpoints, never one after a non-finite step or of non-finite parameters: such a
  checkpoint would rotate the good ones away (train.keep_checkpoints)."""

  def __init__(self, checkpointer: Checkpointer, inputs: Input, progress: "_Progress"):
    self.checkpointer, self.inputs, self.progress = checkpointer, inputs, progress
    self.last_saved = checkpointer.latest_step()

  def __call__(self, setup: Setup, state, phase: str, at_step: int, position: Any = None) -> None:
    if self.progress.nonfinite_run:
      _say(f"step {at_step}: no checkpoint written (the last step was not finite); step {self.last_saved} is kept")
      return
    if not bool(_all_finite(state.params)):
      raise TrainingStopped(f"step {at_step}: the parameters are not finite; no checkpoint written, step "
                            f"{self.last_saved} in {self.checkpointer.directory} is kept", exit_code=3)
    # Every process reads its own share of the data, so each one's position is kept.
    positions = parallel.gather_json(self.inputs.train_iter.get_state() if position is None else position)
    self.checkpointer.save(state, {"processes": positions, "phase": phase}, at_step)
    self.last_saved = at_step


# What stops a run after the step in flight, with a checkpoint: Ctrl-C, SIGTERM (SLURM at the time
# limit, Kubernetes, `timeout`, cloud preemption) and SIGUSR1 (SLURM's --signal=USR1@SECONDS).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class _StopRequest:
  """The first stop signal: finish the current step, checkpoint, stop. A second: stop at once
  (`StopSignal`).

  On several processes, each process's request is shared at the next log step (the same steps
  on every process, where the host waits anyway), so that every process saves the same step even
  when only one of them got the signal.
  """

  def __init__(self):
    self.signum: int | None = None
    self.at_once: int | None = None  # a second signal
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    for signum in STOP_SIGNALS:
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread: signals are left as they are
        break
    return self

  def _handle(self, signum, frame):
    if self.signum is not None:
      self.at_once = signum  # (raised again by `agreed`: a handler run inside a garbage-collection
      raise StopSignal(signum)  # callback has its exception ignored)
    self.signum = signum
    name = signal_name(signum)
    when = "after this step" if jax.process_count() == 1 else "at the next log step, where all processes agree"
    tqdm.write(f"{name}: saving a checkpoint {when}, then stopping ({name} again to stop at once)", file=sys.stderr)

  def agreed(self, sync_point: bool) -> int | None:
    """The signal to stop on after this step, or None. On one process, the request itself; on
    several, any process's, asked only at a `sync_point` (every process passes the same ones)."""
    if self.at_once is not None:
      raise StopSignal(self.at_once)
    if jax.process_count() == 1:
      return self.signum
    if not sync_point:
      return None
    requested = [s for s in parallel.gather_json(self.signum) if s is not None]
    if requested and self.signum is None:
      self.signum = requested[0]
    return self.signum if requested else None

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    return False


def evaluate(setup: Setup, state, eval_batches: list[dict]) -> dict[str, float]:
  sharding = parallel.eval_sharding(setup.mesh)
  totals = []
  for batch in eval_batches:
    placed = {k: parallel.global_array(v, sharding) for k, v in batch.items()}
    totals.append(setup.eval_step(state.params, state.rest, setup.run.task.batch(placed)))
  sums = [float(np.sum(x)) for x in zip(*jax.device_get(totals))]  # loss, count (, correct: images)
  loss = sums[0] / sums[1]
  if len(sums) == 3:
    return {"eval_loss": loss, "eval_accuracy": sums[2] / sums[1], "eval_examples": int(sums[1])}
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _peak_device_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


@dataclasses.dataclass
class _Progress:
  """What the loop carries from step to step and reports at the end."""
  step: int
  resumed_from: int | None
  start_time: float = dataclasses.field(default_factory=time.perf_counter)
  last_train: dict[str, float] = dataclasses.field(default_factory=dict)
  last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
  throughput: list[float] = dataclasses.field(default_factory=list)
  stopped_early: bool = False
  stop_signal: int | None = None  # what stopped it early (after saving)
  nonfinite_run: int = 0  # steps in a row, up to the last log, whose loss or gradient norm was not finite
  skipped: int = 0  # such steps (skipped: no update) in this launch
  skipped_records: int = 0  # unreadable records skipped (data.on_bad_record=skip) in this launch
  first_step: int = dataclasses.field(init=False)

  def __post_init__(self):
    self.first_step = self.step


def _announce(setup: Setup, inputs: Input, warm_steps: int) -> None:
  run, vocab = setup.run, inputs.tokenizer.vocab_size
  t, opt = run.train, run.optimizer
  _say(f"model   {model_summary(setup)}")
  _say(f"method  {opt.name}, peak lr {opt.lr:g}, {opt.schedule} schedule"
       f"{f'; full-rank warm start for {warm_steps} steps' if warm_steps else ''}")
  _say(f"data    {inputs.description}; {run.task.describe_batch(run, vocab)} per step"
       f"{f' ({t.grad_accum} micro-batches)' if t.grad_accum > 1 else ''}")
  _say(f"devices {jax.device_count()} x {jax.devices()[0].device_kind} over {jax.process_count()} process(es), "
       f"{run.parallel.describe()}")


def _restore(setup: Setup, checkpointer: Checkpointer, inputs: Input, step: int):
  state, data_state, step = checkpointer.restore(setup.abstract_state, step)
  positions = data_state["processes"]
  if len(positions) == jax.process_count():
    inputs.train_iter.set_state(positions[jax.process_index()])
  else:  # the model and optimizer restore exactly; the data order cannot
    _say(f"warning: the checkpoint was written by {len(positions)} process(es), this run has "
         f"{jax.process_count()}: the data iterator starts from the beginning")
  return state, step


def _start(setup: Setup, vocab: int):
  state = init_state(setup, vocab)
  if setup.run.model.init_from:
    _say(f"started from the weights in {setup.run.model.init_from}")
  source = warm_start.plan(setup.run).source
  if source:
    state = warm_start.start_from_full_rank(setup, state, vocab)
    _say(f"started from the full-rank parameters in {source}")
  return state


def _log(progress: _Progress, pending: list[dict], tokens: int, mark: tuple[int, float], writer, bar,
         skipped_records: int) -> None:
  """Fetch the interval's metrics (the one host sync), write them with the throughput and the
  unreadable records skipped (data.on_bad_record=skip) in the interval."""
  fetched = jax.device_get(pending)
  now = time.perf_counter()
  skipped = [bool(m.pop("skipped", 0)) for m in fetched]
  for flag in skipped:
    progress.nonfinite_run = progress.nonfinite_run + 1 if flag else 0
  progress.skipped += sum(skipped)
  kept = [m for m, flag in zip(fetched, skipped) if not flag]  # the skipped steps' NaN stay out of the means
  progress.last_train = {k: float(np.mean([m[k] for m in kept])) if kept else math.nan for k in fetched[0]}
  steps, elapsed = progress.step - mark[0], now - mark[1]
  rate = steps * tokens / elapsed
  if mark[0] > progress.first_step:  # the first interval includes compilation
    progress.throughput.append(rate)
  record = {**progress.last_train, "tokens_per_s": rate, "step_time_s": elapsed / steps}
  if skipped_records > progress.skipped_records:
    record["skipped_records"] = skipped_records - progress.skipped_records
    progress.skipped_records = skipped_records
  if any(skipped):
    record["skipped_steps"] = sum(skipped)
    _say(f"step {progress.step}: {sum(skipped)} of the last {len(skipped)} steps skipped (loss or gradient norm "
         f"not finite: no update); {progress.nonfinite_run} in a row")
  writer.write(progress.step, record)
  bar.set_postfix(loss=f"{progress.last_train['loss']:.3f}", tok_s=f"{rate:,.0f}",
                  ms_step=f"{1e3 * record['step_time_s']:.0f}")


def _evaluate_and_log(setup: Setup, state, inputs: Input, progress: _Progress, writer) -> None:
  progress.last_eval = evaluate(setup, state, inputs.eval_batches)
  writer.write(progress.step, progress.last_eval)
  e = progress.last_eval
  second = (f"accuracy {e['eval_accuracy']:.4f}" if "eval_accuracy" in e else f"ppl {e['eval_ppl']:.2f}")
  _say(f"step {progress.step}: eval loss {e['eval_loss']:.4f}, {second}")


def _completed(step: int, pending: list[dict]) -> int:
  """Steps the device has finished, not merely been handed, asked without waiting: the progress
  bar counts these, so its rate and time estimate are the device's."""
  done = step - len(pending)
  for metrics in pending:
    if not metrics["loss"].is_ready():
      break
    done += 1
  return done


def _refresh_if_due(setup: Setup, state, tokens, refresh_in: int | None):
  """Run the projector refresh program before this step if it is due.

  `refresh_in` counts down on the host (steps before the next refresh, from the state),
  so the device is asked only at the predicted step (a skipped non-finite step does not
  count, hence the re-check). Returns the state and the new count (None: no refresh).
  """
  if refresh_in is None or refresh_in > 0:
    return state, refresh_in
  if setup.steps_to_refresh(state) == 0:
    state = setup.refresh_step(state, tokens)
  return state, setup.steps_to_refresh(state)


def _loop(setup: Setup, state, phase: str, inputs: Input, progress: _Progress, save, writer, stop: _StopRequest):
  """Steps until train.steps or a stop signal; returns the final setup and state."""
  run, t = setup.run, setup.run.train
  warm_steps, vocab = warm_start.plan(run).steps, inputs.tokenizer.vocab_size
  accum, _, seq_len = setup.tokens_shape
  pending: list[dict] = []
  mark = (progress.step, progress.start_time)
  refresh_in = setup.steps_to_refresh(state)
  keep_position = run.data.on_bad_record == "error" and jax.process_count() == 1
  bar = tqdm(total=t.steps, initial=progress.step, unit="step", dynamic_ncols=True, file=sys.stderr,
             disable=not t.progress_bar or jax.process_index() != 0, desc=run.optimizer.name)
  try:  # the bar ends its line whatever stops the loop: a message after it starts on its own
    while progress.step < t.steps:
      if phase == warm_start.WARM_START and progress.step >= warm_steps:
        setup, state = warm_start.leave(setup, state, vocab)
        phase = warm_start.MAIN
        _say(f"step {progress.step}: full-rank warm start done; {run.optimizer.name} from here "
             f"({model_summary(setup)})")
        mark = (mark[0], time.perf_counter())  # keep the recompilation out of the throughput
        refresh_in = setup.steps_to_refresh(state)
      # The data position before this step's batch: what a checkpoint holds if the batch cannot be read.
      position = inputs.train_iter.get_state() if keep_position else None
      try:
        local = next(inputs.train_iter)  # {'tokens'}, or an instruction batch's fields
      except data_lib.DataFileError as e:  # a malformed record met mid-run (data.on_bad_record=error)
        raise _bad_record(e, setup, state, phase, progress, save, position) from None
      local = {k: v.reshape(accum, v.shape[0] // accum, *v.shape[1:]) for k, v in local.items()}
      tokens = run.task.batch(local)
      state, refresh_in = _refresh_if_due(setup, state, tokens, refresh_in)
      state, metrics = setup.train_step(state, tokens)
      refresh_in = None if refresh_in is None else refresh_in - 1
      progress.step += 1
      pending.append(metrics)
      bar.update(_completed(progress.step, pending) - bar.n)
      step = progress.step
      checkpoint_due = bool(t.checkpoint_every) and step % t.checkpoint_every == 0 and step < t.steps
      sync_point = step % t.log_every == 0 or step == t.steps or checkpoint_due
      stopping = stop.agreed(sync_point) if step < t.steps else None  # (the last step saves anyway)
      # A checkpoint is written only after a log: the host must know the steps were finite.
      if sync_point or stopping:
        _log(progress, pending, t.batch_size * seq_len, mark, writer, bar, inputs.skipped_records())
        pending, mark = [], (step, time.perf_counter())
        bar.update(step - bar.n)
        if progress.nonfinite_run >= t.max_nonfinite_steps:
          raise _diverged(run, progress, save.last_saved, save.checkpointer.directory)
      if stopping:
        save(setup, state, phase, step)
        _say(f"stopped at step {step} by {signal_name(stopping)}; checkpoint saved; run the same command to resume")
        progress.stopped_early, progress.stop_signal = True, stopping
        break
      if t.eval_every and step % t.eval_every == 0 and step < t.steps:
        _evaluate_and_log(setup, state, inputs, progress, writer)
        mark = (mark[0], time.perf_counter())  # keep evaluation out of the throughput
      if checkpoint_due:
        save(setup, state, phase, step)
  finally:
    bar.close()
  return setup, state, phase


def _bad_record(error: data_lib.DataFileError, setup: Setup, state, phase: str, progress: _Progress, save,
                position) -> ConfigError:
  """The error for a record that cannot be read, after saving the steps done (one process: on
  several, the others cannot join the save) at the data position before the record's batch."""
  if position is None:
    kept = (f"the last checkpoint, step {save.last_saved}, is kept" if save.last_saved is not None
            else "no checkpoint was written")
  else:
    if save.last_saved != progress.step:
      save(setup, state, phase, progress.step, position=position)
    kept = f"checkpoint saved at step {progress.step}"
  return ConfigError("data.path", f"{error}; {kept}: fix or remove the record, or set data.on_bad_record=skip, "
                     "then run the same command to resume")


def _setup_for(run: RunConfig, phase: str, vocab: int) -> Setup:
  """The setup of `phase`, refused before anything is allocated if its parameters and optimizer
  state cannot fit (`memory_check`)."""
  setup = build_setup(warm_start.run_for(run, phase), vocab)
  check_memory(setup.run, setup.abstract_state)
  return setup


def _restore_newest_readable(run: RunConfig, checkpointer: Checkpointer, inputs: Input, vocab: int):
  """(setup, phase, state, step) from the newest checkpoint that reads, or None if none does.

  A step that fails to read is moved aside (`<step>.corrupt-<time>`, never deleted), and the
  next older one is tried.
  """
  while (latest := checkpointer.latest_step()) is not None:
    try:
      phase = checkpointer.read_json(latest).get("phase", warm_start.MAIN)
    except Exception as e:  # noqa: BLE001 -- what a damaged file raises depends on the damage
      _say(f"warning: {checkpointer.set_aside(latest, e)}")
      continue
    setup = _setup_for(run, phase, vocab)
    try:
      state, step = _restore(setup, checkpointer, inputs, latest)
    except Exception as e:  # noqa: BLE001
      other = checkpointer.other_shapes(latest, setup.abstract_state, e)
      if other:
        raise TrainingStopped(other, exit_code=2) from None
      _say(f"warning: {checkpointer.set_aside(latest, e)}")
      continue
    return setup, phase, state, step
  return None


def train(config: ml_collections.ConfigDict | RunConfig, workdir: str, *, restart: bool = False) -> dict[str, Any]:
  """Train (or resume) the run described by `config` in `workdir`; return the summary.

  Resumes from the newest readable checkpoint; a finished run is left as it is. A workdir with
  metrics but no readable checkpoint is refused unless `restart` (then the old metrics are kept
  beside). Raises `ConfigError` for bad input and `TrainingStopped` (with an exit code) for a
  run that cannot go on: an unwritable workdir, a divergence.
  """
  run = resolve(config, num_devices=jax.device_count(), process_count=jax.process_count())
  _writable_workdir(workdir)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=run.train.keep_checkpoints,
                              background=run.train.async_checkpoints)
  latest = checkpointer.latest_step()
  _check_resumable(workdir, run, latest is not None)
  if latest is not None and latest >= run.train.steps:
    checkpointer.close()
    return _finished(workdir, run, latest)
  inputs = run.task.build_input(run, process_index=jax.process_index(), process_count=jax.process_count())
  vocab = inputs.tokenizer.vocab_size
  restored = _restore_newest_readable(run, checkpointer, inputs, vocab) if latest is not None else None
  if restored is None:
    _refuse_silent_restart(workdir, restart)
    phase = warm_start.first_phase(run)
    setup = _setup_for(run, phase, vocab)
    state, step, latest = _start(setup, vocab), 0, None
  else:
    setup, phase, state, step = restored
    latest = step
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(run.to_json())
  _announce(setup, inputs, warm_start.plan(run).steps)
  if (full_rank := full_rank_layers(run)) is not None:
    _say(f"warning: {full_rank}")
  if latest is not None:
    _say(f"resumed from the checkpoint at step {step} in {checkpointer.directory}")
  progress = _Progress(step, latest)
  writer = MetricsWriter(workdir, resume_step=None if latest is None else step, enabled=jax.process_index() == 0,
                         run=run)
  save = _Saver(checkpointer, inputs, progress)

  try:
    # A stop signal from here to the end saves and stops after the step in flight (the final save
    # and export run as planned when it comes after the last step).
    with _StopRequest() as stop:
      setup, state, phase = _loop(setup, state, phase, inputs, progress, save, writer, stop)
      if not progress.stopped_early and checkpointer.latest_step() != progress.step:
        save(setup, state, phase, progress.step)
      # Also after a stop signal: the summary's evaluation is of the parameters it stopped with.
      progress.last_eval = evaluate(setup, state, inputs.eval_batches)
      if progress.step > progress.first_step:
        writer.write(progress.step, progress.last_eval)
      if not progress.stopped_early and run.model.export_to:  # every process takes part (gathers); process 0 writes
        _say(f"exported the model to {export_model(setup, state)} (Hugging Face format, adapters merged)")
      if not progress.stopped_early and run.model.export_adapter_to:
        _say(f"exported the adapters to {export_adapter(setup, state)} (PEFT format)")
  except (ConfigError, TrainingStopped):
    checkpointer.close()  # the last checkpoint is complete before the error is told
    raise
  except BaseException:
    # A stop signal stops at once: a write in progress is abandoned (a temporary directory, never
    # read back). On several processes another failure is most often a lost peer, whose share of
    # the write never comes.
    if jax.process_count() == 1 and not isinstance(sys.exc_info()[1], StopSignal):
      checkpointer.close()
    raise
  checkpointer.close()
  writer.close()
  return _summarise(setup, inputs, progress, workdir)


def _summarise(setup: Setup, inputs: Input, progress: _Progress, workdir: str) -> dict[str, Any]:
  run = setup.run
  summary = {
      "steps": progress.step,
      "method": run.optimizer.name,
      "model": run.model.name,
      "params": param_count(setup),
      "trainable_params": trainable_count(setup),
      "train_loss": _finite_or_none(progress.last_train.get("loss")),
      **progress.last_eval,
      "entropy_floor": inputs.entropy_floor,
      "tokens_per_s": float(np.mean(progress.throughput)) if progress.throughput else None,
      "wall_time_s": time.perf_counter() - progress.start_time,
      "resumed_from": progress.resumed_from,
      "peak_device_bytes": _peak_device_memory(),
      "stopped_early": progress.stopped_early,
      "stop_signal": signal.Signals(progress.stop_signal).name if progress.stop_signal else None,
      "skipped_steps": progress.skipped,  # not finite: skipped, no update
      "skipped_records": inputs.skipped_records(),  # unreadable (data.on_bad_record=skip)
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    _say(format_summary(summary))
  return summary


def _finite_or_none(x: float | None) -> float | None:
  """summary.json is strict JSON: a loss that was not finite is null."""
  return x if x is not None and math.isfinite(x) else None


def format_summary(s: dict[str, Any]) -> str:
  def num(x, fmt):
    return "-" if x is None else format(x, fmt)

  lines = [
      f"done: {s['model']} with {s['method']}, {s['steps']} steps in {s['wall_time_s']:.1f}s",
      f"  train loss   {num(s['train_loss'], '.4f')}",
      f"  eval loss    {num(s.get('eval_loss'), '.4f')}   (perplexity {num(s.get('eval_ppl'), '.2f')})",
  ]
  if s.get("eval_accuracy") is not None:
    lines[-1] = f"  eval loss    {num(s.get('eval_loss'), '.4f')}"
    lines.append(f"  accuracy     {s['eval_accuracy']:.4f}   ({s['eval_examples']} validation images)")
  if s.get("entropy_floor") is not None:
    lines.append(f"  loss floor   {s['entropy_floor']:.4f}   (entropy rate of the synthetic language)")
  lines.append(f"  tokens/s     {num(s['tokens_per_s'], ',.0f')}")
  if s.get("peak_device_bytes"):
    lines.append(f"  peak memory  {s['peak_device_bytes'] / 2**30:.2f} GiB on device 0")
  return "\n".join(lines)
