"""Device mesh, shardings, and the one adapter that compiles a step body for every parallel mode.

The batch is split over a `data` mesh axis spanning every device of every
process; the train state is replicated. The compiler inserts the gradient
all-reduce. On one device all of this is a no-op.

With `parallel.shard_heads` (LTE heads spread over devices) the one axis is
named `heads` instead: the batch is split over it as before, and so is every
head variable (and its optimizer state) along its heads axis, so each device
holds its own heads and trains them on its own part of the batch.

`compile_program` wraps a step body (`step.make_train_step`, train step or refresh)
for `parallel.mode`; `body_axis` says whether that body must be the per-device one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lowrank_jax.train import liveness

DATA_AXIS = "data"
HEADS_AXIS = "heads"


def make_mesh(axis: str = DATA_AXIS, devices: Any = None) -> Mesh:
  """A 1-D mesh over every device (or `devices`, e.g. a TPU target's compile-only ones for the
  memory report): `data` (data parallel) or `heads` (LTE heads per device)."""
  # Auto axes: the compiler propagates the batch sharding through the model and
  # inserts the gradient all-reduce; the model code stays sharding-agnostic.
  auto = (jax.sharding.AxisType.Auto,)
  if devices is not None:
    return Mesh(np.asarray(devices), (axis,), axis_types=auto)
  return jax.make_mesh((jax.device_count(),), (axis,), axis_types=auto)


def _axis(mesh: Mesh) -> str:
  (axis,) = mesh.axis_names
  return axis


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Tokens are [grad_accum, micro_batch, seq_len] (images [.., micro, H, W, C], labels [.., micro]):
  split the micro-batch over devices."""
  return NamedSharding(mesh, P(None, _axis(mesh)))


def eval_sharding(mesh: Mesh) -> NamedSharding:
  """Eval tokens are [batch, seq_len] (or images, labels with the batch first)."""
  return NamedSharding(mesh, P(_axis(mesh)))


def global_array(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Assemble this process's rows into the global batch (every process calls it)."""
  return jax.make_array_from_process_local_data(sharding, local)


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


def _dict_suffix(path: tuple) -> tuple[str, ...]:
  """The trailing dict keys of a pytree path: a parameter's path, whether the leaf is the
  parameter itself or its Adam moment deep inside an optimizer state."""
  names = []
  for entry in reversed(path):
    if not isinstance(entry, jax.tree_util.DictKey):
      break
    names.append(str(entry.key))
  return tuple(reversed(names))


def split_leaf_mask(tree: Any, params: Any, param_mask: Any) -> Any:
  """Bools over any tree (train state, optimizer state): True where a leaf belongs to a
  parameter that `param_mask` (bools over `params`) marks as split over devices.

  Optimizer states mirror the params below their own nodes (Adam's `mu` is a params-
  shaped dict), so a leaf is matched by its trailing dict keys, and only when its shape
  is that of the parameter (scalars and factored statistics stay whole).
  """
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  marked = {_dict_suffix(path): tuple(leaf.shape)
            for (path, leaf), flag in zip(flat_params, jax.tree.leaves(param_mask)) if flag}
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: marked.get(_dict_suffix(path)) == tuple(leaf.shape), tree)


def heads_spec(ndim: int) -> P:
  """A head variable (..., N, in, r) split over `heads` along N."""
  return P(*([None] * (ndim - 3) + [HEADS_AXIS, None, None]))


def state_shardings(mesh: Mesh, state: Any, *, fsdp: bool, split: Any = None) -> Any:
  """A sharding per leaf of the train state: replicated, FSDP-sharded over `data`, or
  (leaves marked True in `split`, a tree of bools like `state`) split over `heads`.

  Under FSDP every large leaf (parameters, Adam moments, GaLore/OSD projectors and
  low-rank moments alike) is split along its largest divisible axis; the compiler
  gathers what each step needs. Scalars (step, counts) and small leaves stay replicated.
  """
  if split is not None:
    return jax.tree.map(lambda x, s: NamedSharding(mesh, heads_spec(len(x.shape)) if s else P()), state, split)
  if not fsdp:
    return jax.tree.map(lambda _: replicated(mesh), state)
  n = mesh.devices.size
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n)), state)


