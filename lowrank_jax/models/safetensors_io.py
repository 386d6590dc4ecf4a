"""The safetensors file format, read and written one tensor at a time.

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header
``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``
and the raw little-endian bytes. The format is simple enough that reading and writing it
here costs less than working around a library: :class:`SafetensorsReader` reads a tensor
with one positioned read into a fresh buffer (no memory map, so a loaded checkpoint does
not stay resident in the host's page tables, and peak host memory stays the model plus
one tensor), and :func:`write_safetensors` streams tensors produced one at a time.
Files written here load in the ``safetensors`` library and in ``transformers``.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

import ml_dtypes
import numpy as np

__all__ = ['SafetensorsReader', 'write_safetensors', 'DTYPE_CODES']

# safetensors dtype code <-> numpy dtype (the floating and integer types checkpoints use).
DTYPE_CODES: dict[str, np.dtype] = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8),
    'BOOL': np.dtype(np.bool_),
}
_CODE_OF = {dtype: code for code, dtype in DTYPE_CODES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


class SafetensorsReader:
  """The tensor table of one ``.safetensors`` file; ``read(name)`` returns a numpy array."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(self.path, 'rb') as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f'{self.path}: not a safetensors file (shorter than 8 bytes)')
      (n,) = struct.unpack('<Q', head)
      if n > _MAX_HEADER:
        raise ValueError(f'{self.path}: not a safetensors file (header length {n})')
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise ValueError(f'{self.path}: not a safetensors file (header is not JSON: {e})') from None
    self.metadata = header.pop('__metadata__', None) or {}
    self._base = 8 + n
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
      code = info.get('dtype')
      if code not in DTYPE_CODES:
        raise ValueError(f'{self.path}: tensor {name!r} has dtype {code!r}; supported: '
                         f'{sorted(DTYPE_CODES)}')
      begin, end = info['data_offsets']
      self._entries[name] = (DTYPE_CODES[code], tuple(int(s) for s in info['shape']), int(begin), int(end))

  def names(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def read(self, name: str) -> np.ndarray:
    """The tensor, in its stored dtype, in a buffer of its own."""
    dtype, shape, begin, end = self._entries[name]
    size = end - begin
    if size != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
      raise ValueError(f'{self.path}: tensor {name!r} has {size} bytes for shape {shape} of {dtype}')
    buf = bytearray(size)
    view = memoryview(buf)
    fd = os.open(self.path, os.O_RDONLY)
    try:
      done = 0
      while done < size:  # pread may return short reads
        got = os.preadv(fd, [view[done:]], self._base + begin + done)
        if got <= 0:
          raise ValueError(f'{self.path}: file ends inside tensor {name!r}')
        done += got
    finally:
      os.close(fd)
    return np.frombuffer(buf, dtype=dtype.newbyteorder('<')).reshape(shape)


def write_safetensors(path: str | os.PathLike, specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> int:
  """Writes ``path`` from ``(name, shape, dtype)`` specs; ``produce(name)`` gives each tensor.

  Tensors are produced and written one at a time, in the order of ``specs``, so the
  host never holds more than one. Returns the bytes of tensor data written.
  """
  specs = list(specs)
  header: dict[str, Any] = {'__metadata__': dict(metadata or {'format': 'pt'})}
  offset = 0
  for name, shape, dtype in specs:
    dtype = np.dtype(dtype)
    if dtype not in _CODE_OF:
      raise ValueError(f'tensor {name!r}: dtype {dtype} has no safetensors code')
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    header[name] = {'dtype': _CODE_OF[dtype], 'shape': [int(s) for s in shape],
                    'data_offsets': [offset, offset + size]}
    offset += size
  raw = json.dumps(header, separators=(',', ':')).encode('utf-8')
  raw += b' ' * (-len(raw) % 8)  # the data starts 8-byte aligned
  tmp = os.fspath(path) + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(raw)))
    f.write(raw)
    for name, shape, dtype in specs:
      array = np.ascontiguousarray(produce(name))
      if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f'tensor {name!r}: produced {array.shape} {array.dtype}, '
                         f'announced {tuple(shape)} {np.dtype(dtype)}')
      f.write(array.astype(array.dtype.newbyteorder('<'), copy=False).reshape(-1).view(np.uint8).data)
  os.replace(tmp, path)
  return offset
