"""Memory targets: the accelerator a program is compiled for, its devices and its memory capacity.

A TPU target compiles ahead of time on a host without the chip: libtpu (``pip install
-e ".[aot]"``, pinned to the installed jax) describes a TPU topology whose devices
serve as shardings for abstract inputs, and the TPU compiler lays the program out
in that chip's HBM exactly as it would on the chip. Its memory analysis is the
chip's, remat and bf16 included, and a program over the HBM fails to compile with
RESOURCE_EXHAUSTED and the bytes it needs (:func:`compile_memory` turns that into
"does not fit"). ``cpu`` compiles for this host (XLA:CPU: keeps bf16 activations as
float32 and ignores remat) and ``gpu`` for the local GPU, whose runtime also reports
the peak after a real step.

Capacity: for TPUs, the HBM the compiler itself makes available to a program
(asked once per chip by compiling a program that cannot fit, and read from its
error); the documented HBM per chip is kept beside it. For a GPU, the allocator's
``bytes_limit``; for the CPU, the host's physical memory.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["TARGETS", "TPU_CHIPS", "MemoryTarget", "ProgramMemory", "TargetError", "TpuChip", "compile_memory",
           "compile_program", "get_target"]

GiB = 2**30


class TargetError(ValueError):
  """A memory target that cannot be used on this host (unknown, no libtpu, no GPU, too many devices)."""


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """One TPU generation as the ahead-of-time compiler names it."""
  kind: str  # the topology name's prefix ('v5e' in 'v5e:2x2')
  shapes: tuple[tuple[int, str], ...]  # (chips, topology shape) for the slices offered, smallest first
  documented_bytes: int  # HBM per chip in Google's documentation
  source: str


_2D = ((4, "2x2"), (8, "2x4"), (16, "4x4"))
TPU_CHIPS = {
    "tpu-v5e": TpuChip("v5e", _2D, 16 * GiB, "https://cloud.google.com/tpu/docs/v5e: 16 GiB HBM2 per chip"),
    "tpu-v5p": TpuChip("v5p", ((4, "2x2x1"), (8, "2x2x2"), (16, "2x2x4")), 95 * GiB,
                       "https://cloud.google.com/tpu/docs/v5p: 95 GiB HBM2e per chip"),
    "tpu-v6e": TpuChip("v6e", _2D, 32 * GiB, "https://cloud.google.com/tpu/docs/v6e: 32 GiB HBM per chip"),
}
TARGETS = ("cpu", *TPU_CHIPS, "gpu")

# libtpu's settings for compiling on a host that is not a TPU VM (no metadata server).
_TPU_AOT_ENV = {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5litepod-4",
                "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
                "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}

_UNITS = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_AVAILABLE = re.compile(r"available HBM \(([\d.]+)([BKMGT])\)")
_REQUIRED = re.compile(r"memory required for [^(]*\(([\d.]+)([BKMGT])\)")
_USED = re.compile(r"Used ([\d.]+)([BKMGT]) of")


def _parse_bytes(pattern: re.Pattern, text: str) -> int | None:
  match = pattern.search(text)
  return None if match is None else int(round(float(match.group(1)) * _UNITS[match.group(2)]))


def prepare_environment(target: str) -> None:
  """Sets what compiling for `target` on this host needs, before jax starts its backends.

  For a TPU target on a host without TPUs: jax runs on the CPU (``JAX_PLATFORMS=cpu``
  unless set) and libtpu skips the TPU VM's metadata server. Does nothing for others.
  """
  if target in TPU_CHIPS:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    for key, value in _TPU_AOT_ENV.items():
      os.environ.setdefault(key, value)


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


@dataclasses.dataclass(frozen=True)
class MemoryTarget:
  """Where a program is compiled: `devices(n)` to shard its inputs over, and the memory each has."""
  name: str
  description: str
  capacity_bytes: int  # per device: what a program may use
  documented_bytes: int | None  # per device, from the vendor's documentation (TPUs)
  exact: bool  # the compiler's figures are the device's (False: XLA:CPU's estimate)
  _devices: tuple[Any, ...]

  @property
  def platform(self) -> str:
    """What the target's programs are compiled for: 'tpu', 'gpu' or 'cpu'."""
    return "tpu" if self.name in TPU_CHIPS else self.name

  def devices(self, n: int) -> list[Any]:
    if n > len(self._devices):
      raise TargetError(f"memory target {self.name}: {n} devices asked, {len(self._devices)} available")
    return list(self._devices[:n])


