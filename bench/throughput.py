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

GPU (`--target gpu`, #31; bench/gpu_session.sh runs it): the throughput set, each job in its own
process under its own timeout (its own device-memory peak; one failure or timeout costs only that
job), in priority order (GPU_ORDER) until `--budget` is spent, the rest listed as skipped:
  1. LLaMA-1b bf16 AdamW with model.attention=auto (cuDNN's fused attention on a GPU, XLA elsewhere),
     no remat, micro-batch 64 x 256: the MFU headline; then GaLore (rank 512) and APOLLO-Mini at the
     same settings (their tokens/s over AdamW's);
  2. the micro-batch search: AdamW at the largest 64 x 2^k (up to x4) that its first case's memory
     predicts inside 90% of the device's limit (a compiled peak over the limit is reported, not run;
     an out-of-memory step is reported too); the best tokens/s of the group is the figure;
  3. 7b GaLore rank 1024 with 8-bit states, configs/llama_7b_galore.py as shipped (int8 weights,
     remat per block, clip_mode=previous, loss chunks of 64 positions), micro-batch 16 x 256: its
     allocator peak (memory_stats peak_bytes_in_use) and tokens/s;
  4. LoRA; then AdamW / GaLore / APOLLO-Mini / LoRA with XLA attention and with remat per block
     (and both), their searches, 7b with bf16 weights, and the SVD refresh's time estimate (one
     decomposition per matrix shape, times the matrices of that shape).
Each case: MFU from the model FLOPs (6 N tokens + 12 L d T tokens, PaLM's formula, N = the matmul
parameters; recomputation is not counted) and XLA's `cost_analysis()`, the attention kernel the
compiled step holds (cuDNN's fused-attention custom calls in its HLO, or XLA's), device memory
(`memory_stats()` peak after the steps, and the compiled `memory_analysis()`), tokens/s over AdamW's
at the same size, dtype, attention, remat and micro-batch. The state timed is random values of the
trainer's shapes, dtypes and shardings made on the device in one program (`--init synthetic`: the
step's program and cost do not depend on the values, and the allocator's peak is the step's, not the
eager init's; `--init real` uses the trainer's init_state). Steady-state steps are timed: the refresh
program (GaLore's SVDs, OSD's first step) is not run, which the step's program does not depend on.
Cases get XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 (`--mem-fraction`) unless the environment sets it.
`--dry-run` runs the same jobs at toy sizes on any backend (the CPU: a stand-in 4 GiB limit and
0.1 TFLOP/s peak, so the search and the MFU columns run too).

  python bench/throughput.py                      # CPU: 60m (all methods) and 130m (AdamW, GaLore)
  python bench/throughput.py --quick              # CPU: 60m AdamW/GaLore/peer, 3 rounds
  python bench/throughput.py --decomposition-threads --refresh-size 60m
  python bench/throughput.py --target gpu --budget 260 --out DIR/throughput_gpu.json --log DIR/cases.log
  python bench/throughput.py --target gpu --groups F --variants adamw,galore   # a part of the set
  python bench/throughput.py --target gpu --dry-run   # the GPU code path at toy sizes, on CPU

