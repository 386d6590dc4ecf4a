"""The training loop: resume or start, step, log, evaluate, checkpoint, summarise.

Steps are dispatched back to back: the host fetches the next batch while the
device runs the previous step, and metrics stay on the device until the next
`train.log_every` boundary, which is the only place the host waits.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from lowrank_jax.train import parallel
from lowrank_jax.train.checkpoint import Checkpointer
from lowrank_jax.train.config import validate
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.input import build_input
from lowrank_jax.train.metrics import MetricsWriter
from lowrank_jax.train.methods import get_method
from lowrank_jax.train.model import transfer_params
from lowrank_jax.train.optimizer import MAIN, WARM_START
from lowrank_jax.train.setup import (Setup, assemble_state, build_setup, init_state, model_summary, param_count,
                                     trainable_count)

# Keys whose change makes an existing checkpoint unusable for this run.
_RESUME_KEYS = ("model", "optimizer.name", "data.seq_len", "data.source", "data.tokenizer")


def _say(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(message, file=sys.stderr)


def _select(config_dict: dict, dotted: str) -> Any:
  node: Any = config_dict
  for part in dotted.split("."):
    node = node.get(part) if isinstance(node, dict) else None
  return node


def _check_resumable(workdir: str, config: ml_collections.ConfigDict, has_checkpoint: bool) -> None:
  """Refuse to resume a checkpoint written by a run with another model or method."""
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json())
  if has_checkpoint and os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    for key in _RESUME_KEYS:
      if _select(saved, key) != _select(current, key):
        raise ConfigError(key, f"differs from the run that wrote the checkpoints in {workdir} "
                          f"({_select(saved, key)!r} there, {_select(current, key)!r} now); "
                          "use another --workdir to start a new run")
  if jax.process_index() == 0:
    with open(path, "w") as f:
      f.write(config.to_json(indent=2))


class _StopRequest:
  """First Ctrl-C: finish the current step, checkpoint, stop. Second: stop at once."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGINT, self._handle)
    except ValueError:  # not the main thread
      self._previous = None
    return self

  def _handle(self, signum, frame):
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    _say("interrupt: saving a checkpoint after this step (Ctrl-C again to stop at once)")

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
    return False


def evaluate(setup: Setup, state, eval_batches: list[dict]) -> dict[str, float]:
  sharding = parallel.eval_sharding(setup.mesh)
  totals = []
  for batch in eval_batches:
    tokens = parallel.global_array(batch["tokens"], sharding)
    totals.append(setup.eval_step(state.params, state.rest, tokens))
  loss_sum, count = (float(np.sum(x)) for x in zip(*jax.device_get(totals)))
  loss = loss_sum / count
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


def _warm_start_source(config: ml_collections.ConfigDict) -> str:
  relora = config.optimizer.get("relora")
  return relora.warm_start_from if relora is not None and config.optimizer.name == "relora" else ""


def _leave_warm_start(warm: Setup, state, vocab: int):
  """Switch from the full-rank phase to the method: same weights, adapters added, new optimizer."""
  setup = build_setup(warm.config, vocab, MAIN)
  fresh = init_state(setup, vocab)
  params = transfer_params(fresh.params, state.params)
  return setup, assemble_state(setup, params, fresh.rest, step=state.step, rng=state.rng)


def _start_from_full_rank(setup: Setup, state, source: str, vocab: int):
  """Begin from the parameters of a full-rank run (its latest checkpoint)."""
  directory = os.path.join(source, "checkpoints") if os.path.isdir(os.path.join(source, "checkpoints")) else source
  source_ckpt = Checkpointer(directory, keep=1000)
  if source_ckpt.latest_step() is None:
    raise ConfigError("optimizer.relora.warm_start_from", f"no checkpoint in {directory}")
  dense = build_setup(setup.config, vocab, WARM_START)
  try:
    loaded = source_ckpt.restore_params(dense.abstract_state.params)
  except (ValueError, KeyError) as e:
    raise ConfigError("optimizer.relora.warm_start_from",
                      f"the checkpoint in {directory} does not hold this model's full-rank parameters: {e}") from None
  params = transfer_params(state.params, loaded)
  return assemble_state(setup, params, state.rest, step=0, rng=state.rng)


