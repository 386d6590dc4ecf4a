"""Loading a LLaMA-1b-shaped Hugging Face checkpoint: wall time and peak host memory.

Writes a random LLaMA checkpoint of a named size (default the GaLore paper's 1b: d 2048,
ff 5461, 32 heads, 24 layers, vocab 32000, untied) in bfloat16 as two shards with an index,
as transformers does, then loads it with `from_pretrained` in a fresh process per target
dtype and reports the process's peak resident memory (VmHWM) against the checkpoint size.
"Above baseline" subtracts the RSS of the same process after importing jax and starting
its CPU backend, before loading. On a CPU backend the loaded model itself lives in host
memory, so the floor is the model's own size (1.0x for bf16 -> bf16, 2.0x for bf16 -> f32).

    python bench/hf_load.py [--size 1b] [--dir /tmp/hf_load_1b]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from _common import RESULTS, meta, write_json


def _rss_kib(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise RuntimeError(field)


def write_checkpoint(path: str, size: str) -> int:
  import ml_dtypes
  from flax import nnx
  from lowrank_jax import models
  from lowrank_jax.models.safetensors_io import write_safetensors
  config = models.llama_config(size, 32000)
  hf_format = models.get_family('llama').hf  # the loader's own name map and config.json writer
  tensors = hf_format.tensors(config)
  abstract = nnx.to_flat_state(nnx.state(nnx.eval_shape(lambda: models.Llama(config, rngs=nnx.Rngs(0)))))
  abstract = {p: tuple(v.get_value().shape) for p, v in abstract}
  shapes = {name: abstract[p][::-1] if layout == 'linear' else abstract[p] for p, (name, layout) in tensors.items()}
  dtype = np.dtype(ml_dtypes.bfloat16)
  rng = np.random.default_rng(0)
  produce = lambda name: (rng.standard_normal(shapes[name], np.float32) * 0.02).astype(dtype)  # noqa: E731
  names = list(shapes)
  half = len(names) // 2
  os.makedirs(path, exist_ok=True)
  total, weight_map = 0, {}
  for k, part in enumerate((names[:half], names[half:])):
    file = f'model-{k + 1:05d}-of-00002.safetensors'
    total += write_safetensors(os.path.join(path, file), [(n, shapes[n], dtype) for n in part], produce)
    weight_map.update({n: file for n in part})
  with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f)
  hf = hf_format.config_to_hf(config, {})
  hf['torch_dtype'] = 'bfloat16'
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf, f)
  return total


def load_once(path: str, param_dtype: str) -> dict:
  import jax
  from flax import nnx
  jax.numpy.zeros(1).block_until_ready()  # start the backend before the baseline
  from lowrank_jax import models
  baseline = _rss_kib('VmRSS')
  start = time.perf_counter()
  model = models.from_pretrained(path, param_dtype=param_dtype, dtype=param_dtype)
  jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
  wall = time.perf_counter() - start
  return {'param_dtype': param_dtype, 'wall_s': wall, 'baseline_rss_kib': baseline,
          'peak_rss_kib': _rss_kib('VmHWM'), 'params': models.count_params(model)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--size', default='1b')
  parser.add_argument('--dir', default='/tmp/hf_load_1b')
  parser.add_argument('--load', help=argparse.SUPPRESS)
  parser.add_argument('--param_dtype', default='bfloat16', help=argparse.SUPPRESS)
  parser.add_argument('--dtypes', default='bfloat16,float32')
  args = parser.parse_args()
  if args.load:
    print(json.dumps(load_once(args.load, args.param_dtype)))
    return
  info = meta(args)
  index = os.path.join(args.dir, 'model.safetensors.index.json')
  if not os.path.exists(index):
    start = time.perf_counter()
    write_checkpoint(args.dir, args.size)
    print(f'wrote {args.dir} in {time.perf_counter() - start:.1f} s')
  with open(index) as f:
    ckpt_bytes = json.load(f)['metadata']['total_size']
  rows = []
  for dtype in args.dtypes.split(','):
    out = subprocess.run([sys.executable, __file__, '--load', args.dir, '--param_dtype', dtype],
                         check=True, capture_output=True, text=True).stdout
    row = json.loads(out.strip().splitlines()[-1])
    row['checkpoint_bytes'] = ckpt_bytes
    row['peak_over_checkpoint'] = row['peak_rss_kib'] * 1024 / ckpt_bytes
    row['above_baseline_over_checkpoint'] = (row['peak_rss_kib'] - row['baseline_rss_kib']) * 1024 / ckpt_bytes
    rows.append(row)
  print(f'LLaMA-{args.size}-shaped checkpoint, bf16, 2 shards: {ckpt_bytes / 2**30:.2f} GiB, '
        f'{rows[0]["params"] / 1e9:.3f} B params; CPU backend (the model lives in host memory)')
  print(f'{"load as":10s} {"wall s":>7s} {"peak RSS GiB":>13s} {"peak/ckpt":>10s} {"(peak-base)/ckpt":>17s}')
  for r in rows:
    print(f'{r["param_dtype"]:10s} {r["wall_s"]:7.1f} {r["peak_rss_kib"] / 2**20:13.2f} '
          f'{r["peak_over_checkpoint"]:10.2f} {r["above_baseline_over_checkpoint"]:17.2f}')
  out = write_json(os.path.join(RESULTS, 'hf_load.json'), {'size': args.size, 'rows': rows}, meta=info, indent=2)
  print('wrote', out)


if __name__ == '__main__':
  main()