Writes bench/results/throughput_<target>[_quick].json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
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
# Method settings that follow the model size, as the papers' configs (GaLore/OSD rank 512 at 1b; not LoRA's
# rank, nor APOLLO-Mini's 1).
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
  # GPU cases ('' leaves the setting as the config has it):
  attention: str = ''  # model.attention: xla | cudnn | auto
  remat: str = ''  # model.remat: none | block | ... (models.REMAT_POLICIES)
  config: str = ''  # a config file (relative to the repo) in place of configs/base.py + the variant
  label: str = ''  # the config's short name in the case name (e.g. 'lean')
  overrides: str = ''  # 'key=value;key=value' applied last (a config file's case at toy size)

  @property
  def name(self) -> str:
    if not (self.attention or self.remat or self.config):
      return f'{self.variant}-{self.size}-{self.dtype}'
    parts = [self.variant, self.size, self.dtype, self.label, self.attention or 'default',
             f'remat_{self.remat}' if self.remat else '', f'b{self.batch}']
    return '-'.join(p for p in parts if p)

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
  """The trainer config of a case: configs/base.py defaults (or the case's config file), then its shape and method."""
  from _common import apply_overrides, load_config, offline_data
  from configs import base

  if case.config:  # the config as shipped (its method, dtype, remat, ...): only the shape and the data change
    config = offline_data(load_config(os.path.join(ROOT, case.config)))  # no Hub id: the machine may be offline
    settings = {'model.size': case.size, 'data.seq_len': case.seq, 'train.batch_size': case.batch,
                'train.grad_accum': 1, 'train.steps': 10_000}
  else:
    config = base.get_config()
    compute, params = DTYPES[case.dtype]
    settings = {'model.size': case.size, 'model.dtype': compute, 'model.param_dtype': params,
                'data.seq_len': case.seq, 'train.batch_size': case.batch, 'train.grad_accum': 1,
                'train.steps': 10_000, **VARIANTS[case.variant]}
  if case.remat:
    settings['model.remat'] = case.remat
  for key, value in settings.items():
    set_dotted(config, key, value)
  if case.attention:
    if has_dotted(config, 'model.attention'):
      set_dotted(config, 'model.attention', case.attention)
    elif case.attention != 'xla' and _backend() == 'gpu':  # 'auto' elsewhere is XLA: the same program
      raise SystemExit(f'{case.name}: model.attention is not a setting of this tree; '
                       f'attention={case.attention} cannot be measured')
  method = method_of(case.variant)
  if not case.config and case.size in RANK_AT_SIZE and has_dotted(config, f'optimizer.{method}.rank') \
      and method not in ('lora', 'apollo_mini'):  # APOLLO-Mini is rank 1 at every size
    set_dotted(config, f'optimizer.{method}.rank', RANK_AT_SIZE[case.size])
  key = gap_key(config, method)
  if case.gap and key:
    set_dotted(config, key, case.gap)
  if case.overrides:
    apply_overrides(config, [item for item in case.overrides.split(';') if item])
  return config


def _backend() -> str:
  import jax

  return jax.default_backend()


def attention_setting() -> bool:
  """Whether this tree has the `model.attention` setting (#31)."""
  from configs import base

  return has_dotted(base.get_config(), 'model.attention')


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


def synthetic_state(setup, seed: int = 0):
  """A state of the trainer's shapes, dtypes and shardings, made in one program on the device (timing only).

  Parameters are N(0, 0.02) (the trainer's init scale), every other float |N(0, 0.02)| (second moments,
  scales: no negative values where the step takes a root), integers zero. The step's program and its cost
  do not depend on the values; what this saves is the eager init's own peak (a 7b model built in bf16
  before its int8 weights are made), so the allocator's peak after the steps is the step's.
  """
  import jax
  import jax.numpy as jnp

  abstract = setup.abstract_state
  leaves, treedef = jax.tree.flatten(abstract)
  params = set(map(id, jax.tree.leaves(abstract.params)))
  signed = [id(leaf) in params for leaf in leaves]

  def make():
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for k, leaf, sign in zip(keys, leaves, signed):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        x = 0.02 * jax.random.normal(k, leaf.shape, jnp.float32)
        out.append((x if sign else jnp.abs(x)).astype(leaf.dtype))
      else:
        out.append(jnp.zeros(leaf.shape, leaf.dtype))
    return out

  shardings = [getattr(leaf, 'sharding', None) for leaf in leaves]
  made = jax.jit(make, out_shardings=shardings if all(shardings) else None)()
  return jax.tree.unflatten(treedef, made)


