"""Benchmarks of 8-bit optimizer states (``optim.quantize_state``; a script, not a test).

1. ``codecs``: the codebook choice. Reconstruction error of the dynamic tree
   map and the linear absmax map on normal and heavy-tailed data; then Adam
   on a stream of heavy-tailed gradients (columns and rows scaled over
   several decades, Student-t noise), each 8-bit variant keeping its own
   state from step 0, with the relative error of its update against 32-bit
   Adam's at every step (the error compounds through the stored moments):
   {dynamic, linear} x second moment stored {sqrt, direct} x block {256,
   2048}, plus stochastic rounding and the one-shot error (the 32-bit state
   quantized each step, no compounding).
2. ``bytes``: optimizer-state bytes of the LLaMA-1b parameter tree (float32
   params, from ``jax.eval_shape`` of ``init``: exact), AdamW, GaLore and
   OSD (rank 512, the 1b recipe) at 32 and 8 bits.
3. ``speed``: AdamW update time 8-bit / 32-bit on the LLaMA-130m tree, jitted,
   donated state, timed round-robin; plus the compiled update's
   ``memory_analysis()`` (temporaries, XLA:CPU) for both.
4. ``tpu_temps`` (only when asked; run with a libtpu install): the update's
   temporaries compiled for TPU v5e, 32-bit and 8-bit with ``leaf_groups``
   1, 4, 16.

Usage::

  python bench/bench_quantize.py                 # all
  python bench/bench_quantize.py --only bytes    # one part

Writes ``bench/results/quantize_{codecs,bytes,speed,tpu_temps_<tree>}.json``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from _common import RESULTS, meta, write_json
from lowrank_jax import optim
from lowrank_jax.models import llama
from lowrank_jax.optim import quantize as Q


def _write(name, payload, info):
  path = write_json(os.path.join(RESULTS, f'quantize_{name}.json'), payload, meta=info, indent=2)
  print(f'wrote {path}')


# ---------------------------------------------------------------------------
# 1. Codecs.


def _heavy(key, shape):
  """Student-t (3 dof) entries times log-normal row and column scales."""
  k1, k2, k3 = jax.random.split(key, 3)
  rows = jnp.exp(1.0 * jax.random.normal(k1, (shape[0], 1)))
  cols = jnp.exp(1.5 * jax.random.normal(k2, (1, shape[1])))
  return jax.random.t(k3, 3.0, shape) * rows * cols


def _stochastic(x, key, *, signed, sqrt, block_size):
  """Stochastic rounding to the two neighbouring codes (bench only: it did not help)."""
  q = Q.quantize(x, block_size=block_size, signed=signed, sqrt=sqrt)
  book = jnp.asarray(Q.codebook('dynamic', signed))
  y = jnp.sqrt(jnp.maximum(x, 0)) if sqrt else x
  s = q.scale[..., None]
  yn = Q._blocks(y, block_size) / jnp.where(s > 0, s, 1)
  c = Q._blocks(q.codes, block_size).astype(jnp.int32)
  other = jnp.clip(jnp.where(yn > book[c], c + 1, c - 1), 0, 255)
  gap = book[other] - book[c]
  p = jnp.where(gap != 0, (yn - book[c]) / jnp.where(gap != 0, gap, 1), 0.0)
  pick = jax.random.uniform(key, p.shape) < p
  codes = Q._unblocks(jnp.where(pick, other, c).astype(jnp.uint8), x.shape)
  return Q.QuantizedArray(codes, q.scale, q.dtype, q.codec, q.signed, q.sqrt, q.block_size)


def bench_codecs(steps, shape=(256, 1024)):
  key = jax.random.PRNGKey(0)
  out = {'reconstruction': [], 'adam_stream': []}
  print('\nreconstruction |x - deq(q(x))| / block absmax, block 256')
  data = {'normal': jax.random.normal(key, shape), 'heavy-tailed': _heavy(key, shape)}
  for codec in Q.CODECS:
    for signed in (True, False):
      for dname, x in data.items():
        x = x if signed else x * x  # unsigned: a second moment
        q = Q.quantize(x, codec=codec, signed=signed, block_size=256)
        err = jnp.abs(Q.dequantize(q) - x)
        s = jnp.repeat(q.scale, 256, axis=-1).reshape(-1)[: x.size].reshape(x.shape)
        rel = err / jnp.maximum(jnp.abs(x), 1e-30)
        row = dict(codec=codec, signed=signed, data=dname,
                   max_err_over_absmax=float(jnp.max(err / s)), bound=Q.codec_error_bound(codec, signed),
                   median_rel_err=float(jnp.median(rel)), zeroed_frac=float(jnp.mean((Q.dequantize(q) == 0) & (x != 0))))
        out['reconstruction'].append(row)
        print(f"  {codec:8s} {'signed' if signed else 'unsigned':8s} {dname:13s} max/absmax "
              f"{row['max_err_over_absmax']:.5f} (bound {row['bound']:.5f})  median rel {row['median_rel_err']:.4f}  "
              f"nonzero->0 {row['zeroed_frac']:.4f}")

  k1, k2, k3 = jax.random.split(key, 3)
  scale = jnp.exp(1.0 * jax.random.normal(k1, (shape[0], 1))) * jnp.exp(1.5 * jax.random.normal(k2, (1, shape[1])))
  signal = 0.3 * jax.random.normal(k3, shape)

  def grad(t):
    noise = jax.random.t(jax.random.fold_in(key, t), 3.0, shape)
    return {'w': (signal + noise) * scale * (1 + 0.5 * jnp.sin(t / 20.0))}

  params = {'w': jnp.zeros(shape)}
  variants = {'32-bit': optax.adam(1e-3)}
  for codec in Q.CODECS:
    for sm in Q.SECOND_MOMENT_MODES:
      for bs in (256, 2048):
        variants[f'{codec} / {sm} / block {bs}'] = optim.quantize_state(
            inner=optax.adam(1e-3), codec=codec, second_moment=sm, block_size=bs)
  ref_opt = variants['32-bit']

  @jax.jit
  def step(states, t):
    g = grad(t)
    ups, new = {}, {}
    for name, opt in variants.items():
      u, new[name] = opt.update(g, states[name])
      ups[name] = u['w']
    # Stochastic rounding (dynamic, sqrt, block 256) on a plain adam state.
    u, sr = ref_opt.update(g, states['sr'])
    ka, kb = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(7), t))
    mu = Q.dequantize(_stochastic(sr[0].mu['w'], ka, signed=True, sqrt=False, block_size=256))
    nu = Q.dequantize(_stochastic(sr[0].nu['w'], kb, signed=False, sqrt=True, block_size=256))
    new['sr'] = (sr[0]._replace(mu={'w': mu}, nu={'w': nu}),) + sr[1:]
    ups['dynamic / sqrt / block 256 / stochastic rounding'] = u['w']
    # One-shot: the 32-bit state quantized, no compounding.
    st = new['32-bit'][0]
    mu = Q.dequantize(Q.quantize(st.mu['w']))
    nu = Q.dequantize(Q.quantize(st.nu['w'], signed=False, sqrt=True))
    c = st.count.astype(jnp.float32)
    ups['one-shot (dynamic / sqrt / 256)'] = -1e-3 * (mu / (1 - 0.9**c)) / (jnp.sqrt(nu / (1 - 0.999**c)) + 1e-8)
    ref = ups['32-bit']
    return new, {k: jnp.linalg.norm(v - ref) / jnp.linalg.norm(ref) for k, v in ups.items()}

  states = {name: opt.init(params) for name, opt in variants.items()}
  states['sr'] = ref_opt.init(params)
  errs = []
  for t in range(steps):
    states, e = step(states, t)
    errs.append(jax.device_get(e))
  print(f'\nAdam on heavy-tailed gradients {shape}: ||u_8bit - u_32bit|| / ||u_32bit||, {steps} steps')
  for name in errs[0]:
    if name == '32-bit':
      continue
    early = float(np.mean([e[name] for e in errs[:50]]))
    late = float(np.mean([e[name] for e in errs[-100:]]))
    out['adam_stream'].append(dict(variant=name, mean_rel_err_first50=early, mean_rel_err_last100=late))
    print(f'  {name:50s} first 50 steps {early:10.4f}   last 100 {late:10.4f}')
  out['steps'] = steps
  return out


# ---------------------------------------------------------------------------
# 2. Bytes.


def llama_params(size, vocab=32128, dtype='float32', abstract=True):
  cfg = llama.llama_config(size, vocab, param_dtype=dtype)
  make = lambda: nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param).to_pure_dict()
  return jax.eval_shape(make) if abstract else make()


def tree_nbytes(tree):
  return int(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def moment_bytes(state):
  """Bytes of the state leaves that quantize_state treats as moments (either form)."""
  total = 0
  is_q = lambda x: isinstance(x, Q.QuantizedArray)
  for path, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_q)[0]:
    if is_q(x):
      total += x.nbytes
    elif Q.moment_kind(path, x):
      total += math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
  return total


def bench_bytes(size='1b', rank=512):
  params = llama_params(size)
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  methods = {
      'adamw': lambda: optax.adamw(1e-3, weight_decay=0.0),
      'galore': lambda: optim.galore(learning_rate=1e-2, rank=rank, update_proj_gap=200, scale=0.25),
      'osd': lambda: optim.osd(learning_rate=1e-2, rank=rank, scale=0.25),
      # OSD's extra state is its projector optimizer's: one moment with Lion, none with
      # plain gradient steps on the projector (quality not measured here).
      'osd (projector optimizer lion)': lambda: optim.osd(
          learning_rate=1e-2, rank=rank, scale=0.25, projector_optimizer=optax.scale_by_lion()),
      'osd (projector optimizer sgd)': lambda: optim.osd(
          learning_rate=1e-2, rank=rank, scale=0.25, projector_optimizer=optax.identity()),
  }
  rows = []
  print(f'\noptimizer state bytes, LLaMA-{size} tree ({n / 1e6:.1f}M float32 params), '
        'block 256, min_size 4096')
  for name, make in methods.items():
    for bits in (32, 8):
      if bits == 32 and name.startswith('osd ('):
        continue
      tx = make() if bits == 32 else optim.quantize_state(inner=make())
      state = jax.eval_shape(tx.init, params)
      rows.append(dict(method=name, bits=bits, state_bytes=tree_nbytes(state), moment_bytes=moment_bytes(state)))
  base = {r['method']: r for r in rows if r['bits'] == 32}
  adam32 = base['adamw']['state_bytes']
  for r in rows:
    r['ratio_to_same_method_32'] = r['state_bytes'] / base[r['method'].split(' (')[0]]['state_bytes']
    r['ratio_to_adamw_32'] = r['state_bytes'] / adam32
    print(f"  {r['method']:30s} {r['bits']:2d}-bit  state {r['state_bytes'] / 2**30:7.3f} GiB  "
          f"(moments {r['moment_bytes'] / 2**30:6.3f})  / same method 32-bit {r['ratio_to_same_method_32']:.4f}"
          f"  / adamw 32-bit {r['ratio_to_adamw_32']:.4f}")
  eight = {r['method']: r for r in rows if r['bits'] == 8}
  for name in eight:
    if name.startswith('osd'):
      print(f"  {name} / galore at 8 bits: {eight[name]['state_bytes'] / eight['galore']['state_bytes']:.4f}")
  return {'size': size, 'rank': rank, 'params': n, 'rows': rows}


# ---------------------------------------------------------------------------
# 3. Speed and compiled temporaries.


def bench_speed(size, reps):
  params = llama_params(size, abstract=False)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), params)
  txs = {'32-bit': optax.adamw(1e-3), '8-bit': optim.quantize_state(inner=optax.adamw(1e-3)),
         '8-bit, leaf_groups=8': optim.quantize_state(inner=optax.adamw(1e-3), leaf_groups=8)}
  cases, mem = {}, {}
  for name, tx in txs.items():
    step = jax.jit(tx.update, donate_argnums=1)
    state = tx.init(params)
    compiled = step.lower(grads, state, params).compile()
    ma = compiled.memory_analysis()
    mem[name] = dict(argument_bytes=ma.argument_size_in_bytes, output_bytes=ma.output_size_in_bytes,
                     temp_bytes=ma.temp_size_in_bytes, alias_bytes=ma.alias_size_in_bytes,
                     state_bytes=tree_nbytes(state))
    cases[name] = [compiled, state]
  times = {k: [] for k in cases}
  for _ in range(reps):
    for name, case in cases.items():
      t0 = time.perf_counter()
      _, case[1] = case[0](grads, case[1], params)
      jax.block_until_ready(case[1])
      times[name].append(time.perf_counter() - t0)
  f32_state = mem['32-bit']['state_bytes']
  largest = max(math.prod(x.shape) for x in jax.tree.leaves(params)) * 4
  print(f'\nAdamW update, LLaMA-{size} tree, {reps} interleaved rounds (load avg {os.getloadavg()[0]:.1f})')
  out = {'size': size, 'reps': reps, 'rows': []}
  for name in cases:
    med, lo = statistics.median(times[name]), min(times[name])
    out['rows'].append(dict(bits=name, median_s=med, min_s=lo, **mem[name]))
    print(f"  {name:22s} median {med * 1e3:8.1f} ms  min {lo * 1e3:8.1f} ms  state {mem[name]['state_bytes'] / 2**20:8.1f} MiB"
          f"  temp {mem[name]['temp_bytes'] / 2**20:8.1f} MiB")
  out['largest_leaf_f32_bytes'] = largest
  ref = out['rows'][0]
  for r in out['rows'][1:]:
    r['median_ratio'] = r['median_s'] / ref['median_s']
    r['min_ratio'] = r['min_s'] / ref['min_s']
    r['temp_over_f32_state'] = r['temp_bytes'] / f32_state
    print(f"  {r['bits']} / 32-bit time: median {r['median_ratio']:.3f}, min {r['min_ratio']:.3f}; temporaries "
          f"{r['temp_over_f32_state']:.3f} of the float32 state ({f32_state / 2**20:.1f} MiB)")
  print(f'  largest leaf in float32: {largest / 2**20:.1f} MiB')
  return out


# ---------------------------------------------------------------------------
# 4. Compiled temporaries of the update for a TPU target (run with the libtpu venv).


def bench_tpu_temps(tree):
  """AdamW update temporaries, 32-bit vs 8-bit with leaf_groups 1, 4, 16, compiled for TPU v5e.

  Needs ``jax[tpu]`` (libtpu) at the installed jax version and the environment
  TPU_SKIP_MDS_QUERY=1 TPU_ACCELERATOR_TYPE=v5litepod-4 TPU_WORKER_HOSTNAMES=localhost
  TPU_WORKER_ID=0 JAX_PLATFORMS=cpu; nothing runs, the update is only compiled.
  """
  from jax.experimental import topologies

  device = topologies.get_topology_desc('v5e:2x2', 'tpu').devices[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  if tree == 'blocks':
    params = {f'p{i}': jax.ShapeDtypeStruct((512, 2048), jnp.float32) for i in range(16)}
  else:
    params = llama_params(tree)
  on_tpu = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), t)
  txs = {'32-bit': optax.adamw(1e-3)}
  for k in (1, 4, 16):
    txs[f'8-bit, leaf_groups={k}'] = optim.quantize_state(inner=optax.adamw(1e-3), leaf_groups=k)
  rows = []
  f32_moments = 2 * tree_nbytes(params)
  print(f'\nAdamW update compiled for TPU v5e, tree {tree!r}: float32 moments {f32_moments / 2**20:.1f} MiB')
  for name, tx in txs.items():
    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(tx.update, donate_argnums=1).lower(on_tpu(params), on_tpu(state), on_tpu(params)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    rows.append(dict(variant=name, temp_bytes=temp, temp_over_f32_moments=temp / f32_moments))
    print(f'  {name:22s} temporaries {temp / 2**20:8.1f} MiB ({temp / f32_moments:.3f} of the float32 moments)')
  return {'tree': tree, 'f32_moment_bytes': f32_moments, 'rows': rows}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--only', choices=('codecs', 'bytes', 'speed', 'tpu_temps'), action='append')
  ap.add_argument('--tpu_tree', default='blocks', help="tpu_temps: 'blocks' (16 x 512 x 2048) or a LLaMA size")
  ap.add_argument('--steps', type=int, default=400, help='codecs: Adam steps')
  ap.add_argument('--size', default='130m', help='speed: LLaMA size of the tree')
  ap.add_argument('--reps', type=int, default=7, help='speed: interleaved rounds')
  args = ap.parse_args()
  parts = args.only or ['codecs', 'bytes', 'speed']
  info = meta(args)
  if 'codecs' in parts:
    _write('codecs', bench_codecs(args.steps), info)
  if 'bytes' in parts:
    _write('bytes', bench_bytes(), info)
  if 'speed' in parts:
    _write('speed', bench_speed(args.size, args.reps), info)
  if 'tpu_temps' in parts:  # not in the default set: needs libtpu
    _write(f'tpu_temps_{args.tpu_tree}', bench_tpu_temps(args.tpu_tree), info)


if __name__ == '__main__':
  main()