def pmap_tokens(local: np.ndarray) -> np.ndarray:
  """[accum, micro, T] -> [local devices, accum, micro / devices, T], rows in mesh order."""
  n = jax.local_device_count()
  accum, micro = local.shape[:2]
  return np.moveaxis(local.reshape(accum, n, micro // n, *local.shape[2:]), 1, 0)


def program_batch(mode: str, mesh: Mesh, local: Any) -> Any:
  """This process's rows ([accum, micro_local, ...] arrays, or a dict of them) as the compiled
  programs take them: one global array split over the mesh, or under pmap `pmap_tokens`."""
  if mode == "pmap":
    return jax.tree.map(pmap_tokens, local)
  return jax.tree.map(lambda x: global_array(x, batch_sharding(mesh)), local)


def abstract_batch(mode: str, mesh: Mesh, example: Any, accum: int, micro: int) -> Any:
  """`program_batch`'s result as ShapeDtypeStructs: the example's leaves with [accum, micro] in
  front (under pmap [local devices, accum, micro / devices] of this process's share)."""
  if mode == "pmap":
    n = jax.local_device_count()
    lead, sharding = (n, accum, micro // jax.process_count() // n), None
  else:
    lead, sharding = (accum, micro), batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(lead + x.shape, x.dtype, sharding=sharding), example)


def body_axis(mode: str, mesh: Mesh) -> str | None:
  """The axis the step body reduces over itself (the per-device body, explicit collectives), or
  None where it is the global program and the compiler inserts them (mesh mode over `data`)."""
  return None if mode == "mesh" and _axis(mesh) == DATA_AXIS else _axis(mesh)


def compile_program(body: Callable, mode: str, mesh: Mesh, abstract_state: Any, *, metrics: bool = True):
  """`body(state, batch)` (-> `(state, metrics)`, or the state alone without `metrics`) compiled for
  `parallel.mode`, as a function of the global train state (placed as `abstract_state` says,
  donated) and the batch as `program_batch` lays it out.

  mesh  `jax.jit` with the state's shardings and the batch split over the axis; a per-device
        body (`body_axis`: heads over devices) runs under `jax.shard_map` inside it.
  pmap  `pmap_program`.
  """
  if mode == "pmap":
    return pmap_program(body, mesh, abstract_state, metrics=metrics)
  state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)
  if body_axis(mode, mesh) is not None:
    specs = jax.tree.map(lambda x: x.spec, state_sh)
    body = jax.shard_map(body, mesh=mesh, in_specs=(specs, batch_sharding(mesh).spec),
                         out_specs=_outputs(specs, P(), metrics), check_vma=False)
  return jax.jit(body, in_shardings=(state_sh, batch_sharding(mesh)),
                 out_shardings=_outputs(state_sh, replicated(mesh), metrics), donate_argnums=0)


def _outputs(state: Any, metrics: Any, with_metrics: bool) -> Any:
  """A program's output tree (of specs, shardings or axes): (state, metrics), or the state alone."""
  return (state, metrics) if with_metrics else state


def pmap_program(body: Callable, mesh: Mesh, abstract_state: Any, *, metrics: bool = True):
  """The per-device `body` under `jax.pmap` over the mesh's axis (see `compile_program`).

  Whole leaves of the state go in and come back replicated (`in_axes` None); the batch is
  mapped along its leading [devices] axis. A leaf split over the axis (an LTE head
  variable) has its split dimension folded into (devices, per device) and mapped there,
  then unfolded: that reshaping of global arrays runs with the pmap inside one `jax.jit`
  (one host). Without split leaves the pmap runs on its own, across hosts too.
  """
  axis, n = _axis(mesh), mesh.devices.size
  dims = jax.tree.map(lambda x: list(x.sharding.spec).index(axis) if axis in x.sharding.spec else None,
                      abstract_state)
  out_axes = _outputs(dims, None, metrics)
  if not jax.tree.leaves(dims):  # every leaf whole (None): plain replicas
    return jax.pmap(body, axis_name=axis, in_axes=(dims, 0), out_axes=out_axes, donate_argnums=0)
  mapped = jax.pmap(body, axis_name=axis, in_axes=(dims, 0), out_axes=out_axes)

  def fold(x, k):
    return x if k is None else x.reshape(x.shape[:k] + (n, x.shape[k] // n) + x.shape[k + 1:])

  def unfold(x, k):
    return x if k is None else x.reshape(x.shape[:k] + (x.shape[k] * x.shape[k + 1],) + x.shape[k + 2:])

  def program(state, batch):
    out = mapped(jax.tree.map(fold, state, dims), batch)
    if metrics:
      return jax.tree.map(unfold, out[0], dims), out[1]
    return jax.tree.map(unfold, out, dims)

  state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)
  return jax.jit(program, in_shardings=(state_sh, NamedSharding(mesh, P(axis))),
                 out_shardings=_outputs(state_sh, replicated(mesh), metrics), donate_argnums=0)


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
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
  else:
    return False
  liveness.start()
  return True


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