class StepRunner:
  """One case's compiled trainer step, its state and a fixed batch, stepped as the trainer's loop does.

  Methods with a split refresh (GaLore, OSD, Fira: `setup.compiled_refresh`) run the refresh
  program before the step whenever it is due; a refresh step's time includes it.
  """

  def __init__(self, case: Case, vocab: int, *, skip_first_refresh: bool = False, seed: int = 0,
               init: str = 'real', fits=None):
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
    self.count = 0  # optimizer steps taken by this state
    self.skip_refresh = skip_first_refresh
    self.state = None
    t0 = time.perf_counter()  # compiled before the state exists: a program over the memory allocates nothing
    abstract = (setup.abstract_state, setup.abstract_tokens())
    self.compiled = setup.compiled_step.lower(*abstract).compile()
    refresh = getattr(setup, 'compiled_refresh', None)
    self.refresh = refresh.lower(*abstract).compile() if refresh is not None and not skip_first_refresh else None
    self.compile_s = time.perf_counter() - t0
    if fits is not None and not fits(self):
      return  # the caller reads the analysis and stops
    t0 = time.perf_counter()
    self.init = init
    self.state = synthetic_state(setup, seed) if init == 'synthetic' else init_state(setup, vocab)
    if skip_first_refresh:  # in-step refreshes are due at count 0; a split refresh is never run
      self.state = self.state._replace(opt_state=advance_counts(self.state.opt_state, 1))
      self.count = 1
    jax.block_until_ready(self.state)
    self.init_s = time.perf_counter() - t0
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

  def attention_kernel(self) -> dict[str, Any]:
    """Which attention the compiled step runs: cuDNN's fused kernel (its custom calls in the HLO) or XLA's."""
    try:
      text = self.compiled.as_text()
    except Exception as e:  # noqa: BLE001
      return {'kernel': None, 'error': str(e)[:200]}
    calls = text.count('cudnn$fmha')
    return {'kernel': 'cudnn' if calls else 'xla', 'cudnn_fmha_calls': calls}

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
  """Compile, check the fit, warm up and time one case in this process (the GPU child).

  The compiled step's `memory_analysis()` peak is checked against the device's limit before any
  state exists: a micro-batch over it is reported ('over_memory') instead of run. An allocator
  out-of-memory in a real step is reported as 'oom'.
  """
  import jax

  dev = jax.devices()[0]
  limit = (dev.memory_stats() or {}).get('bytes_limit') or (
      int(args.capacity_gib * 2**30) if args.capacity_gib else None)
  compiled_peak: dict[str, int | None] = {}

  def fits(runner: StepRunner) -> bool:
    analysis = runner.memory_analysis()
    peak = max(analysis.get('peak_memory') or 0, analysis.get('live_estimate') or 0) or None
    compiled_peak['bytes'] = peak
    return not (limit and peak and peak > limit)

  t_start = time.perf_counter()
  runner = StepRunner(case, args.vocab, skip_first_refresh=True, init=args.init, fits=fits)
  model = runner.setup.run.model
  out: dict[str, Any] = {
      'case': case.name, 'variant': case.variant, 'method': method_of(case.variant), 'size': case.size,
      'dtype': case.dtype, 'batch': case.batch, 'seq': case.seq, 'tokens_per_step': case.tokens,
      'attention': case.attention or None, 'remat': case.remat or None, 'config': case.config or None,
      'overrides': case.overrides or None,
      'model_remat': model.remat, 'model_attention': getattr(model, 'attention', None),
      **{f'attention_{k}' if k != 'kernel' else 'attention_kernel': v
         for k, v in runner.attention_kernel().items()},
      'compile_s': runner.compile_s, 'memory_analysis': runner.memory_analysis(), 'bytes_limit': limit,
      'device_kind': dev.device_kind, 'platform': dev.platform,
  }
  if runner.state is None:
    gib = compiled_peak['bytes'] / 2**30
    return {**out, 'status': 'over_memory',
            'note': f'compiled peak {gib:.1f} GiB > the device limit {limit / 2**30:.1f} GiB: not run'}
  after_init = dev.memory_stats() or {}
  times: list[float] = []
  try:
    first = runner.step()  # first run of the executable (allocations, autotuned kernels loaded)
    deadline = time.perf_counter() + args.measure_s
    while len(times) < args.steps and (len(times) < 3 or time.perf_counter() < deadline):
      if runner.is_refresh():
        break  # a refresh step is not a steady-state step
      times.append(runner.step())
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return {**out, 'status': 'oom', 'note': str(e).strip().splitlines()[0][:300]}
  stats = dev.memory_stats() or {}
  step_s = _median(times)
  flops = model_flops_per_step(case, args.vocab)
  peak = peak_tflops(dev.device_kind, case.dtype, args.peak_tflops)
  out.update({
      'status': 'ok', 'init': runner.init, 'init_s': runner.init_s,
      'setup_s': time.perf_counter() - t_start - runner.compile_s - runner.init_s - first - sum(times),
      'first_step_s': first, 'step_s': step_s, 'step_s_min': min(times), 'step_s_all': times,
      'tokens_per_s': case.tokens / step_s,
      'model_flops_per_step': flops,
      'cost_analysis_flops': runner.cost_flops(),
      'model_tflops_per_s': flops / step_s / 1e12,
      'peak_tflops': peak,
      'mfu': (flops / step_s / 1e12 / peak) if peak else None,
      'memory_stats_peak_bytes': stats.get('peak_bytes_in_use'),
      'memory_stats_peak_after_init_bytes': after_init.get('peak_bytes_in_use'),
      'memory_stats_in_use_bytes': stats.get('bytes_in_use'),
      'memory_stats_limit_bytes': stats.get('bytes_limit'),
      'loss': float(runner.metrics['loss']) if runner.metrics is not None else None,
  })
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
  return {'case': f'svd-refresh-{size}', 'size': size, 'shapes': rows, 'refresh_svd_s_estimate': total,
          'status': 'ok'}


