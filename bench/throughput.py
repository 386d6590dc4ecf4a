"""Throughput of the trainer's step: tokens/s and step time per method and size (a script, not a test).

Every figure times the trainer's own compiled step (`lowrank_jax.train.setup.build_setup`: the
program `train.py` runs, clipping and metrics included), compiled ahead of time so compilation
is never timed, on random tokens (data loading is not part of the step).

CPU (the default): methods x sizes in float32, round-robin in ONE process (interleaved: load
from other processes hits every case alike), with the PyTorch peer (`bench/torch_peer.py`:
transformers' LlamaForCausalLM, torch AdamW, galore-torch) stepped in the same rounds when its
packages are importable (`pip install -e ".[peers]"`, or `--peer-python` of another venv).
Ratios are taken per round and reported as median [min, max] over the rounds.
A refresh step (GaLore: the trainer's refresh program, SVDs on the step's gradients, then the
step, every `update_proj_gap` steps) is timed by running the case with a short gap (the same
compiled programs), and the step amortised over the paper's gap of 200 is
`(refresh + 199 * step) / 200`. `--decomposition-threads` times the refresh with the LAPACK
library's default threads and with the trainer's one thread, with and without a parallel load.

GPU (`--target gpu`): LLaMA-1b, each case in its own process (its own device-memory peak, and
one failure or timeout costs only that case), with MFU from the model FLOPs (6 N tokens +
12 L d T tokens, PaLM's formula, N = the matmul parameters) and XLA's `cost_analysis()`,
device memory (`memory_stats()` peak, and the compiled program's `memory_analysis()`), bf16
against float32. Steady-state steps are timed: the refresh program (GaLore's SVDs, OSD's first
step) is not run, which the step's program does not depend on, and the SVD refresh is timed on
its own (one decomposition of each matrix shape, times the number of such matrices).

  python bench/throughput.py                      # CPU: 60m (all methods) and 130m (AdamW, GaLore)
  python bench/throughput.py --quick              # CPU: 60m AdamW/GaLore/peer, 3 rounds
  python bench/throughput.py --decomposition-threads --refresh-size 60m
  python bench/throughput.py --target gpu --budget 240 --out DIR    # bench/gpu_session.sh runs this
  python bench/throughput.py --target gpu --dry-run   # the GPU code path at toy sizes, on CPU

Writes bench/results/throughput_<target>[_quick].json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from _common import RESULTS, ROOT, T5_VOCAB, get_dotted, has_dotted, meta, set_dotted, write_json

# Method variants: label -> config overrides (keys of configs/base.py).
VARIANTS: dict[str, dict[str, Any]] = {
    'adamw': {'optimizer.name': 'adamw'},
    'galore': {'optimizer.name': 'galore', 'optimizer.galore.refresh': 'svd'},
    'galore_rand': {'optimizer.name': 'galore', 'optimizer.galore.refresh': 'randomized'},
    'osd': {'optimizer.name': 'osd'},
    'lora': {'optimizer.name': 'lora'},
    'velora': {'optimizer.name': 'adamw', 'model.velora.layers': 'o:8,down:16'},
    'apollo': {'optimizer.name': 'apollo'},
    'apollo_mini': {'optimizer.name': 'apollo_mini'},
    'fira': {'optimizer.name': 'fira'},
}
# Method settings that follow the model size, as the papers' configs (GaLore/OSD rank 512 at 1b).
RANK_AT_SIZE = {'1b': 512, '7b': 1024}
# Real refresh gap the amortised figure is for (the GaLore paper's 200).
PAPER_GAP = 200
# Dtype labels -> (compute dtype, parameter dtype).
DTYPES = {'float32': ('float32', 'float32'), 'bf16': ('bfloat16', 'bfloat16'), 'mixed': ('bfloat16', 'float32')}

# Dense peak TFLOP/s per chip (bf16, and float32 matmuls as XLA runs them on the chip: TF32 on
# NVIDIA Ampere and later) by a substring of `device_kind`. Override with --peak-tflops.
PEAK_TFLOPS = {
    'H200': (989.0, 494.0), 'H100': (989.0, 494.0), 'H800': (989.0, 494.0), 'GH200': (989.0, 494.0),
    'B200': (2250.0, 1100.0), 'A100': (312.0, 156.0), 'A800': (312.0, 156.0), 'L40S': (362.0, 183.0),
    'L4': (121.0, 60.0), 'A10': (125.0, 62.5), 'V100': (125.0, 15.7),
}


@dataclasses.dataclass(frozen=True)
class Case:
  variant: str
  size: str
  dtype: str = 'float32'
  batch: int = 8
  seq: int = 256
  gap: int = 0  # measurement refresh gap (0: the method's default)

  @property
  def name(self) -> str:
    return f'{self.variant}-{self.size}-{self.dtype}'

  @property
  def tokens(self) -> int:
    return self.batch * self.seq


def method_of(variant: str) -> str:
  return VARIANTS[variant]['optimizer.name']


def registered(variant: str) -> bool:
  from lowrank_jax.train.methods import method_names

  return method_of(variant) in method_names()


def gap_key(config, method: str) -> str | None:
  key = f'optimizer.{method}.update_proj_gap'
  return key if has_dotted(config, key) else None


def case_config(case: Case):
  """The trainer config of a case: configs/base.py defaults, then the case's shape and method."""
  from configs import base

  config = base.get_config()
  compute, params = DTYPES[case.dtype]
  for key, value in {'model.size': case.size, 'model.dtype': compute, 'model.param_dtype': params,
                     'data.seq_len': case.seq, 'train.batch_size': case.batch, 'train.grad_accum': 1,
                     'train.steps': 10_000, **VARIANTS[case.variant]}.items():
    set_dotted(config, key, value)
  method = method_of(case.variant)
  if case.size in RANK_AT_SIZE and has_dotted(config, f'optimizer.{method}.rank') and method != 'lora':
    set_dotted(config, f'optimizer.{method}.rank', RANK_AT_SIZE[case.size])
  key = gap_key(config, method)
  if case.gap and key:
    set_dotted(config, key, case.gap)
  return config


