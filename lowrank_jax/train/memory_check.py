"""Refuse, before anything is allocated, a run whose parameters and optimizer state cannot fit.

The figure is a floor: one device's parameters, other model state and optimizer state,
counted on the abstract state (`jax.eval_shape`, with its shardings, so FSDP and heads
spread over devices divide it) by the byte counter of the memory report. It leaves out
the step's gradients, activations and the runtime, so `MARGIN` of the capacity is kept for
them: a refused run cannot fit; one that passes may still not (`--memory_report` compiles
the whole step). Costs no compilation: a few microseconds on a small config.

Capacity, of the memory the run will use:
  CPU          the host memory available now (MemAvailable in /proc/meminfo), shared by
               every local device, so the floor counts each device's share;
  accelerator  the device's own limit (`memory_stats()['bytes_limit']`, the allocator's,
               as `--memory_target=gpu` reads it); a device that reports none is not checked.
`train.check_memory=False` skips the check.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from lowrank_jax.train import parallel
from lowrank_jax.train.config import RunConfig, rank_sides
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.targets import device_bytes_limit

MARGIN = 0.10  # of the capacity, kept for what the floor leaves out (gradients, activations, the runtime)
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Capacity:
  """The memory a run's state lives in."""
  bytes: int
  description: str  # for the message: where the figure comes from
  devices: int  # local devices whose state shares it (the CPU's host devices; 1 on an accelerator)
  host: bool  # host memory (the CPU backend), else one accelerator's own


def host_available_bytes() -> int:
  """Host memory available to a new process now: MemAvailable (Linux), else the free pages."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def capacity() -> Capacity | None:
  """The capacity of the memory this process's run lives in (None: the device reports none)."""
  devices = jax.local_devices()
  if devices[0].platform == "cpu":
    return Capacity(host_available_bytes(), "host memory available (MemAvailable)", len(devices), True)
  limit = device_bytes_limit(devices[0])
  if not limit:
    return None
  return Capacity(limit, f"{devices[0].device_kind} memory per device (bytes_limit)", 1, False)


def state_bytes(abstract_state) -> tuple[int, int]:
  """(parameters and other model state, optimizer state): bytes on one device."""
  model = parallel.bytes_per_device(abstract_state.params) + parallel.bytes_per_device(abstract_state.rest)
  return model, parallel.bytes_per_device(abstract_state.opt_state)


def _drivers(run: RunConfig, devices: int) -> str:
  """The config keys that set the state's size, with their values."""
  m = run.model
  keys = [f"model.init_from={m.init_from!r}" if m.init_from else f"model.size={m.size!r}",
          f"model.param_dtype={m.param_dtype!r}", f"optimizer.name={run.optimizer.name!r}",
          f"optimizer.state_bits={run.optimizer.state_bits}"]
  found = rank_sides(run)
  if found is not None:
    keys.append(f"{found[0]}={found[1]}")
  if devices > 1 or run.parallel.fsdp:
    keys.append(f"parallel.fsdp={run.parallel.fsdp} over {devices} devices")
  return ", ".join(keys)


def check_memory(run: RunConfig, abstract_state, available: Capacity | None = None) -> None:
  """Raise ConfigError (naming the figure, the capacity and the keys that set them) if the state's
  floor exceeds (1 - MARGIN) of `available` (default: `capacity()`). Allocates nothing."""
  if not run.train.check_memory:
    return
  available = capacity() if available is None else available
  if available is None:
    return
  model, optimizer = state_bytes(abstract_state)
  need = (model + optimizer) * available.devices
  allowed = int(available.bytes * (1 - MARGIN))
  if need <= allowed:
    return
  if not available.host:
    where = "per device"
  else:
    where = "of host memory" + (f" ({available.devices} host devices, each its own copy or shard)"
                                if available.devices > 1 else "")
  shard = "" if available.host or jax.device_count() == 1 else " (or shard it over devices with parallel.fsdp)"
  raise ConfigError(
      "model.init_from" if run.model.init_from else "model.size",
      f"the run does not fit: parameters {model / GiB:,.2f} GiB + optimizer state {optimizer / GiB:,.2f} GiB "
      f"per device = {need / GiB:,.2f} GiB {where}, over {allowed / GiB:,.2f} GiB ({100 - 100 * MARGIN:.0f}% of "
      f"the {available.bytes / GiB:,.2f} GiB of {available.description}); set by "
      f"{_drivers(run, jax.device_count())}: make one smaller{shard}, check the whole step with --memory_report, "
      "or set train.check_memory=False to run anyway")
