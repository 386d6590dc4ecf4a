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