def real_gap(case: Case) -> int | None:
  """The refresh gap of the method's own config (what the amortised figure is for)."""
  from configs import base

  key = gap_key(base.get_config(), method_of(case.variant))
  return PAPER_GAP if key else None


def model_flops_per_step(case: Case, vocab: int) -> float:
  """6 N tokens + 12 L d T tokens (PaLM appendix B), N = matmul parameters of the dense model."""
  from lowrank_jax import models
  from lowrank_jax.train.model import padded_vocab

  dims = models.LLAMA_SIZES[case.size]
  d, ff, layers = dims['d_model'], dims['d_ff'], dims['n_layers']
  n = layers * (4 * d * d + 3 * d * ff) + d * padded_vocab(vocab, 128)
  return 6.0 * n * case.tokens + 12.0 * layers * d * case.seq * case.tokens


def advance_counts(opt_state, to: int = 1):
  """The optimizer state with every scalar integer `count` set to `to` (timing harness only).

  Steady-state steps then skip the step-0 branch of `lax.cond`s (an in-step initial SVD), and
  subspace methods' `next_refresh` is pushed out of reach; the program and its cost per step
  are those of every later non-refresh step.
  """
  import jax
  import jax.numpy as jnp

  def fix(path, x):
    last = path[-1] if path else None
    name = getattr(last, 'name', getattr(last, 'key', None))
    if getattr(x, 'ndim', None) == 0 and jnp.issubdtype(x.dtype, jnp.integer):
      if name == 'count':
        return jnp.full_like(x, to)
      if name == 'next_refresh':  # subspace methods: no refresh due while timing
        return jnp.full_like(x, 2**30)
    return x

  return jax.tree_util.tree_map_with_path(fix, opt_state)


