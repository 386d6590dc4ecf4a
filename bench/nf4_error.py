"""NF4 base kernels (lowrank_jax/nn/quantized_base.py) against bitsandbytes on the same matrices.

1. ``error``: Gaussian kernels (seed 0; 4096 x 4096 and LLaMA-7B's up projection 4096 x 11008,
   [in, out]), the relative error ||W - dequantize(quantize(W))||_F / ||W||_F of ours (NF4 block 64,
   with and without double quantization; int8 per column for scale) and of bitsandbytes'
   ``quantize_4bit(..., quant_type='nf4', blocksize=64)`` / ``dequantize_4bit`` on the torch layout
   [out, in] = our kernel transposed (``compress_statistics=True`` for its double quantization, whose
   second level is an 8-bit dynamic float code where ours is linear int8). Also: the two NF4 tables
   equal, the fraction of elements given the same 4-bit code, the absmax values equal.
   bitsandbytes runs in another process (``--peer_python``, a venv with torch and bitsandbytes; ours
   has no torch): the kernel goes over as an .npy file. Without that python, ours only.
2. ``memory`` (needs libtpu): why :func:`frozen_matmul` dequantizes again behind an optimization
   barrier. The gradient (w.r.t. the input) of 6 layers ``tanh(x @ W)``, W 2048 x 2048 in NF4, 4096
   tokens, compiled for a TPU v5e ahead of time: the temporaries with ``frozen_matmul``, with the same
   custom_vjp without the barrier, and with the plain product on ``W.dequantize()``.

  python bench/nf4_error.py                       # both, ~1 min on 2 cores
  python bench/nf4_error.py --sections error --sizes 1024x1024 --out /tmp/nf4.json

Writes bench/results/nf4_error.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import textwrap
from typing import Any

from _common import meta, result_path, write_json
from lowrank_jax.train import targets

PEER_PYTHON = '/tmp/peer/bin/python'

# Runs in the peer venv: argv = kernel.npy (torch layout [out, in], float32), output directory.
PEER_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np, torch, bitsandbytes, bitsandbytes.functional as F
    w = torch.from_numpy(np.load(sys.argv[1]))
    out, res = sys.argv[2], {"bitsandbytes": bitsandbytes.__version__, "torch": torch.__version__}
    res["code"] = F.get_4bit_type("nf4", device="cpu").tolist()
    rel = lambda d: float(torch.linalg.norm(w.double() - d.double()) / torch.linalg.norm(w.double()))
    for name, dq in (("nf4", False), ("nf4_dq", True)):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        res[name] = rel(F.dequantize_4bit(packed, state))
        if not dq:
            flat = packed.reshape(-1).numpy()  # element 2i in the high nibble, 2i + 1 in the low one
            index = np.stack([flat >> 4, flat & 15], axis=1).reshape(-1)[:w.numel()].reshape(w.shape)
            np.save(out + "/index.npy", index.astype(np.uint8))
            np.save(out + "/absmax.npy", state.absmax.numpy())
    print(json.dumps(res))
''')


def _sizes(text: str) -> list[tuple[int, int]]:
  return [tuple(int(n) for n in item.split('x')) for item in text.split(',') if item]


def run_peer(peer_python: str, kernel, scratch: str) -> dict[str, Any] | None:
  """bitsandbytes on ``kernel.T`` in the peer venv: its errors, code table, 4-bit indices [out, in]
  and absmax; None (with a note) when the peer python is missing or fails."""
  import numpy as np

  if not os.path.exists(peer_python):
    print(f'no peer python at {peer_python}: bitsandbytes not measured, ours only')
    return None
  path = os.path.join(scratch, 'kernel_t.npy')
  np.save(path, np.ascontiguousarray(kernel.T))
  proc = subprocess.run([peer_python, '-c', PEER_SCRIPT, path, scratch], capture_output=True, text=True,
                        timeout=1800, env={k: v for k, v in os.environ.items() if not k.startswith('JAX')})
  if proc.returncode != 0:
    print(f'peer python failed (rc {proc.returncode}): {proc.stderr.strip()[-600:]}')
    return None
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result['index'] = np.load(os.path.join(scratch, 'index.npy'))
  result['absmax'] = np.load(os.path.join(scratch, 'absmax.npy'))
  return result


def bench_error(args) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lowrank_jax.nn import quantized_base as qb

  quantize = jax.jit(qb.quantize_base, static_argnames=('bits', 'block_size', 'double_quant', 'dtype'))
  rows, code_equal = [], None
  with tempfile.TemporaryDirectory(prefix='nf4_error_') as scratch:
    for n_in, n_out in _sizes(args.sizes):
      w = np.random.default_rng(args.seed).standard_normal((n_in, n_out), dtype=np.float32)
      norm = np.linalg.norm(w.astype(np.float64))

      def rel(q):
        return float(np.linalg.norm(np.asarray(q.dequantize(jnp.float32), np.float64) - w) / norm)

      q4 = quantize(jnp.asarray(w), 4)
      q4dq = quantize(jnp.asarray(w), 4, double_quant=True)
      row = {'kernel': [n_in, n_out], 'torch_weight': [n_out, n_in], 'seed': args.seed,
             'ours': {'nf4': rel(q4), 'nf4_dq': rel(q4dq), 'int8': rel(quantize(jnp.asarray(w), 8)),
                      'bits_per_param': {'nf4': 8 * q4.nbytes / q4.size, 'nf4_dq': 8 * q4dq.nbytes / q4dq.size}}}
      row['ours']['dq_extra_error'] = row['ours']['nf4_dq'] / row['ours']['nf4'] - 1
      peer = run_peer(args.peer_python, w, scratch)
      if peer is not None:
        codes = np.asarray(q4.codes)
        ours_index = np.stack([codes & 15, codes >> 4], axis=1).reshape(-1, n_out)[:n_in]
        same = ours_index == peer['index'].T
        code_equal = bool(np.array_equal(np.asarray(peer['code'], np.float32), qb.NF4_CODE))
        # bitsandbytes' absmax runs over its flat [out, in] blocks: out-major, our [nb, out] transposed.
        absmax_equal = bool(np.array_equal(peer['absmax'].reshape(n_out, -1).T, np.asarray(q4.scale)))
        row['bitsandbytes'] = {'nf4': peer['nf4'], 'nf4_dq': peer['nf4_dq'],
                               'dq_extra_error': peer['nf4_dq'] / peer['nf4'] - 1,
                               'version': peer['bitsandbytes'], 'torch': peer['torch']}
        row['identical_codes_fraction'] = float(same.mean())
        row['identical_absmax'] = absmax_equal
        row['code_table_equal'] = code_equal
      rows.append(row)
  return {'matrices': rows, 'code_table_equal': code_equal, 'peer_python': args.peer_python}


def bench_memory(target_name: str) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp

  from lowrank_jax.nn import quantized_base as qb

  target = targets.get_target(target_name)
  sharding = jax.sharding.SingleDeviceSharding(target.devices(1)[0])
  layers, d, tokens = 6, 2048, 4096
  shaped = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), t)
  w = jax.eval_shape(lambda a: qb.quantize_base(a, 4), jax.ShapeDtypeStruct((d, d), jnp.float32))
  ws, x = shaped([w] * layers), shaped(jax.ShapeDtypeStruct((tokens, d), jnp.float32))

  @jax.custom_vjp
  def no_barrier(x, w):
    return x @ w.dequantize(x.dtype)

  no_barrier.defvjp(lambda x, w: (no_barrier(x, w), w), lambda w, g: (g @ w.dequantize(g.dtype).T, None))
  products = {'frozen_matmul': lambda x, w: qb.frozen_matmul(x, w, jnp.float32),
              'custom_vjp_without_barrier': no_barrier,
              'plain_dequantize_matmul': lambda x, w: x @ w.dequantize(jnp.float32)}
  out = {'target': target.description, 'layers': layers, 'kernel': [d, d], 'tokens': tokens,
         'float_kernel_bytes': d * d * 4, 'temp_bytes': {}}
  for name, product in products.items():
    def loss(x, ws, product=product):
      for w in ws:
        x = jnp.tanh(product(x, w))
      return x.sum()

    memory = targets.compile_memory(jax.jit(jax.grad(loss)).lower(x, ws), target)
    out['temp_bytes'][name] = memory.temp_bytes
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--sections', default='error,memory', help='comma-separated: error, memory')
  ap.add_argument('--sizes', default='4096x4096,4096x11008', help='kernels [in]x[out], comma-separated')
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--peer_python', default=PEER_PYTHON, help='a python with torch and bitsandbytes')
  ap.add_argument('--memory_target', default='tpu-v5e')
  ap.add_argument('--out', default=result_path('nf4_error.json'))
  args = ap.parse_args()
  sections = [s for s in args.sections.split(',') if s]
  if 'memory' in sections:
    if targets.libtpu_available():
      targets.prepare_environment(args.memory_target)  # before jax starts its backends
    else:
      print('memory: needs libtpu (pip install -e ".[aot]"): skipped')
      sections.remove('memory')
  info = meta(args)
  payload: dict[str, Any] = {}
  if 'error' in sections:
    payload['error'] = bench_error(args)
    print(f'{"kernel [in, out]":>18} {"ours nf4":>9} {"bnb nf4":>9} {"ours dq":>9} {"bnb dq":>9} '
          f'{"ours int8":>9} {"same codes":>10} {"same absmax":>11}')
    for row in payload['error']['matrices']:
      bnb = row.get('bitsandbytes', {})
      fmt = lambda v: f'{v:9.5f}' if isinstance(v, float) else f'{"-":>9}'
      print(f'{"x".join(map(str, row["kernel"])):>18} {fmt(row["ours"]["nf4"])} {fmt(bnb.get("nf4"))} '
            f'{fmt(row["ours"]["nf4_dq"])} {fmt(bnb.get("nf4_dq"))} {fmt(row["ours"]["int8"])} '
            f'{row.get("identical_codes_fraction", float("nan")):10.6f} {str(row.get("identical_absmax", "-")):>11}')
    first = payload['error']['matrices'][0]
    print(f'NF4 tables equal: {payload["error"]["code_table_equal"]}; bits per parameter: '
          f'{first["ours"]["bits_per_param"]["nf4"]:.4f} (nf4), {first["ours"]["bits_per_param"]["nf4_dq"]:.4f} (dq); '
          f'double quantization adds {100 * first["ours"]["dq_extra_error"]:.3f} % to the error (ours, int8), '
          f'{100 * first.get("bitsandbytes", {}).get("dq_extra_error", float("nan")):.3f} % (bitsandbytes, fp8)')
  if 'memory' in sections:
    payload['memory'] = m = bench_memory(args.memory_target)
    print(f'memory ({m["target"]}; grad of {m["layers"]} x tanh(x @ W), W {m["kernel"]}, {m["tokens"]} tokens; '
          f'a float32 kernel is {m["float_kernel_bytes"] / 2**20:.0f} MiB):')
    for name, b in m['temp_bytes'].items():
      print(f'  {name:>28}: temporaries {b / 2**20:8.1f} MiB')
  path = write_json(args.out, payload, meta=info)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
