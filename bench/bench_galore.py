"""Benchmarks of the GaLore / OSD optimizer core (a script, not a test).

1. Projector refresh: exact float32 SVD vs randomized subspace iteration
   (cold and warm-started) vs ``optax.contrib.galore``'s refresh, for a
   LLaMA-7B MLP matrix (4096 x 11008, rank 1024) and the LLaMA-130m shapes
   (768 x 768, 768 x 2048, 2048 x 768, rank 256), with the captured energy
   ``||P^T G||_F^2 / ||G||_F^2`` of each projector.
2. Optimizer update time relative to ``optax.adamw`` on a parameter tree with
   the LLaMA-130m shapes, amortised over the refresh gap for GaLore and Fira,
   every step for OSD, APOLLO (rank 256) and APOLLO-Mini (rank 1, whose
   Gaussian projectors are drawn at every step), measured side by side in
   one run.

Times are medians (and minima) after ahead-of-time compilation (compile time
is never timed), with the compared cases timed round-robin so that load on a
shared machine hits them alike; the 4096 x 11008 cases run once
(``--big-reps``).

Usage::

  python bench/bench_galore.py --quick   # 130m refresh shapes, 2-layer tree
  python bench/bench_galore.py           # everything

On a shared CPU machine run with ``OPENBLAS_NUM_THREADS=1``: jaxlib's CPU
LAPACK (SVD/QR/eigh) uses scipy's OpenBLAS, whose busy-waiting threads make
some refreshes 20x slower when the cores are oversubscribed.

3. Optimizer state bytes at LLaMA-1b (bf16 weights) as the trainer builds it,
   per method, relative to AdamW's (exact: shapes and dtypes, no compile).

Writes ``bench/results/galore_refresh[_quick].json``,
``bench/results/galore_update[_quick].json`` and ``bench/results/state_1b.json``.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from _common import RESULTS, meta, offline_data, set_dotted, write_json
from lowrank_jax import optim
from lowrank_jax.optim import projection as P


def _compile(fn, *args):
  t0 = time.perf_counter()
  c = jax.jit(fn).lower(*args).compile()
  return c, time.perf_counter() - t0


# ---------------------------------------------------------------------------
# 1. Refresh.


def synthetic_gradient(key, m, n, exponent=0.75, k=None, noise=0.05):
  """``X diag(s) Y / sqrt(k) + noise`` with ``s_i = (1 + i)^-exponent``: a
  gradient-like matrix with a power-law spectrum (Gaussian ``X``, ``Y``) and
  white noise holding ``noise`` of the energy."""
  k = k or min(m, n) // 2
  k1, k2, k3 = jax.random.split(key, 3)
  s = (1.0 + jnp.arange(k, dtype=jnp.float32)) ** -exponent

  @jax.jit
  def make(k1, k2, k3):
    x = jax.random.normal(k1, (m, k)) * s
    g = x @ jax.random.normal(k2, (k, n)) / jnp.sqrt(k * 1.0)
    e = jax.random.normal(k3, (m, n))
    scale = jnp.sqrt(noise / (1 - noise) * jnp.sum(g**2) / jnp.sum(e**2))
    return g + scale * e

  return make(k1, k2, k3)


def _interleaved(cases, reps):
  """Times ``{name: (compiled, args)}`` round-robin, ``reps`` rounds, so that
  load drifts on a shared machine hit every case alike. Returns
  ``{name: (median_s, min_s, output)}``."""
  times = {k: [] for k in cases}
  outs = {}
  for _ in range(reps):
    for name, (c, args) in cases.items():
      t0 = time.perf_counter()
      outs[name] = jax.block_until_ready(c(*args))
      times[name].append(time.perf_counter() - t0)
  return {k: (statistics.median(v), min(v), outs[k]) for k, v in times.items()}


def bench_refresh(shape, rank, reps, key):
  n_in, n_out = shape  # a Flax (in, out) kernel
  g = synthetic_gradient(key, n_in, n_out)
  g_prev = synthetic_gradient(jax.random.fold_in(key, 1), n_in, n_out)
  g_prev = 0.5 * g_prev + g  # a correlated earlier gradient for the warm start
  side = P.projection_sides('std', n_in, n_out)[0]
  r = P.effective_rank(rank, n_in, n_out)
  a = g if side == 'in' else g.T
  a_prev = g_prev if side == 'in' else g_prev.T
  rk = jax.random.PRNGKey(0)
  cases, info = {}, {}

  # Exact SVD (ours; the 'std' side).
  f_svd = lambda g: P.svd_projectors(g, ((side, r),))[side]
  c, ct = _compile(f_svd, g)
  cases['svd (ours, std)'] = (c, (g,))
  info['svd (ours, std)'] = (side, ct)

  for n_iter, oversample in ((2, 8), (1, 8)):
    f = functools.partial(P.randomized_projector, rank=r, oversample=oversample,
                          n_iter=n_iter)
    name = f'randomized cold (n_iter={n_iter}, p={oversample})'
    c, ct = _compile(lambda a, k: f(a, key=k), a, rk)
    cases[name] = (c, (a, rk))
    info[name] = (side, ct)
    # Warm start: the previous refresh's projector (of the correlated g_prev).
    p_prev = c(a_prev, rk)
    name = f'randomized warm (n_iter={n_iter}, p={oversample})'
    c, ct = _compile(lambda a, k, p: f(a, key=k, prev=p), a, rk, p_prev)
    cases[name] = (c, (a, rk, p_prev))
    info[name] = (side, ct)

  # optax.contrib.galore: its update at a refresh step (SVD + project + Adam),
  # on the stored (rows, cols) array; it compresses the larger dim.
  opt = optax.contrib.scale_by_galore(rank=rank, update_proj_gap=200)
  st = opt.init({'w': g})
  c, ct = _compile(lambda u, s: opt.update(u, s)[1].projector['w'], {'w': g}, st)
  name = 'optax.contrib.galore refresh'
  cases[name] = (c, ({'w': g}, st))
  info[name] = ('in' if n_in >= n_out else 'out', ct)

  res = _interleaved(cases, reps)
  energy = jax.jit(P.captured_energy)
  # The best achievable: the exact top-r subspace (same energy on both sides).
  best = float(energy(g, {side: res['svd (ours, std)'][2]}))
  rows = []
  for name, (med, mn, p) in res.items():
    side_, ct = info[name]
    e = float(energy(g, {side_: p}))
    rows.append(dict(shape=f'{n_in}x{n_out}', rank=r, method=name, side=side_,
                     seconds=med, min_seconds=mn, compile_s=ct, energy=e,
                     energy_vs_svd=e / best))
  return rows


# ---------------------------------------------------------------------------
# 2. Update time on the LLaMA-130m tree.


def llama_tree(layers=12, d=768, ff=2048, vocab=32128):
  tree = {'embed': {'embedding': (vocab, d)}, 'final_norm': {'scale': (d,)},
          'head': {'kernel': (d, vocab)}, 'layers': {}}
  for i in range(layers):
    tree['layers'][str(i)] = {
        'attn': {n: {'kernel': (d, d)} for n in 'qkvo'},
        'mlp': {'gate': {'kernel': (d, ff)}, 'up': {'kernel': (d, ff)},
                'down': {'kernel': (ff, d)}},
        'attn_norm': {'scale': (d,)}, 'mlp_norm': {'scale': (d,)},
    }
  is_shape = lambda x: isinstance(x, tuple)
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_shape)
  keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
  params = treedef.unflatten(
      [0.02 * jax.random.normal(k, s) for k, s in zip(keys, leaves)])
  grads = treedef.unflatten(
      [jax.random.normal(jax.random.fold_in(k, 1), s) for k, s in zip(keys, leaves)])
  return params, grads


def _nfloats(tree):
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def bench_update(layers, rank, gap, reps, refresh_reps):
  """Steps each optimizer for real (state buffers donated, as a trainer
  would), round-robin across optimizers."""
  params, grads = llama_tree(layers=layers)
  n_params = _nfloats(params)
  opts = {
      'adamw': optax.adamw(1e-3, weight_decay=0.0),
      'galore svd': optim.galore(learning_rate=1e-3, rank=rank, update_proj_gap=gap, scale=0.25),
      'galore randomized': optim.galore(learning_rate=1e-3, rank=rank, update_proj_gap=gap,
                                        scale=0.25, refresh='randomized'),
      'osd': optim.osd(learning_rate=1e-3, rank=rank, scale=0.25),
      'fira': optim.fira(learning_rate=1e-3, rank=rank, update_proj_gap=gap, scale=0.25),
      'apollo': optim.apollo(learning_rate=1e-3, rank=rank, update_proj_gap=gap),
      'apollo_mini': optim.apollo_mini(learning_rate=1e-3, update_proj_gap=gap),
  }
  # Methods whose refresh is a decomposition at count 0, gap, 2 gap, ...:
  # their time is amortised over the gap.
  refreshing = ('galore svd', 'galore randomized', 'fira')
  if reps >= gap:
    raise ValueError('reps must be < gap (steady steps must not refresh)')
  compiled, states, rows = {}, {}, {}
  for name, opt in opts.items():
    state = opt.init(params)
    n_state = _nfloats(state)
    t0 = time.perf_counter()
    c = jax.jit(opt.update, donate_argnums=(1,)).lower(grads, state, params).compile()
    ct = time.perf_counter() - t0
    # First call: count 0 (GaLore refresh, OSD's SVD init).
    t0 = time.perf_counter()
    _, states[name] = jax.block_until_ready(c(grads, state, params))
    first = time.perf_counter() - t0
    compiled[name] = c
    rows[name] = dict(optimizer=name, compile_s=ct, first_step_s=first,
                      state_floats=n_state, param_floats=n_params)
    print(f'  compiled {name} ({ct:.1f} s), first step {first:.2f} s', flush=True)
  times = {k: [] for k in opts}
  for _ in range(reps):
    for name, c in compiled.items():
      t0 = time.perf_counter()
      _, states[name] = jax.block_until_ready(c(grads, states[name], params))
      times[name].append(time.perf_counter() - t0)
  for name, v in times.items():
    rows[name].update(step_s=statistics.median(v), step_min_s=min(v))
  del states
  for name, opt in opts.items():
    if name not in refreshing:
      continue
    v = []
    for _ in range(refresh_reps):
      fresh = opt.init(params)  # count 0: a refresh step
      t0 = time.perf_counter()
      jax.block_until_ready(compiled[name](grads, fresh, params))
      v.append(time.perf_counter() - t0)
    rows[name]['refresh_step_s'] = statistics.median(v) if v else rows[name]['first_step_s']
  for name, row in rows.items():
    if name in refreshing:
      t_ref = row['refresh_step_s']
      row['amortised_s'] = ((gap - 1) * row['step_s'] + t_ref) / gap
      row['amortised_min_s'] = ((gap - 1) * row['step_min_s'] + t_ref) / gap
    else:
      row['amortised_s'] = row['step_s']
      row['amortised_min_s'] = row['step_min_s']
  base, base_min = rows['adamw']['amortised_s'], rows['adamw']['amortised_min_s']
  for row in rows.values():
    row['ratio_vs_adamw'] = row['amortised_s'] / base
    row['ratio_vs_adamw_min'] = row['amortised_min_s'] / base_min
  return list(rows.values())


# ---------------------------------------------------------------------------
# 3. Optimizer state at 1b, as the trainer builds it.

STATE_CASES = [
    ('adamw', {'optimizer.name': 'adamw'}),
    ('galore rank 256', {'optimizer.name': 'galore', 'optimizer.galore.rank': 256}),
    ('galore rank 512', {'optimizer.name': 'galore', 'optimizer.galore.rank': 512}),
    ('apollo rank 256', {'optimizer.name': 'apollo', 'optimizer.apollo.rank': 256}),
    ('apollo rank 512', {'optimizer.name': 'apollo', 'optimizer.apollo.rank': 512}),
    ('apollo_mini', {'optimizer.name': 'apollo_mini'}),
    ('fira rank 512', {'optimizer.name': 'fira', 'optimizer.fira.rank': 512}),
    ('sgd', {'optimizer.name': 'sgd'}),
]


def bench_state_1b():
  """Bytes of the optimizer state the trainer builds for configs/llama_1b_galore.py (bf16
  weights) with each method: exact (the abstract state's shapes and dtypes), no compile."""
  from configs import llama_1b_galore
  from lowrank_jax.train.config import resolve
  from lowrank_jax.train.setup import build_setup, vocab_size_of

  rows = []
  for name, overrides in STATE_CASES:
    config = llama_1b_galore.get_config()
    offline_data(config)  # the recipe's T5 vocabulary, offline
    for key, value in overrides.items():
      set_dotted(config, key, value)
    run = resolve(config)
    setup = build_setup(run, vocab_size_of(run))
    leaves = jax.tree.leaves(setup.abstract_state.opt_state)
    rows.append({'method': name, 'state_bytes': int(sum(x.size * x.dtype.itemsize for x in leaves))})
    print(f'  {name}: {rows[-1]["state_bytes"] / 2**20:,.1f} MiB', flush=True)
  base = rows[0]['state_bytes']
  for row in rows:
    row['ratio_vs_adamw'] = row['state_bytes'] / base
  return rows


# ---------------------------------------------------------------------------


def _table(rows, cols, fmts):
  head = ' | '.join(cols)
  lines = [head, ' | '.join('-' * len(c) for c in cols)]
  for r in rows:
    lines.append(' | '.join(fmts[c](r[c]) if c in r else '-' for c in cols))
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--quick', action='store_true', help='130m refresh shapes, 2-layer tree')
  ap.add_argument('--reps', type=int, default=None, help='timed runs (median)')
  ap.add_argument('--big-reps', type=int, default=1, help='timed runs for 4096x11008')
  ap.add_argument('--layers', type=int, default=None)
  ap.add_argument('--gap', type=int, default=200)
  ap.add_argument('--refresh-reps', type=int, default=1,
                  help='timed GaLore refresh steps (0: use the first step)')
  ap.add_argument('--skip-refresh', action='store_true')
  ap.add_argument('--skip-update', action='store_true')
  ap.add_argument('--skip-state', action='store_true')
  args = ap.parse_args()
  reps = args.reps or (3 if args.quick else 5)
  layers = args.layers or (2 if args.quick else 12)
  suffix = '_quick' if args.quick else ''
  # jaxlib's CPU LAPACK (SVD, QR, eigh) runs on scipy's OpenBLAS; on a
  # shared machine its threads busy-wait and a refresh can take 20x
  # longer. The figures in the report were taken with 1 thread.
  info = meta(args, OPENBLAS_NUM_THREADS=os.environ.get('OPENBLAS_NUM_THREADS'))
  print(f'backend={info["device"]["platform"]} cpus={info["cpu_count"]} jax={info["versions"]["jax"]}')

  if not args.skip_refresh:
    cases = [((768, 768), 256), ((768, 2048), 256), ((2048, 768), 256)]
    if not args.quick:
      cases.append(((4096, 11008), 1024))
    rows = []
    for i, (shape, rank) in enumerate(cases):
      big = shape[0] * shape[1] > 10_000_000
      print(f'refresh {shape} rank {rank} ...', flush=True)
      rows += bench_refresh(shape, rank, args.big_reps if big else reps,
                            jax.random.PRNGKey(10 + i))
    print()
    print(_table(rows, ['shape', 'rank', 'method', 'side', 'seconds', 'min_seconds',
                        'energy', 'energy_vs_svd'],
                 {'shape': str, 'rank': str, 'method': str, 'side': str,
                  'seconds': lambda v: f'{v*1e3:.1f} ms',
                  'min_seconds': lambda v: f'{v*1e3:.1f} ms',
                  'energy': lambda v: f'{v:.4f}',
                  'energy_vs_svd': lambda v: f'{v:.4f}'}))
    write_json(os.path.join(RESULTS, f'galore_refresh{suffix}.json'), {'rows': rows}, meta=info)

  if not args.skip_update:
    print(f'\nupdate time, LLaMA-130m shapes, {layers} layers, rank 256, gap {args.gap}')
    rows = bench_update(layers, 256, args.gap, reps, args.refresh_reps)
    print()
    print(_table(rows, ['optimizer', 'step_s', 'step_min_s', 'refresh_step_s',
                        'amortised_s', 'ratio_vs_adamw', 'ratio_vs_adamw_min',
                        'state_floats'],
                 {'optimizer': str,
                  'step_s': lambda v: f'{v*1e3:.1f} ms',
                  'step_min_s': lambda v: f'{v*1e3:.1f} ms',
                  'ratio_vs_adamw_min': lambda v: f'{v:.2f}',
                  'refresh_step_s': lambda v: f'{v*1e3:.1f} ms',
                  'amortised_s': lambda v: f'{v*1e3:.1f} ms',
                  'ratio_vs_adamw': lambda v: f'{v:.2f}',
                  'state_floats': lambda v: f'{v/1e6:.1f} M'}))
    write_json(os.path.join(RESULTS, f'galore_update{suffix}.json'),
               {'layers': layers, 'rank': 256, 'gap': args.gap, 'rows': rows}, meta=info)


  if not args.skip_state:
    print('\noptimizer state, LLaMA-1b (configs/llama_1b_galore.py, bf16 weights)')
    rows = bench_state_1b()
    print()
    print(_table(rows, ['method', 'state_bytes', 'ratio_vs_adamw'],
                 {'method': str, 'state_bytes': lambda v: f'{v / 2**20:,.1f} MiB',
                  'ratio_vs_adamw': lambda v: f'{v:.3f}'}))
    write_json(os.path.join(RESULTS, 'state_1b.json'), {'rows': rows}, meta=info)


if __name__ == '__main__':
  main()