class StepRunner:
  """One case's compiled trainer step, its state and a fixed batch, stepped as the trainer's loop does.

  Methods with a split refresh (GaLore, OSD, Fira: `setup.compiled_refresh`) run the refresh
  program before the step whenever it is due; a refresh step's time includes it.
  """

  def __init__(self, case: Case, vocab: int, *, skip_first_refresh: bool = False, seed: int = 0):
    import jax
    import numpy as np

    from lowrank_jax.train.config import resolve
    from lowrank_jax.train.setup import build_setup, init_state

    self.case = case
    config = case_config(case)
    self.gap = None
    key = gap_key(config, method_of(case.variant))
    if key:
      self.gap = int(get_dotted(config, key))
    self.setup = setup = build_setup(resolve(config), vocab)
    self.state = init_state(setup, vocab)
    self.count = 0  # optimizer steps taken by this state
    self.skip_refresh = skip_first_refresh
    if skip_first_refresh:  # in-step refreshes are due at count 0; a split refresh is never run
      self.state = self.state._replace(opt_state=advance_counts(self.state.opt_state, 1))
      self.count = 1
    t0 = time.perf_counter()
    abstract = (setup.abstract_state, setup.abstract_tokens())
    self.compiled = setup.compiled_step.lower(*abstract).compile()
    refresh = getattr(setup, 'compiled_refresh', None)
    self.refresh = refresh.lower(*abstract).compile() if refresh is not None and not skip_first_refresh else None
    self.compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    self.tokens = setup.step_tokens(rng.integers(0, vocab, setup.tokens_shape, dtype=np.int32))
    jax.block_until_ready(self.tokens)
    self.metrics = None

  def is_refresh(self) -> bool:
    """Whether the next step refreshes the projectors (asked before timing it)."""
    if self.refresh is not None:
      return self.setup.steps_to_refresh(self.state) == 0
    return not self.skip_refresh and bool(self.gap) and self.count % self.gap == 0

  def step(self) -> float:
    import jax

    refresh = self.refresh is not None and self.is_refresh()
    t0 = time.perf_counter()
    if refresh:
      self.state = self.refresh(self.state, self.tokens)
    self.state, self.metrics = self.compiled(self.state, self.tokens)
    jax.block_until_ready((self.state, self.metrics))
    self.count += 1
    return time.perf_counter() - t0

  def memory_analysis(self) -> dict[str, int]:
    stats = self.compiled.memory_analysis()
    if stats is None:
      return {}
    out = {k: int(getattr(stats, k + '_in_bytes', 0) or 0)
           for k in ('argument_size', 'output_size', 'alias_size', 'temp_size', 'peak_memory')}
    out['live_estimate'] = out['argument_size'] + out['temp_size'] + out['output_size'] - out['alias_size']
    return out

  def cost_flops(self) -> float | None:
    try:
      cost = self.compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (not every backend reports it)
      return None
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    return float(cost['flops']) if cost and 'flops' in cost else None


def _median(xs):
  return statistics.median(xs) if xs else None


def _meta(args) -> dict[str, Any]:
  return meta(args, XLA_FLAGS=os.environ.get('XLA_FLAGS', ''),
              OPENBLAS_NUM_THREADS=os.environ.get('OPENBLAS_NUM_THREADS'))


# ---------------------------------------------------------------------------------------------
# GPU: one process per case.

def peak_tflops(device_kind: str, dtype: str, override: float | None) -> float | None:
  if override:
    return override
  for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      bf16, f32 = PEAK_TFLOPS[key]
      return f32 if dtype == 'float32' else bf16
  return None


def run_one(case: Case, args) -> dict[str, Any]:
  """Compile, warm up and time one case in this process (the GPU child)."""
  import jax

  t_start = time.perf_counter()
  runner = StepRunner(case, args.vocab, skip_first_refresh=True)
  t_setup = time.perf_counter() - t_start - runner.compile_s
  first = runner.step()  # first run of the executable (allocations, autotuned kernels loaded)
  times = []
  deadline = time.perf_counter() + args.measure_s
  while len(times) < args.steps and (len(times) < 3 or time.perf_counter() < deadline):
    if runner.is_refresh():
      break  # a refresh step is not a steady-state step
    times.append(runner.step())
  dev = jax.devices()[0]
  stats = dev.memory_stats() or {}
  step_s = _median(times)
  flops = model_flops_per_step(case, args.vocab)
  peak = peak_tflops(dev.device_kind, case.dtype, args.peak_tflops)
  out = {
      'case': case.name, 'variant': case.variant, 'method': method_of(case.variant), 'size': case.size,
      'dtype': case.dtype, 'batch': case.batch, 'seq': case.seq, 'tokens_per_step': case.tokens,
      'setup_s': t_setup, 'compile_s': runner.compile_s, 'first_step_s': first,
      'step_s': step_s, 'step_s_min': min(times), 'step_s_all': times,
      'tokens_per_s': case.tokens / step_s,
      'model_flops_per_step': flops,
      'cost_analysis_flops': runner.cost_flops(),
      'model_tflops_per_s': flops / step_s / 1e12,
      'peak_tflops': peak,
      'mfu': (flops / step_s / 1e12 / peak) if peak else None,
      'memory_stats_peak_bytes': stats.get('peak_bytes_in_use'),
      'memory_stats_in_use_bytes': stats.get('bytes_in_use'),
      'memory_stats_limit_bytes': stats.get('bytes_limit'),
      'memory_analysis': runner.memory_analysis(),
      'loss': float(runner.metrics['loss']) if runner.metrics is not None else None,
  }
  return out


