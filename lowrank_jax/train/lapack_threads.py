"""Threads of the LAPACK library behind XLA:CPU's decompositions (SVD, QR, eigh).

On the CPU, jaxlib runs SVD, QR and eigh through the LAPACK that scipy ships (OpenBLAS),
loaded at the first decomposition. OpenBLAS's worker threads spin while they wait for
work, so when the cores are busy (XLA's own thread pool, other processes) a GaLore
refresh at LLaMA-60m took 95 to 126 s with its default threads against 14 to 17 s with
one thread (#19; `python bench/throughput.py --decomposition-threads` measures it). The
trainer therefore runs decompositions on one thread, unless `OPENBLAS_NUM_THREADS` is set
(the user's choice wins). Accelerator backends are not affected.
"""

from __future__ import annotations

import ctypes
import os

# Setters exported by the OpenBLAS builds scipy ships (prefixed, 32/64-bit integer) and by a plain OpenBLAS.
_SETTERS = ('scipy_openblas_set_num_threads64_', 'scipy_openblas_set_num_threads', 'openblas_set_num_threads64_',
            'openblas_set_num_threads')


def _scipy_openblas_paths() -> list[str]:
  """Shared objects named like OpenBLAS that scipy (not numpy) loaded into this process."""
  paths = set()
  with open('/proc/self/maps') as f:
    for line in f:
      path = line.split()[-1]
      name = os.path.basename(path).lower()
      if 'openblas' in name and 'numpy' not in path:
        paths.add(path)
  return sorted(paths)


def limit_decomposition_threads(threads: int | None = None) -> int | None:
  """Runs CPU decompositions on `threads` threads (default 1, or `OPENBLAS_NUM_THREADS` when set).

  Returns the thread count set, or None when nothing was changed (no OpenBLAS found:
  another LAPACK, a platform without /proc, or scipy missing).
  """
  env = os.environ.get('OPENBLAS_NUM_THREADS', '').strip()
  if threads is None:
    threads = int(env) if env.isdigit() and int(env) > 0 else 1
  try:
    import scipy.linalg.cython_lapack  # noqa: F401  (loads the library jaxlib's decompositions call)
    paths = _scipy_openblas_paths()
  except (ImportError, OSError):
    return None
  done = False
  for path in paths:
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for name in _SETTERS:
      setter = getattr(lib, name, None)
      if setter is not None:
        setter(ctypes.c_int(threads))
        done = True
        break
  return threads if done else None
