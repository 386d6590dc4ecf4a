"""The trainer runs CPU decompositions (SVD/QR of projector refreshes) on one LAPACK thread."""

import ctypes

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.train import lapack_threads


def _thread_counts() -> list[int]:
  counts = []
  for path in lapack_threads._scipy_openblas_paths():
    lib = ctypes.CDLL(path)
    for name in ('scipy_openblas_get_num_threads64_', 'scipy_openblas_get_num_threads', 'openblas_get_num_threads64_',
                 'openblas_get_num_threads'):
      getter = getattr(lib, name, None)
      if getter is not None:
        counts.append(int(getter()))
        break
  return counts


def test_limit_sets_the_library_jax_decompositions_use(monkeypatch):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 5), dtype=np.float32))
  jax.block_until_ready(jnp.linalg.svd(x))  # jaxlib loads its LAPACK at the first decomposition
  monkeypatch.delenv('OPENBLAS_NUM_THREADS', raising=False)
  if lapack_threads.limit_decomposition_threads() is None:
    pytest.skip('no OpenBLAS behind scipy in this environment')
  assert _thread_counts() and set(_thread_counts()) == {1}
  monkeypatch.setenv('OPENBLAS_NUM_THREADS', '2')  # the user's choice wins
  assert lapack_threads.limit_decomposition_threads() == 2
  assert set(_thread_counts()) == {2}
  assert lapack_threads.limit_decomposition_threads(1) == 1
  assert set(_thread_counts()) == {1}
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)  # still decomposes, on one thread
  np.testing.assert_allclose(np.asarray(u * s @ vt), np.asarray(x), atol=1e-5)