def svd_refresh_estimate(size: str, rank_cap: int, vocab: int, args) -> dict[str, Any]:
  """Time one float32 SVD per distinct matrix shape of the projected linears and add them up.

  GaLore's SVD refresh (and OSD's first step) decomposes every projected matrix once; on an
  accelerator these run one after another, so the sum over the layers is the refresh's cost.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from lowrank_jax import models

  dims = models.LLAMA_SIZES[size]
  d, ff, layers = dims['d_model'], dims['d_ff'], dims['n_layers']
  shapes = {(d, d): 4 * layers, (d, ff): 2 * layers, (ff, d): layers}
  rows, total = [], 0.0
  for shape, n in shapes.items():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
    f = jax.jit(lambda a: jnp.linalg.svd(a, full_matrices=False)).lower(x).compile()
    jax.block_until_ready(f(x))
    ts = []
    for _ in range(3):
      t0 = time.perf_counter()
      jax.block_until_ready(f(x))
      ts.append(time.perf_counter() - t0)
    t = min(ts)
    rows.append({'shape': list(shape), 'count': n, 'svd_s': t})
    total += n * t
  return {'case': f'svd-refresh-{size}', 'size': size, 'shapes': rows, 'refresh_svd_s_estimate': total}


def gpu_cases(args) -> list[Case]:
  size, batch, seq = args.gpu_size, args.batch, args.seq
  cases = [Case(v, size, dt, batch, seq) for v, dt in (
      ('adamw', 'bf16'), ('galore', 'bf16'), ('osd', 'bf16'), ('adamw', 'float32'), ('apollo', 'bf16'),
      ('apollo_mini', 'bf16'), ('lora', 'bf16'), ('fira', 'bf16'), ('adamw', 'mixed'))]
  if args.variants:
    wanted = args.variants.split(',')
    cases = [c for c in cases if c.variant in wanted or c.name in wanted]
  return [c for c in cases if registered(c.variant)]


def _child(argv: list[str], timeout: float, log) -> tuple[int, str]:
  """Run this script as a child in its own process group; kill the group on timeout."""
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1'})
  try:
    out, _ = proc.communicate(timeout=timeout)
    rc = proc.returncode
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    rc = 124
  log.write(out or '')
  log.flush()
  return rc, out or ''


def run_gpu(args) -> dict[str, Any]:
  import jax

  t_end = time.perf_counter() + args.budget
  result: dict[str, Any] = {'meta': _meta(args), 'cases': [], 'failed': [], 'skipped': []}
  out_path = args.out or os.path.join(RESULTS, 'throughput_gpu.json')
  log = open(args.log, 'a') if args.log else sys.stderr
  cases = gpu_cases(args)
  print(f'GPU set on {jax.devices()[0].device_kind}: {[c.name for c in cases]}', file=log, flush=True)
  jobs: list[tuple[str, list[str]]] = [(c.name, ['--one', json.dumps(dataclasses.asdict(c))]) for c in cases]
  if args.svd_estimate:
    jobs.insert(4, (f'svd-refresh-{args.gpu_size}', ['--svd-estimate-one', args.gpu_size]))
  for name, child_args in jobs:
    left = t_end - time.perf_counter()
    if left < 20:
      result['skipped'].append(name)
      continue
    tmp = f'{out_path}.{name}.part'
    argv = child_args + ['--json-out', tmp, '--vocab', str(args.vocab), '--steps', str(args.steps),
                         '--measure-s', str(args.measure_s)]
    if args.peak_tflops:
      argv += ['--peak-tflops', str(args.peak_tflops)]
    if args.dry_run:
      argv.append('--dry-run')
    t0 = time.perf_counter()
    print(f'--- {name} (timeout {min(args.case_timeout, left):.0f} s)', file=log, flush=True)
    rc, _ = _child(argv, min(args.case_timeout, left), log)
    wall = time.perf_counter() - t0
    if rc == 0 and os.path.exists(tmp):
      with open(tmp) as f:
        row = json.load(f)
      row['wall_s'] = wall
      result['cases'].append(row)
      os.remove(tmp)
    else:
      result['failed'].append({'case': name, 'rc': rc, 'wall_s': wall})
    _add_ratios(result)
    write_json(out_path, result)  # after every case: a later timeout keeps what was measured
  print(format_gpu(result), file=log, flush=True)
  print(format_gpu(result))
  return result


def _add_ratios(result) -> None:
  base = {(r['size'], r['dtype']): r for r in result['cases'] if r.get('variant') == 'adamw'}
  for r in result['cases']:
    ref = base.get((r.get('size'), r.get('dtype')))
    if ref and r.get('tokens_per_s'):
      r['tokens_per_s_vs_adamw'] = r['tokens_per_s'] / ref['tokens_per_s']


def format_gpu(result) -> str:
  info = result['meta']
  lines = [f"GPU throughput: {info['device']['kind']} (jax {info['versions']['jax']})",
           f"{'case':<26}{'batch x seq':>12}{'step ms':>10}{'tokens/s':>12}{'MFU':>7}{'vs AdamW':>10}"
           f"{'peak GiB':>10}{'compile s':>11}"]
  for r in result['cases']:
    if 'refresh_svd_s_estimate' in r:
      parts = ', '.join('%dx%d: %.0f ms x%d' % (*s['shape'], 1e3 * s['svd_s'], s['count']) for s in r['shapes'])
      lines.append(f"{r['case']:<26} SVD refresh estimate {r['refresh_svd_s_estimate']:.1f} s ({parts})")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get('mfu') else '-'
    ratio = f"{r['tokens_per_s_vs_adamw']:.2f}" if 'tokens_per_s_vs_adamw' in r else '-'
    peak = r.get('memory_stats_peak_bytes')
    peak = f'{peak / 2**30:.1f}' if peak else '-'
    lines.append(f"{r['case']:<26}{r['batch']:>5} x {r['seq']:<5}{1e3 * r['step_s']:>10.1f}"
                 f"{r['tokens_per_s']:>12,.0f}{mfu:>7}{ratio:>10}{peak:>10}{r['compile_s']:>11.1f}")
  for f in result['failed']:
    lines.append(f"{f['case']:<26} FAILED rc={f['rc']} after {f['wall_s']:.0f} s (see the log)")
  for s in result['skipped']:
    lines.append(f'{s:<26} skipped: out of budget')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------------
# CPU: every case of a size interleaved in one process, the PyTorch peer in a worker process.

class Peer:
  """The PyTorch worker (bench/torch_peer.py), stepped on request."""

  def __init__(self, python: str, size: str, batch: int, seq: int, vocab: int, cases: list[str], gap: int):
    cmd = [python, os.path.join(ROOT, 'bench', 'torch_peer.py'), '--size', size, '--batch', str(batch),
           '--seq', str(seq), '--vocab', str(vocab), '--cases', ','.join(cases), '--galore-gap', str(gap)]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.ready = self._reply()

  def _reply(self) -> dict:
    while True:  # skip anything a library prints on stdout
      line = self.proc.stdout.readline()
      if not line:
        raise RuntimeError('the PyTorch peer exited (see its stderr above)')
      if line.startswith('{'):
        return json.loads(line)

  def step(self, case: str) -> dict:
    self.proc.stdin.write(f'step {case}\n')
    self.proc.stdin.flush()
    return self._reply()

  def close(self) -> None:
    try:
      self.proc.stdin.write('quit\n')
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)
    except Exception:  # noqa: BLE001
      self.proc.kill()


def peer_available(python: str) -> dict:
  try:
    out = subprocess.run([python, os.path.join(ROOT, 'bench', 'torch_peer.py'), '--check'],
                         capture_output=True, text=True, check=True)
    return json.loads([line for line in out.stdout.splitlines() if line.startswith('{')][-1])
  except Exception as e:  # noqa: BLE001
    return {'torch': None, 'error': str(e)[:200]}


def run_cpu_size(size: str, variants: list[str], args, peer_info: dict) -> dict[str, Any]:
  """All cases of one size, stepped round-robin; per-round ratios to AdamW and to the peer."""
  gap = args.measure_gap
  cases = [Case(v, size, 'float32', args.batch, args.seq, gap=gap) for v in variants if registered(v)]
  runners: dict[str, StepRunner] = {}
  for case in cases:
    print(f'[{size}] compiling {case.name} ...', file=sys.stderr, flush=True)
    runners[case.variant] = StepRunner(case, args.vocab)
  peer_cases = []
  peer = None
  if peer_info.get('torch') and peer_info.get('transformers') and not args.no_peer:
    peer_cases = ['adamw'] + (['galore'] if peer_info.get('galore_torch') and 'galore' in variants else [])
    print(f'[{size}] starting the PyTorch peer ({",".join(peer_cases)}) ...', file=sys.stderr, flush=True)
    peer = Peer(args.peer_python, size, args.batch, args.seq, args.vocab, peer_cases, gap)
  # Per round: {label: (seconds, refresh?)}; labels 'ours:<variant>' and 'torch:<case>'.
  rounds: list[dict[str, tuple[float, bool]]] = []
  first: dict[str, float] = {}
  labels = [f'ours:{v}' for v in runners] + [f'torch:{c}' for c in peer_cases]

  def one(label: str) -> tuple[float, bool]:
    who, name = label.split(':')
    if who == 'ours':
      r = runners[name]
      refresh = r.is_refresh()
      return r.step(), refresh
    reply = peer.step(name)
    return reply['s'], name == 'galore' and reply['count'] % gap == 0

  for label in labels:  # step 0: first run; GaLore's first refresh
    first[label] = one(label)[0]
  for i in range(args.rounds):
    order = labels[i % len(labels):] + labels[:i % len(labels)]  # rotate: no fixed neighbour
    rounds.append({label: one(label) for label in order})
    print(f'[{size}] round {i + 1}/{args.rounds}: ' + ', '.join(
        f'{k} {v[0]:.2f}s{"*" if v[1] else ""}' for k, v in rounds[-1].items()), file=sys.stderr, flush=True)
  if peer:
    peer.close()
  return summarize_cpu(size, labels, rounds, first, runners, args)


def summarize_cpu(size, labels, rounds, first, runners, args) -> dict[str, Any]:
  tokens = args.batch * args.seq
  rows = {}
  for label in labels:
    steps = [r[label][0] for r in rounds if not r[label][1]]
    refresh = [r[label][0] for r in rounds if r[label][1]]
    row = {'label': label, 'step_s': _median(steps), 'step_s_min': min(steps) if steps else None,
           'step_s_all': steps, 'refresh_s': _median(refresh), 'refresh_s_all': refresh,
           'first_step_s': first[label]}
    who, name = label.split(':')
    if who == 'ours':
      row['compile_s'] = runners[name].compile_s
    if row['step_s']:
      row['tokens_per_s'] = tokens / row['step_s']
    if refresh and steps:
      row['amortised_step_s'] = (row['refresh_s'] + (PAPER_GAP - 1) * row['step_s']) / PAPER_GAP
    rows[label] = row

  def ratios(num: str, den: str, amortised: bool = False) -> dict[str, Any] | None:
    """Per-round step-time ratios num/den (rounds where neither refreshed), median [min, max]."""
    if num not in rows or den not in rows:
      return None
    per = [r[num][0] / r[den][0] for r in rounds if not r[num][1] and not r[den][1]]
    if not per:
      return None
    out = {'median': _median(per), 'min': min(per), 'max': max(per), 'n': len(per)}
    if amortised and rows[num].get('refresh_s'):
      ref = [r[num][0] / r[den][0] for r in rounds if r[num][1] and not r[den][1]]
      med_ref = _median(ref)
      out['refresh_over_den'] = med_ref
      out['amortised'] = (med_ref + (PAPER_GAP - 1) * out['median']) / PAPER_GAP
    return out

  for label, row in rows.items():
    who, name = label.split(':')
    same = f'{who}:adamw'
    if label != same:
      row['step_over_adamw'] = ratios(label, same, amortised=True)
    if who == 'ours':
      peer = f'torch:{name}'
      r = ratios(peer, label)  # their step / ours = our tokens/s / theirs
      if r:
        row['tokens_per_s_over_torch'] = r
  return {'size': size, 'batch': args.batch, 'seq': args.seq, 'vocab': args.vocab, 'rows': rows,
          'rounds': len(rounds), 'loadavg_end': os.getloadavg()}


def format_cpu(result) -> str:
  lines = [f"CPU throughput, float32, {result['meta']['cpu_count']} cores, load average at start "
           f"{result['meta']['loadavg_start'][0]:.1f}: median [min, max] of per-round ratios"]
  head = (f"{'size':<6}{'case':<20}{'ms/step':>9}{'tokens/s':>10}{'refresh ms':>11}"
          f"{'/ same AdamW':>24}{'amortised':>10}{'ours / torch':>24}")
  lines.append(head)
  fmt = lambda r: f"{r['median']:.2f} [{r['min']:.2f}, {r['max']:.2f}]" if r else '-'  # noqa: E731
  for s in result['sizes']:
    for label, row in s['rows'].items():
      ms = f"{1e3 * row['step_s']:,.0f}" if row['step_s'] else '-'
      tps = f"{row.get('tokens_per_s', 0):,.0f}"
      ref = f"{1e3 * row['refresh_s']:,.0f}" if row.get('refresh_s') else '-'
      adam = row.get('step_over_adamw')
      am = f"{adam['amortised']:.3f}" if adam and adam.get('amortised') else '-'
      lines.append(f"{s['size']:<6}{label:<20}{ms:>9}{tps:>10}{ref:>11}{fmt(adam):>24}{am:>10}"
                   f"{fmt(row.get('tokens_per_s_over_torch')):>24}")
  return '\n'.join(lines)


def run_cpu(args) -> dict[str, Any]:
  peer_info = peer_available(args.peer_python) if not args.no_peer else {'torch': None}
  result = {'meta': _meta(args), 'peer': peer_info, 'sizes': []}
  plan = [(s, v.split(',')) for s, v in (item.split(':') for item in args.plan.split(';'))]
  out_path = args.out or os.path.join(RESULTS, f"throughput_cpu{'_quick' if args.quick else ''}.json")
  for size, variants in plan:
    result['sizes'].append(run_cpu_size(size, variants, args, peer_info))
    write_json(out_path, result)
  print(format_cpu(result))
  print(f'wrote {out_path}')
  return result


# ---------------------------------------------------------------------------------------------
# Decomposition threads: GaLore's SVD refresh with the LAPACK library's default thread count and
# with one thread, each with and without a parallel CPU load (another process busy on every core).

LOAD_SCRIPT = ('import numpy as np\n'
               'a = np.random.default_rng(0).standard_normal((1024, 1024))\n'
               'while True:\n  a = np.tanh(a @ a)\n')


def refresh_child(size: str, reps: int) -> dict[str, Any]:
  """The trainer's GaLore (SVD) refresh (its refresh program, or the update at count 0 when the
  refresh is inside the update) and a plain optimizer update, on random gradients, in this process."""
  import jax
  import numpy as np

  from lowrank_jax.train.config import resolve
  from lowrank_jax.train.setup import build_setup

  setup = build_setup(resolve(case_config(Case('galore', size))), T5_VOCAB)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape, dtype=np.float32).astype(a.dtype),
                        setup.abstract_state.params)
  grads = jax.tree.map(lambda p: (0.01 * p).astype(p.dtype), params)
  state0 = jax.jit(setup.tx.init)(params)
  state1 = advance_counts(state0, 1)
  update = jax.jit(setup.tx.update).lower(grads, state1, params).compile()
  if getattr(setup, 'compiled_refresh', None) is not None:  # the trainer's split refresh: its own program
    from lowrank_jax import optim

    refresh = jax.jit(lambda g, s, p: optim.refresh_projectors(setup.tx, g, s, p)).lower(grads, state0, params).compile()
  else:  # refresh inside the update at count 0
    refresh = update
  out = {'refresh_s': [], 'update_s': []}  # compiled ahead of time: the first call is timed too
  for _ in range(reps):
    for key, fn, state in (('refresh_s', refresh, state0), ('update_s', update, state1)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(grads, state, params))
      out[key].append(time.perf_counter() - t0)
  return {k: min(v) for k, v in out.items()} | {'all': out}


def run_decomposition_threads(args) -> dict[str, Any]:
  """Refresh time per (LAPACK threads, extra load) setting, settings alternated over repetitions."""
  # OpenBLAS's default is one thread per core; the trainer's choice (lapack_threads.py) is 1.
  settings = [(threads, load) for threads in ('default', '1') for load in (False, True)]
  run_meta = _meta(args)  # the load average before the measurement
  rows: dict[str, list] = {f'{t}/{"load" if l else "no load"}': [] for t, l in settings}
  for rep in range(args.rounds):
    for threads, load in settings[rep % 4:] + settings[:rep % 4]:
      env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
      env['OPENBLAS_NUM_THREADS'] = str(os.cpu_count()) if threads == 'default' else threads
      loader = subprocess.Popen([sys.executable, '-c', LOAD_SCRIPT], start_new_session=True) if load else None
      try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--refresh-one', args.refresh_size],
                              env=env, capture_output=True, text=True)
      finally:
        if loader:
          os.killpg(loader.pid, signal.SIGKILL)
          loader.wait()
      if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
      row = json.loads(proc.stdout.strip().splitlines()[-1])
      row['loadavg'] = os.getloadavg()[0]
      rows[f'{threads}/{"load" if load else "no load"}'].append(row)
      print(f'[refresh {args.refresh_size}] threads {threads}, extra load {load}: refresh {row["refresh_s"]:.2f} s, '
            f'update {row["update_s"]:.2f} s (load average {row["loadavg"]:.1f})', file=sys.stderr, flush=True)
  summary = {}
  for key, rs in rows.items():
    summary[key] = {'refresh_s': _median([r['refresh_s'] for r in rs]), 'update_s': _median([r['update_s'] for r in rs])}
  for threads in ('default', '1'):
    quiet, loaded = summary[f'{threads}/no load'], summary[f'{threads}/load']
    summary[f'{threads}: load / no load'] = loaded['refresh_s'] / quiet['refresh_s']
  result = {'meta': run_meta, 'size': args.refresh_size, 'rows': rows, 'summary': summary}
  out_path = args.out or os.path.join(RESULTS, f'refresh_threads_{args.refresh_size}.json')
  write_json(out_path, result)
  print(json.dumps(summary, indent=1))
  print(f'wrote {out_path}')
  return result


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--target', choices=('cpu', 'gpu'), default=None, help='default: the JAX backend')
  p.add_argument('--quick', action='store_true', help='CPU: 60m AdamW and GaLore (+ peer), 3 rounds')
  p.add_argument('--plan', default='60m:adamw,galore,galore_rand,osd,lora,velora,apollo,apollo_mini,fira;'
                 '130m:adamw,galore', help='CPU: "size:variant,...;size:..."')
  p.add_argument('--rounds', type=int, default=6)
  p.add_argument('--measure-gap', type=int, default=3,
                 help='CPU: refresh gap while measuring (refresh every N steps; amortised over %d)' % PAPER_GAP)
  p.add_argument('--batch', type=int, default=None)
  p.add_argument('--seq', type=int, default=None)
  p.add_argument('--vocab', type=int, default=T5_VOCAB)
  p.add_argument('--peer-python', default=sys.executable, help='python with torch + transformers (+ galore-torch)')
  p.add_argument('--no-peer', action='store_true')
  p.add_argument('--out', default=None, help='JSON path (default bench/results/throughput_<target>.json)')
  p.add_argument('--log', default=None, help='GPU: append the children\'s output here')
  p.add_argument('--gpu-size', default='1b')
  p.add_argument('--variants', default='', help='GPU: only these variants or case names')
  p.add_argument('--budget', type=float, default=420.0, help='GPU: seconds for the whole set')
  p.add_argument('--case-timeout', type=float, default=100.0, help='GPU: seconds per case')
  p.add_argument('--steps', type=int, default=10, help='GPU: timed steps per case (at most)')
  p.add_argument('--measure-s', type=float, default=8.0, help='GPU: timed seconds per case (at most)')
  p.add_argument('--peak-tflops', type=float, default=None)
  p.add_argument('--svd-estimate', action=argparse.BooleanOptionalAction, default=True,
                 help='GPU: time the SVD refresh from one SVD per matrix shape')
  p.add_argument('--dry-run', action='store_true', help='toy sizes: the same code path on any backend')
  p.add_argument('--decomposition-threads', action='store_true',
                 help='CPU: GaLore refresh time, LAPACK default threads vs 1, with and without a parallel load')
  p.add_argument('--refresh-size', default='60m')
  p.add_argument('--refresh-one', default=None, help=argparse.SUPPRESS)
  p.add_argument('--one', default=None, help=argparse.SUPPRESS)
  p.add_argument('--svd-estimate-one', default=None, help=argparse.SUPPRESS)
  p.add_argument('--json-out', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.refresh_one:
    print(json.dumps(refresh_child(args.refresh_one, 2)))
    return
  if args.one or args.svd_estimate_one:
    if args.one:
      row = run_one(Case(**json.loads(args.one)), args)
    else:
      row = svd_refresh_estimate(args.svd_estimate_one, 0, args.vocab, args)
    row['meta'] = {'jax': __import__('jax').__version__}
    write_json(args.json_out, row)
    print(json.dumps({k: v for k, v in row.items() if k not in ('step_s_all', 'meta')}))
    return

  import jax

  target = args.target or ('gpu' if jax.default_backend() == 'gpu' else 'cpu')
  if target == 'gpu':
    if args.dry_run:
      args.gpu_size = 'tiny'
      args.batch, args.seq = args.batch or 2, args.seq or 32
      args.steps = min(args.steps, 3)
    else:
      args.batch, args.seq = args.batch or 64, args.seq or 256
    run_gpu(args)
    return
  args.batch, args.seq = args.batch or 8, args.seq or 256
  if args.decomposition_threads:
    run_decomposition_threads(args)
    return
  if args.quick:
    args.plan, args.rounds = '60m:adamw,galore', min(args.rounds, 3)
  if args.dry_run:
    args.plan = ';'.join(f"tiny:{item.split(':')[1]}" for item in args.plan.split(';'))
    args.batch, args.seq, args.rounds = 2, 32, min(args.rounds, 3)
  run_cpu(args)


if __name__ == '__main__':
  main()