# The GPU set of #31, in priority order (what a short budget reaches first): the headline 1b AdamW
# bf16 step with fused attention, GaLore's and APOLLO-Mini's tokens/s against it, the micro-batch
# search, 7b GaLore (rank 1024, 8-bit states, the lean config), LoRA, then the remat and
# XLA-attention variants. Groups: (model.attention, model.remat). A job is (kind, variant, group):
#   case    the variant at the start micro-batch (--batch, 64 at 1b)
#   search  the group's AdamW at the largest micro-batch (start x 2^k, k >= 1, at most
#           --search-max-factor) its first case's memory predicts inside --search-fraction of the
#           device's limit: compiled peak + (k - 1) x its temporaries (linear in the batch, so an
#           overestimate: the gradients do not grow with it); skipped when none is predicted to fit
#   7b      configs/llama_7b_galore.py as shipped (int8 weights, 8-bit states, remat per block,
#           clip_mode=previous, loss chunks of 64 positions), micro-batch 16 x 256, one device;
#           7b_bf16w the same with bf16 weights (model.weight_bits=16)
#   svd     the SVD refresh's time, one decomposition per matrix shape
GPU_GROUPS = {'F': ('auto', 'none'), 'X': ('xla', 'none'), 'FR': ('auto', 'block'), 'XR': ('xla', 'block')}
GPU_ORDER = (
    ('case', 'adamw', 'F'), ('case', 'galore', 'F'), ('case', 'apollo_mini', 'F'), ('search', 'adamw', 'F'),
    ('7b', 'galore', ''), ('case', 'lora', 'F'),
    ('case', 'adamw', 'X'), ('case', 'adamw', 'FR'), ('search', 'adamw', 'FR'),
    ('case', 'galore', 'FR'), ('case', 'apollo_mini', 'FR'), ('case', 'galore', 'X'), ('case', 'apollo_mini', 'X'),
    ('case', 'lora', 'FR'), ('case', 'lora', 'X'),
    ('case', 'adamw', 'XR'), ('case', 'galore', 'XR'), ('case', 'apollo_mini', 'XR'), ('case', 'lora', 'XR'),
    ('search', 'adamw', 'X'), ('search', 'adamw', 'XR'), ('7b_bf16w', 'galore', ''),
    ('svd', '', ''),
)
GPU_7B_CONFIG = 'configs/llama_7b_galore.py'
GOALS = {'mfu': 0.45, 'tokens_per_s_vs_adamw': 0.95, 'peak_7b_gib': 20.0}  # #31's figures to reach
BASELINE = os.path.join(RESULTS, 'throughput_gpu_h200.json')  # #31's 'today': XLA attention, no remat, 64 x 256


@dataclasses.dataclass
class Job:
  kind: str
  variant: str
  group: str
  case: Case | None = None  # None: decided when it is due (a search)
  timeout: float = 0.0

  @property
  def label(self) -> str:
    if self.case is not None:
      return self.case.name
    return f'{self.kind}:{self.variant}:{self.group}' if self.variant else self.kind


def gpu_jobs(args) -> list[Job]:
  """The GPU set as jobs, in GPU_ORDER (filtered by --variants / --groups)."""
  size, batch, seq = args.gpu_size, args.batch, args.seq
  jobs = []
  for kind, variant, group in GPU_ORDER:
    if kind == 'svd':
      if args.svd_estimate:
        jobs.append(Job(kind, '', '', timeout=60.0))
      continue
    if not registered(variant):
      continue
    if kind in ('7b', '7b_bf16w'):
      big = args.big_size
      over = args.big_overrides + (';model.weight_bits=16' if kind == '7b_bf16w' else '')
      case = Case(variant, big, 'bf16', args.big_batch, args.big_seq, attention='auto', config=GPU_7B_CONFIG,
                  label='lean' if kind == '7b' else 'lean_bf16w', overrides=over.strip(';'))
      jobs.append(Job(kind, variant, group, case, args.big_timeout))
      continue
    if args.groups and group not in args.groups.split(','):
      continue
    attention, remat = GPU_GROUPS[group]
    case = Case(variant, size, 'bf16', batch, seq, attention=attention, remat=remat)
    jobs.append(Job(kind, variant, group, case if kind == 'case' else None, args.case_timeout))
  if args.variants:
    wanted = args.variants.split(',')
    jobs = [j for j in jobs if j.variant in wanted or j.kind in wanted or any(w in j.label for w in wanted)]
  return jobs


def predict_batch(row: dict[str, Any], limit: int | None, fraction: float, max_factor: int) -> int | None:
  """The largest start x 2^k (k >= 1) micro-batch predicted to fit, from one measured case (None: none)."""
  analysis = row.get('memory_analysis') or {}
  temp = analysis.get('temp_size')
  if not limit or not temp:
    return None
  peak = max(analysis.get('peak_memory') or 0, analysis.get('live_estimate') or 0,
             row.get('memory_stats_peak_bytes') or 0)
  best, factor = None, 2
  while factor <= max_factor and peak + (factor - 1) * temp <= fraction * limit:
    best, factor = row['batch'] * factor, factor * 2
  return best