@functools.lru_cache(maxsize=None)
def _tpu_topology(target: str, chips: int) -> tuple[str, tuple[Any, ...]]:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  chip = TPU_CHIPS[target]
  for size, shape in chip.shapes:
    if size >= chips:
      name = f"{chip.kind}:{shape}"
      return name, tuple(topologies.get_topology_desc(name, "tpu").devices)
  raise TargetError(f"memory target {target}: at most {chip.shapes[-1][0]} devices, {chips} asked")


@functools.lru_cache(maxsize=None)
def _tpu_capacity(target: str) -> int:
  """The HBM the TPU compiler gives one program, read from the error of one that cannot fit."""
  _, devices = _tpu_topology(target, 1)
  sharding = jax.sharding.SingleDeviceSharding(devices[0])
  too_big = jax.jit(lambda: jnp.zeros((1 << 42,), jnp.uint8), out_shardings=sharding)
  try:
    too_big.lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    found = _parse_bytes(_AVAILABLE, str(e))
    if found:
      return found
  return TPU_CHIPS[target].documented_bytes


def _host_bytes() -> int:
  return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_bytes_limit(device: Any) -> int:
  """An accelerator's memory for one process, as its allocator reports it (0: none reported)."""
  return int((device.memory_stats() or {}).get("bytes_limit", 0))


def get_target(name: str, num_devices: int = 1) -> MemoryTarget:
  """The target `name` (one of TARGETS) with at least `num_devices` devices.

  Raises ValueError with the valid choices, or naming what is missing (libtpu for a
  TPU target, a GPU for `gpu`).
  """
  if name not in TARGETS:
    raise TargetError(f"--memory_target must be one of {list(TARGETS)}, got {name!r}")
  if name == "cpu":
    devices = jax.devices("cpu")
    return MemoryTarget("cpu", f"XLA:CPU, {len(devices)} host device(s)", _host_bytes(), None, False,
                        tuple(devices))
  if name == "gpu":
    try:
      devices = jax.devices("gpu")
    except RuntimeError:
      devices = []
    if not devices:
      raise TargetError("--memory_target=gpu needs a GPU visible to jax (jax[cuda12]); none found")
    return MemoryTarget("gpu", devices[0].device_kind, device_bytes_limit(devices[0]), None, True, tuple(devices))
  if not libtpu_available():
    raise TargetError(f"--memory_target={name} compiles for a TPU on this host and needs libtpu: "
                     'pip install -e ".[aot]"')
  prepare_environment(name)
  topology, devices = _tpu_topology(name, num_devices)
  chip = TPU_CHIPS[name]
  return MemoryTarget(name, f"{devices[0].device_kind} (topology {topology}, compiled ahead of time)",
                      _tpu_capacity(name), chip.documented_bytes, True, devices)


@dataclasses.dataclass(frozen=True)
class ProgramMemory:
  """One compiled program's per-device bytes, or the bytes it needs when it does not compile."""
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  peak_bytes: int
  fits: bool
  error: str | None = None
  compile_s: float = 0.0  # how long the compile took (or failed after)


def compile_memory(lowered: Any, target: MemoryTarget) -> ProgramMemory:
  """`compile_program`'s figures alone."""
  return compile_program(lowered, target)[0]


def compile_program(lowered: Any, target: MemoryTarget) -> tuple[ProgramMemory, Any]:
  """Compiles `lowered` (a `jax.stages.Lowered`) and reads its memory on `target`: the figures, and
  the executable (None when it does not compile) for a caller that runs what it measured.

  Peak: the compiler's own (TPU, GPU: heap simulation of live buffers); on the CPU,
  whose `peak_memory_in_bytes` leaves temporaries out, arguments + temporaries +
  outputs not aliased to donated arguments. A TPU compile that runs out of HBM is
  "does not fit", with the bytes the compiler says the program needs.
  """
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text:
      raise
    needed = _parse_bytes(_REQUIRED, text) or _parse_bytes(_USED, text) or 0
    return ProgramMemory(0, 0, 0, 0, needed, False, text.splitlines()[0][:300], time.perf_counter() - start), None
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
  alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
  peak = argument + temp + output - alias
  reported = getattr(stats, "peak_memory_in_bytes", 0)
  if reported and target.name != "cpu":
    peak = reported
  return ProgramMemory(argument, output, alias, temp, peak, peak <= target.capacity_bytes, None, seconds), compiled
