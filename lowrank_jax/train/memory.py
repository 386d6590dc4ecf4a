"""The memory report: compile the run's programs on abstract shapes for a target and read their memory.

Nothing is allocated: the model and optimizer state are `jax.ShapeDtypeStruct`s,
so a 7B configuration can be measured on a laptop CPU. The numbers are the
compiler's own accounting of each compiled program for one device: its arguments
(params, optimizer state, batch), outputs, the bytes aliased between the two by
buffer donation, the temporaries (activations saved for backward, gradients, ...)
and the peak. Every program a run executes is compiled: the train step and, for
split-refresh methods (GaLore, OSD, Fira), the projector refresh program; the run's
peak is the larger.

The target (`lowrank_jax.train.targets`) decides what the figures mean:
  cpu      XLA:CPU on this host (the default). Holds bf16 activations as float32 and
           ignores remat, so its temporaries overstate an accelerator's; capacity =
           the host's memory.
  tpu-*    compiled ahead of time for that TPU on this host (libtpu): the chip's own
           memory layout, exact up to the runtime's small fixed reservations; a program
           over the chip's HBM does not compile, and is reported as not fitting with
           the bytes the compiler says it needs.
  gpu      compiled for the local GPU, then one real step (and refresh) is run and the
           allocator's peak (`device.memory_stats()`) is reported beside the analysis.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from lowrank_jax.train import parallel, targets
from lowrank_jax.train.config import RunConfig, resolve
from lowrank_jax.train.setup import Setup, build_setup, init_state, model_summary, vocab_size_of

REPORT_KEYS = ("params_bytes", "opt_state_bytes", "argument_bytes", "temp_bytes", "output_bytes",
               "alias_bytes", "peak_bytes", "target", "capacity_bytes", "fits")


def for_target(run: RunConfig, target: targets.MemoryTarget) -> tuple[RunConfig, str | None]:
  """The run as compiled for `target`, and a note when that differs from how it would run here.

  Off this host's own devices, a `pmap` run is measured as the equivalent `mesh`
  program: both hold the whole state on every device and one share of the batch.
  """
  if target.name in ("cpu", "gpu") or run.parallel.mode != "pmap":
    return run, None
  return run.replace(parallel=dataclasses.replace(run.parallel, mode="mesh")), (
      "parallel.mode pmap measured as the equivalent mesh program (same per-device state and batch share)")


def run_programs(setup: Setup) -> dict[str, Any]:
  """Name -> the compiled-to-be functions the run executes (the refresh program only at refresh steps)."""
  programs = {"step": setup.compiled_step}
  if setup.compiled_refresh is not None:
    programs["refresh"] = setup.compiled_refresh
  return programs


def _measured_peak(setup: Setup, vocab_size: int, programs: dict[str, Any]) -> tuple[int, int]:
  """The GPU allocator's peak after running each program once on a real state (zeros as tokens), and
  its peak before, after the state's initialisation: the allocator's peak is the process's, so where
  the two are equal the initialisation set it, not the programs.

  `programs`: the executables the report compiled and measured.
  """
  state = init_state(setup, vocab_size)
  jax.block_until_ready(state)
  init_peak = _allocator_peak(setup)
  tokens = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding)
                        if s.sharding is not None else np.zeros(s.shape, s.dtype), setup.abstract_tokens())
  for name in ("refresh", "step"):  # the loop's order at a refresh step
    if name in programs:
      out = programs[name](state, tokens)
      state = out if name == "refresh" else out[0]
  jax.block_until_ready(state)
  return _allocator_peak(setup), init_peak


def _allocator_peak(setup: Setup) -> int:
  """The largest device's allocator peak so far (the process's: it cannot be reset)."""
  stats = [d.memory_stats() or {} for d in setup.mesh.devices.flat]
  return max(int(s.get("peak_bytes_in_use", 0)) for s in stats)


def memory_report(config: ml_collections.ConfigDict | RunConfig, target: str = "cpu",
                  num_devices: int | None = None, only: tuple[str, ...] | None = None,
                  log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
  """Per-device bytes of the run's compiled programs on `target` (keys: REPORT_KEYS, and more).

  Args:
    config: the run.
    target: one of `targets.TARGETS`.
    num_devices: devices the run is spread over; default: this host's device count.
    only: which of the run's programs to compile ("step", "refresh"); default: all.
      (A refresh program's SVD compiles for many minutes on the TPU targets.)
    log: progress lines (each program's compile time, the real step's), as they happen.

  The top-level figures are the train step's, `peak_bytes` the largest of every
  program's peak; `programs` holds each program's own figures.
  """
  targets.prepare_environment(target)
  num_devices = num_devices or jax.device_count()
  device_target = targets.get_target(target, num_devices)
  run, note = for_target(resolve(config, num_devices=num_devices, process_count=1,
                                 platform=device_target.platform), device_target)
  vocab = vocab_size_of(run)
  setup = build_setup(run, vocab, devices=device_target.devices(num_devices))
  state, tokens = setup.abstract_state, setup.abstract_tokens()
  programs = {k: v for k, v in run_programs(setup).items() if only is None or k in only}
  figures, executables = {}, {}
  for name, fn in programs.items():
    figures[name], executables[name] = targets.compile_program(fn.lower(state, tokens), device_target)
    log(f"memory report: {name} program compiled for {device_target.name} in {figures[name].compile_s:.1f} s")
  step = figures["step"]
  peak = max(f.peak_bytes for f in figures.values())
  report = {
      "model": model_summary(setup),
      "method": run.optimizer.name,
      "devices": num_devices,
      "parallel": run.parallel.describe(),
      "batch_tokens": list(setup.tokens_shape),
      "params_bytes": parallel.bytes_per_device(state.params),
      "opt_state_bytes": parallel.bytes_per_device(state.opt_state),
      "argument_bytes": step.argument_bytes,
      "temp_bytes": step.temp_bytes,
      "output_bytes": step.output_bytes,
      "alias_bytes": step.alias_bytes,
      "peak_bytes": peak,
      "target": device_target.name,
      "target_description": device_target.description,
      "capacity_bytes": device_target.capacity_bytes,
      "documented_bytes": device_target.documented_bytes,
      "fits": all(f.fits for f in figures.values()),
      "exact": device_target.exact,
      "programs": {name: dataclasses.asdict(f) for name, f in figures.items()},
      "note": note,
  }
  if device_target.name == "gpu" and report["fits"]:
    try:
      start = time.perf_counter()
      report["measured_peak_bytes"], report["measured_init_peak_bytes"] = _measured_peak(setup, vocab, executables)
      report["measured_s"] = time.perf_counter() - start
      log(f"memory report: one real step{' and refresh' if 'refresh' in programs else ''} ran in "
          f"{report['measured_s']:.1f} s")
    except jax.errors.JaxRuntimeError as e:  # the allocator ran out: the run does not fit
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      report["fits"], report["note"] = False, f"a real step ran out of memory: {str(e).splitlines()[0][:200]}"
  return report


def _mib(value: int) -> str:
  return f"{value / 2**20:>12,.1f} MiB  {value:>16,d} B"


def format_report(report: dict[str, Any]) -> str:
  rows = [
      ("parameters", report["params_bytes"]),
      ("optimizer state", report["opt_state_bytes"]),
      ("step arguments", report["argument_bytes"]),
      ("step temporaries", report["temp_bytes"]),
      ("step outputs", report["output_bytes"]),
      ("aliased (donated)", report["alias_bytes"]),
  ]
  a, m, t = report["batch_tokens"]
  lines = [
      f"memory report: {report['model']}",
      f"  method {report['method']}; per-step batch {a} x {m} x {t} tokens",
      f"  per device of {report['devices']} ({report['parallel']})",
      f"  target {report['target']}: {report['target_description']}"
      + ("" if report["exact"] else " (an estimate for accelerators: no remat, bf16 held as float32)"),
  ]
  if report.get("note"):
    lines.append(f"  note: {report['note']}")
  for name, value in rows:
    lines.append(f"  {name:<18} {_mib(value)}")
  for name, program in report["programs"].items():
    if program["error"]:
      lines.append(f"  {name + ' peak':<18} {_mib(program['peak_bytes'])}  needed: does not compile ({program['error']})")
    else:
      lines.append(f"  {name + ' peak':<18} {_mib(program['peak_bytes'])}  (compiled in {program['compile_s']:.1f} s)")
  if "measured_peak_bytes" in report:
    set_by_init = 0 < report["measured_peak_bytes"] == report["measured_init_peak_bytes"]
    lines.append(f"  {'measured peak':<18} {_mib(report['measured_peak_bytes'])}  (allocator, after a real step"
                 + ("; set by the state's initialisation, not the step)" if set_by_init else ")"))
  capacity, peak = report["capacity_bytes"], report["peak_bytes"]
  documented = f"; documented {report['documented_bytes'] / 2**30:.0f} GiB" if report.get("documented_bytes") else ""
  lines.append(f"  {'capacity':<18} {_mib(capacity)}  (per device{documented})")
  margin = capacity - peak
  verdict = "fits" if report["fits"] else "does NOT fit"
  lines.append(f"  {verdict}: margin {margin / 2**20:,.1f} MiB ({100 * margin / capacity:+.1f}% of capacity)")
  lines.append(json.dumps({k: report[k] for k in REPORT_KEYS}))
  return "\n".join(lines)