def _peak_device_memory() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("peak_bytes_in_use")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (or resume) the run described by `config` in `workdir`; return the summary."""
  validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  inputs = build_input(config, process_index=jax.process_index(), process_count=jax.process_count())
  vocab = inputs.tokenizer.vocab_size
  tcfg = config.train
  total_steps = tcfg.steps
  method = get_method(config.optimizer.name)
  warm_steps = method.warm_start_steps(config) if method.warm_start_steps else 0
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tcfg.keep_checkpoints)
  latest = checkpointer.latest_step()
  _check_resumable(workdir, config, latest is not None)
  if latest is not None:
    phase = checkpointer.read_json(latest).get("phase", MAIN)
  else:
    phase = WARM_START if warm_steps > 0 else MAIN
  setup = build_setup(config, vocab, phase)

  _say(f"model   {model_summary(setup)}")
  _say(f"method  {config.optimizer.name}, peak lr {config.optimizer.lr:g}, {config.optimizer.schedule} schedule"
       f"{f'; full-rank warm start for {warm_steps} steps' if warm_steps else ''}")
  _say(f"data    {inputs.description}; {tcfg.batch_size} x {config.data.seq_len} tokens per step"
       f"{f' ({tcfg.grad_accum} micro-batches)' if tcfg.grad_accum > 1 else ''}; vocab {vocab}")
  _say(f"devices {jax.device_count()} x {jax.devices()[0].device_kind} over {jax.process_count()} process(es), "
       f"{parallel.describe(config.parallel)}")
  if latest is not None:
    state, data_state, step = checkpointer.restore(setup.abstract_state)
    positions = data_state["processes"]
    if len(positions) == jax.process_count():
      inputs.train_iter.set_state(positions[jax.process_index()])
    else:  # the model and optimizer restore exactly; the data order cannot
      _say(f"warning: the checkpoint was written by {len(positions)} process(es), this run has "
           f"{jax.process_count()}: the data iterator starts from the beginning")
    _say(f"resumed from the checkpoint at step {step} in {checkpointer.directory}")
  else:
    state, step = init_state(setup, vocab), 0
    warm_from = _warm_start_source(config)
    if warm_from:
      state = _start_from_full_rank(setup, state, warm_from, vocab)
      _say(f"started from the full-rank parameters in {warm_from}")
  writer = MetricsWriter(workdir, resume_step=step if latest is not None else None,
                         enabled=jax.process_index() == 0)

  def save(at_step: int) -> None:
    # Every process reads its own share of the data, so each one's position is kept.
    positions = parallel.gather_json(inputs.train_iter.get_state())
    checkpointer.save(state, {"processes": positions, "phase": setup.phase}, at_step)

  accum, _, seq_len = setup.tokens_shape
  tokens_per_step = tcfg.batch_size * seq_len
  pending: list[dict] = []
  last_train: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  throughput: list[float] = []
  start_step, start_time = step, time.perf_counter()
  mark_step, mark_time = step, start_time
  bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
             disable=not tcfg.progress_bar or jax.process_index() != 0, desc=config.optimizer.name)
  stopped_early = False
  with _StopRequest() as stop:
    while step < total_steps:
      if setup.phase == WARM_START and step >= warm_steps:
        setup, state = _leave_warm_start(setup, state, vocab)
        _say(f"step {step}: full-rank warm start done; {config.optimizer.name} from here "
             f"({model_summary(setup)})")
        mark_time = time.perf_counter()  # keep the recompilation out of the throughput
      local = next(inputs.train_iter)["tokens"]
      local = local.reshape(accum, local.shape[0] // accum, seq_len)
      state, metrics = setup.train_step(state, local)
      step += 1
      pending.append(metrics)
      bar.update(1)
      if step % tcfg.log_every == 0 or step == total_steps or stop.requested:
        fetched = jax.device_get(pending)  # the one host sync per log interval
        now = time.perf_counter()
        last_train = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        elapsed = now - mark_time
        rate = (step - mark_step) * tokens_per_step / elapsed
        if mark_step > start_step:  # the first interval includes compilation
          throughput.append(rate)
        record = {**last_train, "tokens_per_s": rate, "step_time_s": elapsed / (step - mark_step)}
        writer.write(step, record)
        bar.set_postfix(loss=f"{last_train['loss']:.3f}", tok_s=f"{rate:,.0f}",
                        ms_step=f"{1e3 * record['step_time_s']:.0f}")
        pending, mark_step, mark_time = [], step, now
      if tcfg.eval_every and step % tcfg.eval_every == 0 and step < total_steps:
        last_eval = evaluate(setup, state, inputs.eval_batches)
        writer.write(step, last_eval)
        _say(f"step {step}: eval loss {last_eval['eval_loss']:.4f}, ppl {last_eval['eval_ppl']:.2f}")
        mark_time = time.perf_counter()  # keep evaluation out of the throughput
      if stop.requested:
        save(step)
        _say(f"stopped at step {step}; checkpoint saved; run the same command to resume")
        stopped_early = True
        break
      if tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0 and step < total_steps:
        save(step)
  bar.close()

  if not stopped_early:
    last_eval = evaluate(setup, state, inputs.eval_batches)
    if step > start_step:
      writer.write(step, last_eval)
    if checkpointer.latest_step() != step:
      save(step)
  checkpointer.close()
  writer.close()

  summary = {
      "steps": step,
      "method": config.optimizer.name,
      "model": f"{config.model.family}-{config.model.size}",
      "params": param_count(setup),
      "trainable_params": trainable_count(setup),
      "train_loss": last_train.get("loss"),
      **last_eval,
      "entropy_floor": inputs.entropy_floor,
      "tokens_per_s": float(np.mean(throughput)) if throughput else None,
      "wall_time_s": time.perf_counter() - start_time,
      "resumed_from": latest,
      "peak_device_bytes": _peak_device_memory(),
      "stopped_early": stopped_early,
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    _say(format_summary(summary))
  return summary


def format_summary(s: dict[str, Any]) -> str:
  def num(x, fmt):
    return "-" if x is None else format(x, fmt)

  lines = [
      f"done: {s['model']} with {s['method']}, {s['steps']} steps in {s['wall_time_s']:.1f}s",
      f"  train loss   {num(s['train_loss'], '.4f')}",
      f"  eval loss    {num(s.get('eval_loss'), '.4f')}   (perplexity {num(s.get('eval_ppl'), '.2f')})",
  ]
  if s.get("entropy_floor") is not None:
    lines.append(f"  loss floor   {s['entropy_floor']:.4f}   (entropy rate of the synthetic language)")
  lines.append(f"  tokens/s     {num(s['tokens_per_s'], ',.0f')}")
  if s.get("peak_device_bytes"):
    lines.append(f"  peak memory  {s['peak_device_bytes'] / 2**30:.2f} GiB on device 0")
  return "\n".join(lines)
