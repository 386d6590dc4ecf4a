"""--fit: the fastest settings under which a run fits its accelerator, checked by the compiler.

`train.py --config C --fit TARGET` searches the settings the command line does not pin, keeping
the method and the tokens per optimizer step, for the cheapest that fits TARGET (a memory target,
or a capacity such as ``24GiB`` for a card that is not here), and compiles the winner to check it.

The memory model, per candidate and program (the train step; the refresh program of split-refresh
methods), in bytes per device:

  peak = arguments + saved + max(gradients, accumulator) + working + calibration

* arguments: the program's inputs at full depth (parameters, optimizer state, batch), exact from the
  abstract state: nothing is compiled for it.
* saved: what the backward pass keeps of the forward (per block under the remat policy, the head's
  and the loss's), read off the jaxpr of the model's VJP at depths 1 and 2 (``saved_bytes``): exact
  for JAX, before the compiler's scheduling.
* gradients: one full set of gradients when the update must wait for all of them (``clip_mode=global``,
  ``nonfinite_guard=step``, the refresh program); else the compiler frees each layer's after its update.
* accumulator: the micro-batch gradient sum (``grad_accum`` > 1), in ``train.accum_dtype``: then the
  full set of gradients an update waiting for all of them reads (the larger of the two counts).
* working: one block's backward working set (its activations as if nothing were recomputed).
* calibration: what the compiler adds beyond these (fused update temporaries, dequantized weights,
  layout), the compiled peak at a small depth less the model's own figure there; a candidate not
  compiled borrows it from the calibrated candidate most like it. A capacity target has none (0).

The cost model, per optimizer step in FLOP-equivalents: the model's matmul and attention FLOPs
(forward, backward: 2x, or 1x for frozen weights), the recomputed forward of `model.remat`, the
head recomputed by `train.loss_chunk_positions`, and each micro-batch's weight reads at the chip's
FLOPs per byte of memory bandwidth (small micro-batches cost more than their FLOPs).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lowrank_jax.nn import int8_weight
from lowrank_jax.train import parallel, targets
from lowrank_jax.train.memory import for_target, run_programs
from lowrank_jax.train.config import RunConfig, resolve, with_overrides
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.model import abstract_model, linear_shapes, model_config, split_model
from lowrank_jax.train.setup import build_setup, vocab_size_of

GiB = 2**30

# Chip figures for the cost model: dense bf16 FLOP/s and memory bandwidth (bytes/s), per device.
CHIP_SPEED = {
    "tpu-v5e": (197e12, 819e9),   # cloud.google.com/tpu/docs/v5e
    "tpu-v5p": (459e12, 2765e9),  # cloud.google.com/tpu/docs/v5p
    "tpu-v6e": (918e12, 1640e9),  # cloud.google.com/tpu/docs/v6e
    "gpu": (989e12, 3350e9),      # an H100 SXM (the capacity targets' stand-in too)
    "cpu": (1e12, 100e9),
}
# ICI / NVLink bytes/s per device for FSDP's weight all-gathers (per micro-batch: forward, backward).
LINK_BYTES_PER_S = 100e9

# Settings the search may change, with whether a change alters the numerics (it is named in the
# output either way). Speed-only settings give the same gradients up to float rounding.
SPEED_KEYS = ("train.grad_accum", "model.remat", "train.loss_chunk_positions", "parallel.fsdp", "model.attention")
NUMERIC_KEYS = ("optimizer.state_bits", "model.weight_bits", "optimizer.clip_mode", "train.nonfinite_guard",
                "train.accum_dtype")
SEARCH_KEYS = SPEED_KEYS + NUMERIC_KEYS
# Settings no check of the trainer's refuses in the search's ranges: set on a resolved run directly.
_SET_DIRECTLY = ("train.grad_accum", "model.remat", "train.loss_chunk_positions")
CHUNKS = (64, 128, 256)  # loss_chunk_positions tried (those dividing the sequence), besides 0
_CAPACITY = re.compile(r"^\s*([\d.]+)\s*(GiB|GB|MiB|MB|TiB|TB)\s*$", re.IGNORECASE)
_UNIT = {"mib": 2**20, "mb": 1e6, "gib": 2**30, "gb": 1e9, "tib": 2**40, "tb": 1e12}


class FitError(ValueError):
  """--fit cannot answer: a bad target, or pinned settings under which nothing can fit."""


def parse_target(target: str) -> tuple[str | None, int | None]:
  """(memory target name, None) or (None, capacity bytes) for `--fit TARGET`; FitError otherwise."""
  if target in targets.TARGETS:
    return target, None
  match = _CAPACITY.match(target)
  if match and float(match.group(1)) > 0:
    return None, int(float(match.group(1)) * _UNIT[match.group(2).lower()])
  raise FitError(f"--fit: expected one of {list(targets.TARGETS)} or a capacity such as 24GiB, got {target!r}")


# --- candidates --------------------------------------------------------------------------------

def search_space(run: RunConfig, pinned: set[str], devices: int, platform: str | None = None) -> dict[str, list]:
  """Key -> the values the search tries (the config's own first); pinned keys keep their value.

  Numeric settings are only tried in the direction that saves memory (8-bit states, int8 weights,
  clipping by the previous norm, the loss guard, bf16 sums), never the other way. On a TPU target
  (`platform` 'tpu') the splash attention kernel is tried too (where the trainer takes it).
  """
  t, m, o = run.train, run.model, run.optimizer
  per_step = t.batch_size
  space: dict[str, list] = {
      "train.grad_accum": [a for a in range(1, per_step + 1) if per_step % a == 0 and (per_step // a) % devices == 0],
      "model.remat": ["none", "matmul_inputs", "block"],
      "parallel.fsdp": [False, True] if devices > 1 and run.parallel.mode == "mesh" else [run.parallel.fsdp],
      "optimizer.state_bits": [b for b in (32, 8) if b <= o.state_bits] if o.name != "sgd" else [o.state_bits],
      "model.weight_bits": [b for b in (16, 8) if b <= m.weight_bits] if not run.method.frozen() else [m.weight_bits],
      "optimizer.clip_mode": [o.clip_mode] + (["previous"] if o.clip_mode == "global" and o.grad_clip else []),
      "train.nonfinite_guard": [t.nonfinite_guard] + (["loss"] if t.nonfinite_guard == "step" else []),
      "train.accum_dtype": [t.accum_dtype] + (["param"] if t.accum_dtype == "float32"
                                              and m.param_dtype == "bfloat16" else []),
      "model.attention": ["splash"] if platform == "tpu" else [],
  }
  if run.task.name == "classification":
    space["train.loss_chunk_positions"] = [t.loss_chunk_positions]
  else:
    seq = run.data.seq_len
    space["train.loss_chunk_positions"] = [0] + [c for c in CHUNKS if c < seq and seq % c == 0]
  for key in SEARCH_KEYS:
    own = _own_value(run, key)
    if key in pinned:
      space[key] = [own]
    else:
      space[key] = [own] + [v for v in space[key] if v != own]
  return space


def _own_value(run: RunConfig, key: str) -> Any:
  section, name = key.split(".")
  return getattr(getattr(run, section), name)


def candidates(space: dict[str, list]) -> list[dict[str, Any]]:
  """Every combination, as overrides of the config (a candidate equal to the config is {})."""
  keys = list(space)
  out = []
  for values in itertools.product(*(space[k] for k in keys)):
    out.append({k: v for k, v in zip(keys, values) if v != space[k][0]})
  return out


# --- the memory model --------------------------------------------------------------------------

def _bytes(avals) -> int:
  return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in avals)


def saved_bytes(run: RunConfig, vocab: int, n_layers: int, micro_batch: int, *, remat: str | None = None) -> int:
  """Bytes the backward pass keeps of one micro-batch's forward pass at depth `n_layers`: the
  residuals of the loss's VJP over the trained parameters that are not its inputs (the weights and
  the batch are held anyway), read from the traced jaxpr (nothing compiled or allocated)."""
  model = dataclasses.replace(run.model, n_layers=n_layers, remat=remat or run.model.remat, base_bits=16,
                              weight_bits=16)
  run = run.replace(model=model)
  split, params, rest = split_model(abstract_model(run, vocab))
  example = run.task.example(run)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct((micro_batch,) + x.shape, x.dtype), example)
  chunk, loss = run.train.loss_chunk_positions, run.task.loss

  def loss_of(p, r, b):
    total, count = loss(split.merge(p, r), b, chunk)
    return total / jnp.maximum(count, 1.0)

  # Differentiated as the step does: the leaves the method freezes get no gradient (their weight
  # gradients' residuals are not kept).
  leaves, treedef = jax.tree.flatten(params)
  view = int8_weight.trainable_view(params, frozen=run.method.frozen())
  trains = [v is not None for v in jax.tree.leaves(view, is_leaf=lambda x: x is None)]
  trained = [x for x, t in zip(leaves, trains) if t]
  fixed = [x for x, t in zip(leaves, trains) if not t]

  def vjp(trained, fixed, r, b):
    def loss_of_trained(t):
      t, f = iter(t), iter(fixed)
      return loss_of(treedef.unflatten([next(t) if on else next(f) for on in trains]), r, b)
    return jax.vjp(loss_of_trained, trained)

  closed, shapes = jax.make_jaxpr(vjp, return_shape=True)(trained, fixed, rest, batch)
  jaxpr = closed.jaxpr
  residuals = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree.leaves(shapes[1])):]
  inputs = set(id(v) for v in jaxpr.invars)
  producer = {id(out): eqn for eqn in jaxpr.eqns for out in eqn.outvars}

  def source(var):
    # A value each layer names for the remat policy (`checkpoint_name`, an identity `reduce_precision`
    # in the jaxpr) is one buffer for the compiler however many layers name it: q, k and v name one input.
    while (eqn := producer.get(id(var))) is not None and eqn.primitive.name in _IDENTITIES and len(eqn.invars) == 1:
      var = eqn.invars[0]
    return var

  seen, avals = set(), []
  for var in residuals:
    if isinstance(var, jax.extend.core.Literal):
      continue
    var = source(var)
    if id(var) in inputs or id(var) in seen:
      continue
    seen.add(id(var))
    avals.append(var.aval)
  return _bytes(avals)


_IDENTITIES = ("reduce_precision", "name", "copy")


@dataclasses.dataclass
class Candidate:
  overrides: dict[str, Any]
  run: RunConfig
  flops: float = 0.0  # per optimizer step
  cost: float = 0.0  # FLOP-equivalents per optimizer step (flops + weight reads + FSDP gathers)
  parts: dict[str, int] = dataclasses.field(default_factory=dict)  # program -> modelled bytes (no calibration)
  args: dict[str, int] = dataclasses.field(default_factory=dict)  # program -> argument bytes at full depth
  calibration: dict[str, float] = dataclasses.field(default_factory=dict)  # program -> bytes (own or borrowed)
  calibrated_from: str | None = None  # 'own', or the overrides of the candidate it borrows from
  calibration_alike: bool = True  # borrowed from a candidate of the same structure (else a rough offset)
  compiled: dict[str, int] | None = None  # program -> compiled peak at full depth (verified)
  compiled_fits: bool | None = None
  predicted_before: int | None = None  # the prediction before the verifying compile

  @property
  def predicted(self) -> int:
    return max(self.args[p] + self.parts[p] + int(self.calibration.get(p, 0.0)) for p in self.parts)

  @property
  def numeric_changes(self) -> int:
    return sum(1 for k in self.overrides if k in NUMERIC_KEYS)

  def label(self) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in self.overrides.items()) or "(the config as it is)"


class Planner:
  """The search for one run and target (see the module docstring); `plan()` answers."""

  def __init__(self, config: ml_collections.ConfigDict, target: str, *, devices: int = 1,
               pinned: set[str] | frozenset = frozenset(), headroom: float = 0.05,
               programs: tuple[str, ...] | None = None, calibration_depth: int = 2, max_compiles: int = 4,
               numeric_penalty: float = 0.05, log: Callable[[str], None] = print):
    self.target_name, capacity = parse_target(target)
    if not 0 <= headroom < 1:
      raise FitError(f"--fit_headroom must be in [0, 1), got {headroom}")
    self.config, self.devices, self.pinned, self.headroom = config, devices, set(pinned), headroom
    self.programs, self.depth, self.max_compiles, self.log = programs, calibration_depth, max_compiles, log
    self.numeric_penalty = numeric_penalty  # ranking: a change of the numerics must save this much cost, each
    if self.target_name:
      targets.prepare_environment(self.target_name)
      self.target = targets.get_target(self.target_name, devices)
      self.capacity = self.target.capacity_bytes
    else:
      self.target, self.capacity = None, capacity
    self.speed = CHIP_SPEED.get(self.target_name or "gpu", CHIP_SPEED["gpu"])
    self.run = self._resolve({})
    self.vocab = vocab_size_of(self.run)
    model = model_config(self.run, self.vocab)
    self.layers, self.d_model = model.n_layers, model.d_model
    self.shapes = linear_shapes(self.run)  # (the search changes no width)
    # The output head's multiply-adds from the model itself: linear_shapes asks with a stand-in vocabulary.
    params = split_model(abstract_model(self.run, self.vocab))[1]
    head = params.get("head", {}).get("kernel") if isinstance(params.get("head"), dict) else None
    self.head_macs = int(np.prod(head.shape)) if head is not None else self.d_model * self.vocab
    self._saved: dict[tuple, tuple[int, int]] = {}
    self._runs: dict[tuple, RunConfig | None] = {}
    self._states: dict[tuple, dict[str, Any]] = {}
    self.compiles, self.start = 0, time.time()
    self.out_of_compiles = False  # (plan: candidates predicted to fit were left unverified)

  @property
  def limit(self) -> int:
    """The bytes a candidate may be predicted to need: the capacity less the headroom."""
    return int(self.capacity * (1 - self.headroom))

  def _resolve(self, overrides: dict[str, Any], n_layers: int = 0) -> RunConfig:
    if n_layers:
      overrides = {**overrides, "model.n_layers": n_layers}
    run = resolve(with_overrides(self.config, overrides), num_devices=self.devices, process_count=1,
                  platform=self.target.platform if self.target else None)
    return for_target(run, self.target)[0] if self.target else run

  # -- the memory model ------------------------------------------------------------------------
  def _saved_at(self, run: RunConfig, n_layers: int, remat: str | None = None) -> int:
    """`saved_bytes` at the run's micro-batch per device: traced at 1 and 2 rows, and taken as linear
    in the rows (each residual is per row, or a weight's cast held once)."""
    micro = max(run.train.micro_batch // self.devices, 1)
    key = (remat or run.model.remat, run.train.loss_chunk_positions, run.attention, n_layers)
    if key not in self._saved:
      one, two = (saved_bytes(run, self.vocab, n_layers, rows, remat=remat) for rows in (1, 2))
      self._saved[key] = (one - (two - one), two - one)
    fixed, per_row = self._saved[key]
    return fixed + micro * per_row

  def state(self, run: RunConfig, n_layers: int = 0) -> dict[str, Any]:
    """Argument bytes per device at depth `n_layers` (0: full), and the trainable float count."""
    key = (run.optimizer.state_bits, run.model.weight_bits, run.parallel.fsdp, n_layers)  # (not the batch's split)
    if key not in self._states:
      if n_layers:
        run = run.replace(model=dataclasses.replace(run.model, n_layers=n_layers))
      setup = build_setup(run, self.vocab, devices=self.target.devices(self.devices) if self.target else None)
      state, tokens = setup.abstract_state, setup.abstract_tokens()  # (tokens: the same bytes at any grad_accum)
      trainable = jax.eval_shape(lambda p: int8_weight.trainable_view(p, frozen=run.method.frozen()), state.params)
      n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
      self._states[key] = {
          "args": parallel.bytes_per_device(state) + parallel.bytes_per_device(tokens),
          "params": parallel.bytes_per_device(state.params),
          "trainable": n // (self.devices if run.parallel.fsdp else 1),
          "refresh": setup.compiled_refresh is not None,
      }
    return self._states[key]

  def model_bytes(self, run: RunConfig, n_layers: int, state: dict[str, Any]) -> dict[str, int]:
    """Program -> the modelled bytes beyond the arguments at depth `n_layers`, before calibration."""
    one = self._saved_at(run, 1)
    saved = one + (n_layers - 1) * (self._saved_at(run, 2) - one)
    working = self._saved_at(run, 2, "none") - self._saved_at(run, 1, "none")
    grad_bytes = state["trainable"] * np.dtype(run.model.param_dtype).itemsize
    waits = (run.optimizer.clip_mode == "global" and run.optimizer.grad_clip > 0) or run.train.nonfinite_guard == "step"
    accum = 0
    if run.train.grad_accum > 1:
      accum = state["trainable"] * (4 if run.train.accum_dtype == "float32" else np.dtype(run.model.param_dtype).itemsize)
    # With accumulation the sum is the full set the update reads (each leaf cast from it frees it), so a
    # clip or guard that waits for every gradient adds nothing to it.
    out = {"step": saved + working + max(accum, grad_bytes if waits else 0)}
    if state["refresh"]:
      out["refresh"] = saved + working + max(accum, grad_bytes)
    return {p: int(v) for p, v in out.items() if self.programs is None or p in self.programs}

  def compile(self, run: RunConfig, n_layers: int = 0) -> dict[str, targets.ProgramMemory]:
    """The candidate's programs compiled for the target at depth `n_layers` (0: full)."""
    if n_layers:
      run = run.replace(model=dataclasses.replace(run.model, n_layers=n_layers))
    setup = build_setup(run, self.vocab, devices=self.target.devices(self.devices))
    programs = run_programs(setup)
    state, tokens = setup.abstract_state, setup.abstract_tokens()
    self.compiles += 1
    return {name: targets.compile_memory(fn.lower(state, tokens), self.target) for name, fn in programs.items()
            if self.programs is None or name in self.programs}

  # -- the cost model --------------------------------------------------------------------------
  def cost(self, run: RunConfig, state: dict[str, Any]) -> tuple[float, float]:
    """(model FLOPs, FLOP-equivalents) per optimizer step and device."""
    d, seq, head_macs = self.d_model, run.task.positions(run), self.head_macs
    block = sum(i * o for name, (i, o) in self.shapes.items() if name != "head")
    fwd_block = 2 * block + 4 * seq * d  # the linears; attention's scores and values over the full square
    fwd = self.layers * fwd_block + 2 * head_macs
    bwd = (1 if run.method.frozen() else 2) * fwd  # frozen weights: the input gradients alone
    recompute = {"none": 0.0, "block": self.layers * fwd_block,
                 "matmul_inputs": self.layers * 4 * seq * d}[run.model.remat]
    if run.train.loss_chunk_positions:
      recompute += 2 * head_macs
    flops = run.train.batch_size * seq / self.devices * (fwd + bwd + recompute)
    peak_flops, bandwidth = self.speed
    passes = 3 + (run.model.remat != "none")  # forward, the two backward products, the recomputed forward
    reads = run.train.grad_accum * passes * state["params"] * peak_flops / bandwidth
    gathers = (run.train.grad_accum * 2 * state["params"] * (self.devices - 1) * peak_flops / LINK_BYTES_PER_S
               if run.parallel.fsdp else 0.0)
    return flops, flops + reads + gathers

  # -- the search --------------------------------------------------------------------------------
  def _candidate_run(self, overrides: dict[str, Any]) -> RunConfig | None:
    """The run with `overrides`; None when the trainer refuses them. Resolved once per combination of
    the settings a check may refuse; the batch's split, remat and the loss chunks are set on it."""
    checked = {k: v for k, v in overrides.items() if k not in _SET_DIRECTLY}
    key = tuple(sorted(checked.items()))
    if key not in self._runs:
      try:
        self._runs[key] = self._resolve(checked)
      except ConfigError:
        self._runs[key] = None
    run = self._runs[key]
    if run is None:
      return None
    train = dataclasses.replace(run.train, **{k.split(".")[1]: v for k, v in overrides.items()
                                              if k.startswith("train.") and k in _SET_DIRECTLY})
    model = dataclasses.replace(run.model, **{k.split(".")[1]: v for k, v in overrides.items()
                                              if k.startswith("model.") and k in _SET_DIRECTLY})
    return run.replace(train=train, model=model)

  def evaluate(self, overrides: dict[str, Any]) -> Candidate | None:
    """The candidate's cost and modelled bytes; None when the trainer refuses its settings."""
    run = self._candidate_run(overrides)
    if run is None:
      return None
    state = self.state(run)
    flops, cost = self.cost(run, state)
    parts = self.model_bytes(run, self.layers, state)
    args = {p: state["args"] for p in parts}
    return Candidate(overrides, run, flops, cost, parts, args)

  def calibrate(self, cand: Candidate) -> None:
    """The compiled peak at the calibration depth less the model's figure there."""
    depth = min(self.depth, self.layers)
    t = time.time()
    compiled = self.compile(cand.run, depth)
    state = self.state(cand.run, depth)
    model = self.model_bytes(cand.run, depth, state)
    cand.calibration = {p: float(compiled[p].peak_bytes - state["args"] - model[p]) for p in model}
    cand.calibrated_from = "own"
    self.log(f"  calibrated at depth {depth} in {time.time() - t:.0f}s: {cand.label()}: "
             + ", ".join(f"{p} {v / GiB:+.2f} GiB" for p, v in cand.calibration.items()))

  def borrow(self, cand: Candidate, calibrated: list[Candidate]) -> None:
    """The calibration of the calibrated candidate sharing the most settings with `cand`."""
    if not calibrated:
      return
    def shared(other):
      keys = set(cand.overrides) | set(other.overrides)
      return (_structure(other) == _structure(cand), sum(cand.overrides.get(k) == other.overrides.get(k) for k in keys))
    best = max(calibrated, key=shared)
    cand.calibration = dict(best.calibration)
    cand.calibrated_from = best.label()
    cand.calibration_alike = _structure(best) == _structure(cand)

  def plan(self) -> dict[str, Any]:
    """Search, calibrate, verify; the answer as a dict (see `format_plan`).

    Rounds: every candidate takes the calibration of the calibrated candidate most like it; the
    cheapest predicted to fit is calibrated if no candidate of its structure is yet (then the
    ranking is redone), else compiled at full depth. A candidate the compiler rejects keeps its
    compiled peak as its calibration, and the next round goes on without it. One compile is kept
    for the verification. When nothing is predicted to fit, the closest candidate is calibrated and
    then compiled, so the gap reported is the compiler's.
    """
    space = search_space(self.run, self.pinned, self.devices, self.target.platform if self.target else None)
    combos = candidates(space)
    self.log(f"--fit {self.target_name or _gib(self.capacity)}: {len(combos)} candidate settings of "
             f"{', '.join(k for k in SEARCH_KEYS if len(space[k]) > 1) or 'nothing (every setting pinned)'}; "
             f"{self.layers} blocks, capacity {_gib(self.capacity)} per device, headroom {self.headroom:.0%}")
    evaluated = [c for c in (self.evaluate(o) for o in combos) if c is not None]
    if not evaluated:
      raise FitError("--fit: the trainer refuses every candidate; run --memory_report to see why")
    base = next((c for c in evaluated if not c.overrides), evaluated[0])
    evaluated.sort(key=lambda c: (round(c.cost / base.cost * (1 + self.numeric_penalty) ** c.numeric_changes, 3),
                                  c.numeric_changes, len(c.overrides)))
    calibrated: list[Candidate] = []
    winner = None
    while True:
      for cand in evaluated:
        if cand.calibrated_from != "own":
          self.borrow(cand, calibrated)
      pick = next((c for c in evaluated if c.predicted <= self.limit and c.compiled_fits is None), None)
      if self.target is None:
        winner = pick
        break
      closest = False
      if pick is None:  # nothing predicted to fit: the closest is calibrated, then compiled, for the gap
        pick = min((c for c in evaluated if c.compiled_fits is None), key=lambda c: c.predicted, default=None)
        closest = True
      if pick is None:
        break
      if self.compiles >= self.max_compiles:
        self.out_of_compiles = not closest
        break
      if (not any(_structure(c) == _structure(pick) for c in calibrated)
          and self.compiles + (1 if closest else 2) <= self.max_compiles):
        self.calibrate(pick)
        calibrated.append(pick)
        continue
      try:  # (the whole trainer's checks, on the settings set directly too)
        pick.run = self._resolve(pick.overrides)
      except ConfigError as e:
        self.log(f"  skipped {pick.label()}: {e}")
        pick.compiled_fits = False
        continue
      t = time.time()
      compiled = self.compile(pick.run)
      predicted = pick.predicted
      pick.compiled = {p: f.peak_bytes for p, f in compiled.items()}
      pick.compiled_fits = all(f.fits and f.peak_bytes <= self.capacity for f in compiled.values())
      self.log(f"  verified in {time.time() - t:.0f}s: {pick.label()}: compiled peak "
               f"{_gib(max(pick.compiled.values()))} against predicted {_gib(predicted)}: "
               f"{'fits' if pick.compiled_fits else 'does NOT fit'}")
      pick.predicted_before = predicted
      if pick.compiled_fits:
        winner = pick
        break
      # the compiler's figure replaces the model's for it, and calibrates the candidates like it
      pick.calibration = {p: float(pick.compiled[p] - pick.args[p] - pick.parts[p]) for p in pick.parts}
      pick.calibrated_from = "own"
      calibrated.append(pick)
      if closest:  # the compiler's own figure for the closest: the gap
        break
    for cand in evaluated:  # (a rejected candidate's compiled peak calibrates the ones like it, for the gap)
      if cand.calibrated_from != "own":
        self.borrow(cand, calibrated)
    return self._answer(evaluated, base, winner)

  def _answer(self, evaluated: list[Candidate], base: Candidate, winner: Candidate | None) -> dict[str, Any]:
    fitting = [c for c in evaluated if c.predicted <= self.limit and c.compiled_fits is not False]
    rejected = [c for c in evaluated if c.compiled_fits is False]
    shown = ([winner] if winner else []) + [c for c in fitting if c is not winner][:3] + rejected[:2]
    if base not in shown:
      shown.append(base)
    answer = {
        "target": self.target_name or "capacity",
        "capacity_bytes": self.capacity,
        "devices": self.devices,
        "headroom": self.headroom,
        "candidates": len(evaluated),
        "compiles": self.compiles,
        "seconds": round(time.time() - self.start, 1),
        "rows": [_row(c, base) for c in shown],
        "fits": winner is not None,
        "verified": bool(winner and winner.compiled_fits),
        "overrides": dict(winner.overrides) if winner else None,
    }
    if winner is None and fitting and self.out_of_compiles:
      answer["unverified"] = f"{len(fitting)} candidates are predicted to fit, but --fit_compiles={self.max_compiles} ran out"
    elif winner is None:
      answer["gap"] = self._gap(evaluated)
    return answer

  def _gap(self, evaluated: list[Candidate]) -> dict[str, Any]:
    """The smallest predicted (or compiled) shortfall, and what would close it."""
    def need(c):
      return max(c.compiled.values()) if c.compiled else c.predicted
    closest = min(evaluated, key=need)
    gap = need(closest) - self.limit
    hints = []
    if self.devices == 1 or not closest.run.parallel.fsdp:
      # FSDP splits the state and data parallelism the batch: each device holds about 1/N of it all
      devices = max(2, math.ceil(need(closest) / self.limit) * self.devices)
      hints.append(f"more devices with FSDP (--memory_devices={devices} --config.parallel.fsdp=True)")
    if hasattr(closest.run.method, "rank"):
      hints.append(f"a lower rank (optimizer.{closest.run.optimizer.name}.rank, now {closest.run.method.rank})")
    if closest.run.train.micro_batch > 1 and "train.grad_accum" in self.pinned:
      hints.append("a smaller micro-batch (unpin train.grad_accum)")
    return {"bytes": int(gap), "closest": closest.label(), "needs_bytes": int(need(closest)), "hints": hints}


def _structure(c: Candidate) -> tuple:
  """What shapes the compiled program beyond the batch's split and the loss chunks: candidates alike
  in these share a calibration."""
  r = c.run
  return (r.model.remat, r.optimizer.state_bits, r.model.weight_bits, r.optimizer.clip_mode, r.train.nonfinite_guard,
          r.train.grad_accum > 1, r.train.accum_dtype, r.parallel.fsdp, r.attention)


def _gib(b: float) -> str:
  return f"{b / GiB:.2f} GiB" if b >= GiB else f"{b / 2**20:.1f} MiB"


def _row(c: Candidate, base: Candidate) -> dict[str, Any]:
  return {"overrides": dict(c.overrides), "predicted_bytes": c.predicted_before or c.predicted,
          "config_as_given": c is base,
          "compiled_bytes": max(c.compiled.values()) if c.compiled else None,
          "relative_cost": round(c.cost / base.cost, 4), "relative_flops": round(c.flops / base.flops, 4),
          "calibrated_from": c.calibrated_from,
          "calibration": "own" if c.calibrated_from == "own" else "none" if c.calibrated_from is None
          else "same structure" if c.calibration_alike else "another structure"}


def format_plan(answer: dict[str, Any], command: str) -> str:
  """The table, the command line to run the winner, and the JSON line."""
  lines = [f"fit on {answer['target']} ({_gib(answer['capacity_bytes'])} per device of {answer['devices']}, "
           f"headroom {answer['headroom']:.0%}): {answer['candidates']} candidates, {answer['compiles']} compiles, "
           f"{answer['seconds']:.0f}s"]
  lines.append(f"  {'predicted':>10} {'compiled':>10} {'cost':>6}  overrides")
  rough = False
  for r in answer["rows"]:
    compiled = _gib(r["compiled_bytes"]) if r["compiled_bytes"] else "-"
    over = " ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(the config as it is)"
    mark = "~" if r.get("calibration") == "another structure" and not r["compiled_bytes"] else ""
    rough = rough or bool(mark)
    lines.append(f"  {mark + _gib(r['predicted_bytes']):>10} {compiled:>10} {r['relative_cost']:>6.3f}  {over}")
  if rough:
    lines.append("  ~ calibrated from a compile of other settings (remat, bits, clipping, accumulation, FSDP or "
                 "attention differ): rough")
  if answer["fits"]:
    flags = " ".join(f"--config.{k}={v}" for k, v in answer["overrides"].items())
    verdict = "verified by the compiler" if answer["verified"] else "predicted (not compiled: a capacity target)"
    lines.append(f"fits, {verdict}; run it with:")
    lines.append(f"  {command} {flags}".rstrip())
  elif "unverified" in answer:
    lines.append(f"not verified: {answer['unverified']}; raise it (each compile of the full model takes minutes)")
  else:
    gap = answer["gap"]
    lines.append(f"nothing fits: the closest ({gap['closest']}) needs {_gib(gap['needs_bytes'])}, "
                 f"{_gib(gap['bytes'])} over; what would close it: {'; '.join(gap['hints']) or 'a larger device'}")
  lines.append(json.dumps({k: answer[k] for k in ("target", "capacity_bytes", "devices", "fits", "verified",
                                                   "overrides", "rows") if k in answer}))
  return "\n".join(lines)


def write_config(path: str, config_file: str, overrides: dict[str, Any], command_overrides: dict[str, Any]) -> None:
  """A config file that loads `config_file` and sets the command line's and the plan's overrides.

  Refuses to overwrite an existing file (nothing a user wrote is replaced)."""
  if os.path.exists(path):
    raise FitError(f"--fit_write: {path} exists; choose a new file")
  source = os.path.abspath(config_file)
  settings = {**command_overrides, **overrides}
  body = "\n".join(f"  config.{k} = {v!r}" for k, v in settings.items())
  text = f'''"""{os.path.basename(config_file)} with the settings `train.py --fit` chose.

  python train.py --config {path}
"""

import importlib.util

_SOURCE = {source!r}


def get_config():
  spec = importlib.util.spec_from_file_location("fit_source", _SOURCE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
{body or "  pass"}
  return config
'''
  with open(path, "x") as f:
    f.write(text)