def _group_key(r: dict[str, Any]) -> tuple:
  """What a ratio to AdamW holds fixed: size, dtype, attention, remat, micro-batch and config file."""
  return (r.get('size'), r.get('dtype'), r.get('attention'), r.get('remat'), r.get('batch'), r.get('config'))


def _child(argv: list[str], timeout: float, log, env: dict[str, str]) -> tuple[int, str]:
  """Run this script as a child in its own process group, its output appended to `log` as it comes;
  kill the group on timeout. Returns (exit status, the child's output)."""
  log.flush()
  start = log.tell()
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv, stdout=log,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True, env=env)
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rc = 124
  log.seek(start)
  out = log.read()
  log.seek(0, os.SEEK_END)
  return rc, out


def _last_error(output: str) -> str:
  lines = [line.strip() for line in output.splitlines() if line.strip()]
  errors = [line for line in lines
            if line.startswith(('SystemExit', 'Error', 'error:')) or 'Error' in line.split(':')[0]]
  return (errors or lines or [''])[-1][:300]


def _device_probe(env: dict[str, str]) -> dict[str, Any]:
  """The device of the children (kind, count, allocator limit), probed in a child: this process holds none."""
  code = ('import json, jax; d = jax.devices(); s = d[0].memory_stats() or {}; print(json.dumps({"platform": '
          'd[0].platform, "kind": d[0].device_kind, "count": len(d), "bytes_limit": s.get("bytes_limit")}))')
  try:
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=180,
                         env={**env, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'})
    return json.loads(out.stdout.strip().splitlines()[-1])
  except (OSError, subprocess.SubprocessError, ValueError, IndexError) as e:
    return {'error': f'{type(e).__name__}: {e}'[:200]}


def run_gpu(args, child_env: dict[str, str]) -> dict[str, Any]:
  import tempfile

  t_end = time.perf_counter() + args.budget
  info = _meta(args)
  info['device'] = _device_probe(child_env)  # this process runs JAX on the CPU only
  info['attention_setting'] = attention_setting()
  info['child_env'] = {k: child_env.get(k) for k in ('XLA_PYTHON_CLIENT_MEM_FRACTION', 'XLA_PYTHON_CLIENT_PREALLOCATE',
                                                      'JAX_COMPILATION_CACHE_DIR', 'XLA_FLAGS', 'JAX_PLATFORMS')}
  result: dict[str, Any] = {'meta': info, 'goals': GOALS, 'cases': [], 'failed': [], 'skipped': []}
  result['baseline'] = baseline()
  out_path = args.out or os.path.join(RESULTS, 'throughput_gpu.json')
  log = open(args.log, 'a+') if args.log else tempfile.TemporaryFile('w+')
  tmp = tempfile.mkdtemp(prefix='throughput_gpu_')
  jobs = gpu_jobs(args)
  first_rows: dict[str, dict[str, Any]] = {}  # group -> its AdamW case's row (what a search predicts from)
  walls: list[float] = []  # wall seconds of the 1b cases that finished
  print(f"GPU set on {info['device'].get('kind')}, budget {args.budget:.0f} s, model.attention setting "
        f"{'present' if info['attention_setting'] else 'ABSENT'}: {[j.label for j in jobs]}", file=log, flush=True)
  for i, job in enumerate(jobs):
    left = t_end - time.perf_counter()
    if job.kind == 'search':
      base = first_rows.get(job.group)
      limit = (base or {}).get('bytes_limit')
      batch = predict_batch(base, limit, args.search_fraction, args.search_max_factor) if base else None
      if batch is None:
        result['skipped'].append({'job': job.label, 'why': 'no AdamW case of the group measured' if not base else
                                  'no larger micro-batch predicted to fit (or no device limit known)'})
        continue
      attention, remat = GPU_GROUPS[job.group]
      job.case = Case(job.variant, args.gpu_size, 'bf16', batch, args.seq, attention=attention, remat=remat)
    # A job starts only when it can finish: the median wall of the 1b cases so far (7b: 1.5 x that).
    least = 15.0 if job.kind == 'svd' else max(args.min_case_s, (1.5 if job.kind.startswith('7b') else 1.0)
                                               * (_median(walls) or 0.0))
    if left < least:
      result['skipped'].append({'job': job.label,
                                'why': f'out of budget ({left:.0f} s left, about {least:.0f} s needed)'})
      continue
    part = os.path.join(tmp, f'{i}.json')
    child_args = (['--svd-estimate-one', args.gpu_size] if job.kind == 'svd'
                  else ['--one', json.dumps(dataclasses.asdict(job.case))])
    argv = child_args + ['--json-out', part, '--vocab', str(args.vocab), '--steps', str(args.steps),
                         '--measure-s', str(args.measure_s), '--init', args.init]
    for flag, value in (('--peak-tflops', args.peak_tflops), ('--capacity-gib', args.capacity_gib)):
      if value:
        argv += [flag, str(value)]
    timeout = min(job.timeout, left)
    t0 = time.perf_counter()
    print(f'--- {job.label} (timeout {timeout:.0f} s, {left:.0f} s of the budget left)', file=log, flush=True)
    rc, output = _child(argv, timeout, log, child_env)
    wall = time.perf_counter() - t0
    row = None
    if os.path.exists(part):
      with open(part) as f:
        row = json.load(f)
      os.remove(part)
    if rc == 0 and row is not None and row.get('status') == 'ok':
      row['wall_s'] = wall
      result['cases'].append(row)
      if job.kind == 'case' and job.variant == 'adamw':
        first_rows[job.group] = row
      if job.kind in ('case', 'search'):
        walls.append(wall)
    else:
      failed = {'case': job.label, 'rc': rc, 'wall_s': wall,
                'status': (row or {}).get('status') or ('timeout' if rc == 124 else 'error'),
                'note': (row or {}).get('note') or _last_error(output)}
      if row and row.get('memory_analysis'):
        failed['memory_analysis'] = row['memory_analysis']
      result['failed'].append(failed)
    print(f"--- {job.label}: {'ok' if rc == 0 and row and row.get('status') == 'ok' else 'FAILED'} "
          f'after {wall:.0f} s', file=log, flush=True)
    _add_ratios(result)
    result['figures'] = figures(result, args.gpu_size, args.big_size)
    write_json(out_path, result)  # after every case: a later timeout keeps what was measured
  shutil.rmtree(tmp, ignore_errors=True)
  _add_ratios(result)
  result['figures'] = figures(result, args.gpu_size, args.big_size)
  write_json(out_path, result)
  text = format_gpu(result)
  print(text, file=log, flush=True)
  print(text)
  print(f'wrote {out_path}')
  return result


def baseline() -> dict[str, Any] | None:
  """The figures of the GPU run before #31 (BASELINE), to print beside the new ones."""
  if not os.path.exists(BASELINE):
    return None
  with open(BASELINE) as f:
    data = json.load(f)
  rows = {r.get('variant'): r for r in data.get('cases', [])}
  adamw, galore = rows.get('adamw') or {}, rows.get('galore') or {}
  return {'file': os.path.relpath(BASELINE, ROOT), 'device': ((data.get('meta') or {}).get('device') or {}).get('kind'),
          'adamw_case': adamw.get('case'), 'adamw_mfu': adamw.get('mfu'),
          'adamw_tokens_per_s': adamw.get('tokens_per_s'),
          'galore_over_adamw': (galore['tokens_per_s'] / adamw['tokens_per_s'])
          if galore.get('tokens_per_s') and adamw.get('tokens_per_s') else None}


def _add_ratios(result) -> None:
  """tokens/s over AdamW's at the same size, dtype, attention, remat, micro-batch and config."""
  base = {_group_key(r): r for r in result['cases'] if r.get('variant') == 'adamw' and 'tokens_per_s' in r}
  for r in result['cases']:
    ref = base.get(_group_key(r))
    if ref and r.get('tokens_per_s'):
      r['tokens_per_s_vs_adamw'] = r['tokens_per_s'] / ref['tokens_per_s']
      r['adamw_case'] = ref['case']


def figures(result, size: str, big: str) -> dict[str, Any]:
  """#31's figures from the cases measured: the best 1b AdamW bf16 MFU with fused attention (and
  with XLA's), GaLore / APOLLO-Mini / LoRA tokens/s over AdamW's at its settings, 7b's peak."""
  rows = [r for r in result['cases'] if 'tokens_per_s' in r]
  out: dict[str, Any] = {'goals': GOALS}
  for key, attention in (('adamw_mfu', 'auto'), ('adamw_mfu_xla', 'xla')):
    best = [r for r in rows if r['variant'] == 'adamw' and r['size'] == size and r['dtype'] == 'bf16'
            and r.get('attention') == attention and r.get('mfu') is not None]
    if best:
      r = max(best, key=lambda r: r['mfu'])
      out[key] = {'case': r['case'], 'mfu': r['mfu'], 'tokens_per_s': r['tokens_per_s'],
                  'attention_kernel': r.get('attention_kernel'), 'remat': r.get('remat'), 'batch': r['batch']}
  ratios = [r for r in rows if r['variant'] != 'adamw' and r['size'] == size and 'tokens_per_s_vs_adamw' in r]
  out['ratios'] = [{'case': r['case'], 'adamw_case': r['adamw_case'], 'ratio': r['tokens_per_s_vs_adamw']}
                   for r in ratios]
  for variant in ('galore', 'apollo_mini', 'lora'):  # the headline: fused attention, no remat, first micro-batch
    same = sorted((r for r in ratios if r['variant'] == variant),
                  key=lambda r: (r.get('attention') != 'auto', r.get('remat') != 'none', r['batch']))
    if same:
      r = same[0]
      out[f'{variant}_over_adamw'] = {'case': r['case'], 'adamw_case': r['adamw_case'],
                                      'ratio': r['tokens_per_s_vs_adamw']}
  for r in rows:
    if r['size'] == big and r.get('config'):
      peak = r.get('memory_stats_peak_bytes')
      out.setdefault('big', []).append({'case': r['case'], 'peak_gib': peak / 2**30 if peak else None,
                                        'compiled_peak_gib': (r['memory_analysis'].get('peak_memory') or 0) / 2**30,
                                        'tokens_per_s': r['tokens_per_s'], 'mfu': r.get('mfu')})
  return out


def format_gpu(result) -> str:
  info = result['meta']
  device = info.get('device') or {}
  lines = [f"GPU throughput: {device.get('kind')} (jax {(info.get('versions') or {}).get('jax')})",
           f"{'case':<42}{'attention':>15}{'remat':>7}{'batch x seq':>12}{'step ms':>9}{'tokens/s':>10}{'MFU':>7}"
           f"{'x AdamW':>8}{'peak GiB':>9}{'compiled':>9}{'compile s':>10}"]
  for r in result['cases']:
    if 'refresh_svd_s_estimate' in r:
      parts = ', '.join('%dx%d: %.0f ms x%d' % (*s['shape'], 1e3 * s['svd_s'], s['count']) for s in r['shapes'])
      lines.append(f"{r['case']:<42} SVD refresh estimate {r['refresh_svd_s_estimate']:.1f} s ({parts})")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r.get('mfu') else '-'
    ratio = f"{r['tokens_per_s_vs_adamw']:.2f}" if 'tokens_per_s_vs_adamw' in r else '-'
    peak = r.get('memory_stats_peak_bytes')
    peak = f'{peak / 2**30:.1f}' if peak else '-'
    compiled = (r.get('memory_analysis') or {}).get('peak_memory')
    compiled = f'{compiled / 2**30:.1f}' if compiled else '-'
    attention = f"{r.get('attention') or '-'} ({r.get('attention_kernel') or '?'})"
    remat = r.get('remat') or r.get('model_remat') or '-'
    lines.append(f"{r['case']:<42}{attention:>15}{remat:>7}{r['batch']:>5} x {r['seq']:<5}{1e3 * r['step_s']:>9.1f}"
                 f"{r['tokens_per_s']:>10,.0f}{mfu:>7}{ratio:>8}{peak:>9}{compiled:>9}{r['compile_s']:>10.1f}")
  for f in result['failed']:
    lines.append(f"{f['case']:<42} FAILED ({f.get('status', 'error')}, rc={f['rc']}) after {f['wall_s']:.0f} s: "
                 f"{f.get('note') or 'see the log'}")
  for s in result['skipped']:
    s = s if isinstance(s, dict) else {'job': s, 'why': 'out of budget'}
    lines.append(f"{s['job']:<42} skipped: {s['why']}")
  fig = result.get('figures') or {}
  if fig:
    lines.append('Figures (#31; goals: MFU >= 45%, tokens/s over AdamW >= 0.95, 7b peak <= 20 GiB):')
    base = result.get('baseline')
    if base and base.get('adamw_mfu'):
      galore = f", GaLore / AdamW {base['galore_over_adamw']:.2f}" if base.get('galore_over_adamw') else ''
      lines.append(f"  before (#31's today, {base['file']}, {base['device']}): AdamW MFU "
                   f"{100 * base['adamw_mfu']:.1f}% (XLA attention, no remat, 64 x 256){galore}")
    for key, title in (('adamw_mfu', 'attention auto'), ('adamw_mfu_xla', 'attention xla')):
      if key in fig:
        f = fig[key]
        lines.append(f"  AdamW MFU, {title}: {100 * f['mfu']:.1f}% at micro-batch {f['batch']}, kernel "
                     f"{f['attention_kernel']}, remat {f['remat']} ({f['case']})")
    for variant in ('galore', 'apollo_mini', 'lora'):
      f = fig.get(f'{variant}_over_adamw')
      if f:
        others = [g for g in fig.get('ratios', []) if g['case'].startswith(variant + '-') and g['case'] != f['case']]
        more = ('; also ' + ', '.join(f"{g['ratio']:.2f} ({g['case'][len(variant) + 1:]})" for g in others)
                if others else '')
        lines.append(f"  {variant} tokens/s / AdamW's: {f['ratio']:.3f} ({f['case']} / {f['adamw_case']}){more}")
    for f in fig.get('big', []):
      peak = f"{f['peak_gib']:.1f}" if f['peak_gib'] else '-'
      lines.append(f"  {f['case']}: allocator peak {peak} GiB (compiled {f['compiled_peak_gib']:.1f} GiB), "
                   f"{f['tokens_per_s']:,.0f} tokens/s")
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
  p.add_argument('--gpu-size', default='1b', help='GPU: the model of the 1b set')
  p.add_argument('--variants', default='', help='GPU: only jobs of these variants, kinds (case, search, 7b, '
                 '7b_bf16w, svd) or case names containing one of these (comma separated)')
  p.add_argument('--groups', default='', help='GPU: only these (attention, remat) groups: F (auto, none), '
                 'X (xla, none), FR (auto, block), XR (xla, block); comma separated (7b and svd: no group)')
  p.add_argument('--budget', type=float, default=260.0, help='GPU: seconds for the whole set')
  p.add_argument('--case-timeout', type=float, default=120.0, help='GPU: seconds per 1b case')
  p.add_argument('--min-case-s', type=float, default=45.0,
                 help='GPU: a case is started only with this many seconds of the budget left')
  p.add_argument('--big-size', default='7b', help='GPU: the model of configs/llama_7b_galore.py\'s jobs')
  p.add_argument('--big-batch', type=int, default=16)
  p.add_argument('--big-seq', type=int, default=256)
  p.add_argument('--big-timeout', type=float, default=180.0, help='GPU: seconds for a 7b case')
  p.add_argument('--big-overrides', default='', help='GPU: key=value;... for the 7b jobs')
  p.add_argument('--steps', type=int, default=10, help='GPU: timed steps per case (at most)')
  p.add_argument('--measure-s', type=float, default=8.0, help='GPU: timed seconds per case (at most)')
  p.add_argument('--peak-tflops', type=float, default=None)
  p.add_argument('--init', choices=('synthetic', 'real'), default='synthetic',
                 help="GPU: the state timed: random values made on the device in one program (the step's own "
                      "memory peak), or the trainer's init_state (its eager init may set the peak)")
  p.add_argument('--mem-fraction', default='0.90',
                 help='GPU: XLA_PYTHON_CLIENT_MEM_FRACTION of the cases (unless set in the environment)')
  p.add_argument('--capacity-gib', type=float, default=None,
                 help='GPU: the memory limit where the device reports none (the dry run on the CPU)')
  p.add_argument('--search-fraction', type=float, default=0.9,
                 help='GPU: a searched micro-batch must be predicted under this fraction of the device limit')
  p.add_argument('--search-max-factor', type=int, default=4, help='GPU: search micro-batches up to start x this')
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

  if args.target == 'gpu':
    child_env = dict(os.environ, PYTHONUNBUFFERED='1')
    if not args.dry_run:
      child_env.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', args.mem_fraction)
    import jax

    jax.config.update('jax_platforms', 'cpu')  # this process only starts children: it holds no accelerator
    if args.dry_run:
      args.gpu_size, args.big_size = 'tiny', 'tiny'
      args.batch, args.seq = args.batch or 2, args.seq or 32
      args.big_batch, args.big_seq = 2, 32
      args.big_overrides = args.big_overrides or 'optimizer.galore.rank=16'
      args.steps = min(args.steps, 3)
      args.min_case_s = min(args.min_case_s, 10.0)
      args.capacity_gib = args.capacity_gib or 4.0  # a stand-in device limit: the search runs
      args.peak_tflops = args.peak_tflops or 0.1  # a stand-in peak: the MFU columns and figures are filled
    else:
      args.batch, args.seq = args.batch or 64, args.seq or 256
    run_gpu(args, child_env)
    return
  import jax

  if (args.target or jax.default_backend()) == 'gpu':
    raise SystemExit('a GPU is the default backend: run with --target gpu (each case in its own process)')
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
