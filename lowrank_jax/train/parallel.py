"""Device mesh and shardings for data-parallel training with `jax.jit`.

The batch is split over a `data` mesh axis spanning every device of every
process; the train state is replicated. The compiler inserts the gradient
all-reduce. On one device all of this is a no-op.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh() -> Mesh:
  # Auto axes: the compiler propagates the batch sharding through the model and
  # inserts the gradient all-reduce; the model code stays sharding-agnostic.
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Tokens are [grad_accum, micro_batch, seq_len]: split the micro-batch over devices."""
  return NamedSharding(mesh, P(None, DATA_AXIS, None))


def eval_sharding(mesh: Mesh) -> NamedSharding:
  """Eval tokens are [batch, seq_len]."""
  return NamedSharding(mesh, P(DATA_AXIS, None))


def global_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Assemble this process's rows into the global batch (every process calls it)."""
  return jax.make_array_from_process_local_data(sharding, local)


def abstract_like(tree: Any, sharding: NamedSharding) -> Any:
  """ShapeDtypeStructs of `tree` carrying `sharding`, for compiling and restoring."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def bytes_per_device(tree: Any) -> int:
  """Bytes of one device's shard of every leaf (ShapeDtypeStructs or arrays with shardings)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.shape
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None:
      shape = sharding.shard_shape(shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


MODES = ("mesh", "pmap")

# Leaves smaller than this stay replicated under FSDP: sharding a norm scale saves
# nothing and costs a collective.
FSDP_MIN_SIZE = 2**12


def fsdp_spec(shape: tuple[int, ...], num_devices: int) -> P:
  """Shard the largest axis that the device count divides; replicate if none does."""
  if int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE or num_devices == 1:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_devices == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, state: Any, *, fsdp: bool) -> Any:
  """A sharding per leaf of the train state: replicated, or FSDP-sharded over `data`.

  Under FSDP every large leaf (parameters, Adam moments, GaLore/OSD projectors and
  low-rank moments alike) is split along its largest divisible axis; the compiler
  gathers what each step needs. Scalars (step, counts) and small leaves stay replicated.
  """
  if not fsdp:
    return jax.tree.map(lambda _: replicated(mesh), state)
  n = mesh.devices.size
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n)), state)


def pmap_tokens(local: np.ndarray) -> np.ndarray:
  """[accum, micro, T] -> [local devices, accum, micro / devices, T], rows in mesh order."""
  n = jax.local_device_count()
  accum, micro, seq = local.shape
  return local.reshape(accum, n, micro // n, seq).transpose(1, 0, 2, 3)


def initialize_distributed() -> bool:
  """Join a multi-host job when launched as one; a no-op on a single host.

  Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Otherwise
  SLURM or Open MPI jobs with more than one task are detected by JAX itself.
  """
  import os

  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(env.get("JAX_NUM_PROCESSES", "1")),
        process_id=int(env.get("JAX_PROCESS_ID", "0")),
    )
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
    return True
  return False


def gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order (for per-process data positions)."""
  import json

  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  raw = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
  lengths = multihost_utils.process_allgather(np.array([raw.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: raw.size] = raw
  everything = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(everything, np.ravel(lengths))]
