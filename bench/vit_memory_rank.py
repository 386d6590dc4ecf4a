"""ViT memory against LoRA rank (the LTE + GaLore study's figure), VeLoRA's saving, and a
tiny ViT's accuracy on real images.

  /work/tpuvenv/bin/python bench/vit_memory_rank.py              # TPU v5e target (libtpu)
  python bench/vit_memory_rank.py --target cpu                    # XLA:CPU figures, labelled

Part 1, memory: ViT-B/16 and ViT-L/16 at 224 x 224, 9 classes (PathMNIST), one training
step compiled ahead of time for one chip of the target on abstract inputs (nothing is
allocated) and read from ``compiled.memory_analysis()``. The study's setting (no remat,
float32 parameters, bf16 compute): full fine-tuning (AdamW), LoRA (rank 1, 4, 16, 64, 256 on
q, k, v, o, up, down; kernels frozen, everything else trained) and GaLore (rank 128,
projector refresh in its own program); LoRA rank 16 + VeLoRA (sub-token 16 on the adapters'
inputs of q, k, v, o, up: the config's choice; and of q, k, v, down); and what a memory-short
user adds (``--groups remat``): ``model.remat=block`` for full and LoRA rank 16, and LoRA with
bf16 parameters and moments (``model.param_dtype=bfloat16``). Peak = the
compiler's own peak on TPU; arguments + temporaries + outputs - aliased on XLA:CPU (which has
none and holds bf16 activations as f32: its figures are labelled). No global-norm clipping
(it keeps every gradient alive). The step is the library's pieces (model, optax transform,
one jitted update with donated state), the same each method, so the ratios compare the
methods only.

Depth: every block of a ViT has the same shapes, so each figure of the step (arguments,
temporaries, the compiler's peak) is a straight line in the number of blocks L:
f(L) = f_0 + L * f_block. The compile time is too (about 1.5 to 4 minutes per ViT block
on a loaded 2-core host), so each case is compiled at two depths (``--depths``, default 2
and 4) and the published depth's figure is read off the line through the two deepest
compiled depths of that case (every compiled figure is in the JSON's ``measured``; a
case compiled at its published depth uses that). A 1-block program's peak can sit
elsewhere than a deep one's: the line through 1 and 2 blocks put LoRA rank 1 above rank 4. Checked against direct compiles (see the
README's Vision section); ``--depths full`` compiles the published depth instead.

Part 2, accuracy (CPU, real images, offline): Debian's Fashion-MNIST written in the
MedMNIST npz layout. A tiny ViT is pre-trained on classes 0-4 (upstream), then
fine-tuned on classes 5-9 with a new head, full and LoRA (rank 16), each at three
learning rates (the best is reported), evaluated on the whole test split of 5-9.

Writes bench/results/vit_memory_rank.json and bench/results/vit_memory_rank.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from _common import RESULTS, meta, pyplot, write_json

TPU_ENV = dict(TPU_SKIP_MDS_QUERY='1', TPU_ACCELERATOR_TYPE='v5litepod-4', TPU_WORKER_HOSTNAMES='localhost',
               TPU_WORKER_ID='0', JAX_PLATFORMS='cpu', ALLOW_MULTIPLE_LIBTPU_LOAD='1')


GROUPS_DEFAULT = ('study', 'velora', 'remat')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--target', choices=('tpu-v5e', 'cpu'), default='tpu-v5e')
  p.add_argument('--batch', type=int, default=32, help='images per step (one chip)')
  p.add_argument('--sizes', default='b16,l16', help="'' skips the memory part")
  p.add_argument('--ranks', default='1,4,16,64,256')
  p.add_argument('--groups', default=','.join(GROUPS_DEFAULT),
                 help="which cases: 'study' (full, LoRA per rank, GaLore: no remat, float32 parameters), "
                      "'velora' (LoRA rank 16 + VeLoRA), 'remat' (model.remat block / matmul_inputs, bf16 parameters)")
  p.add_argument('--dtype', default='bfloat16', help='compute dtype (parameters stay float32)')
  p.add_argument('--depths', default='2,4',
                 help="blocks compiled per case: 'full' compiles the published depth (12 / 24 blocks; "
                      "about 50 min per ViT-B case on a loaded 2-core host); two depths such as '2,4' give "
                      "the published depth's figures by the straight line through them (see the doc)")
  p.add_argument('--resume', action='store_true',
                 help='reuse the rows of --out.json measured with the same settings; compile only the rest')
  p.add_argument('--no_compile', action='store_true',
                 help='with --resume: tabulate the rows already measured, leaving out the cases not measured')
  p.add_argument('--accuracy_steps', type=int, default=0, help='> 0: also run the accuracy part')
  p.add_argument('--out', default=os.path.join(RESULTS, 'vit_memory_rank'))
  return p.parse_args(argv)


ARGS = parse_args()
if ARGS.target == 'tpu-v5e':
  for k, v in TPU_ENV.items():
    os.environ.setdefault(k, v)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from lowrank_jax import optim  # noqa: E402
from lowrank_jax.data import images as I  # noqa: E402
from lowrank_jax.models import LinearFactory, vit  # noqa: E402
from lowrank_jax.optim.projection import default_projection_mask  # noqa: E402

ADAPTED = ('q', 'k', 'v', 'o', 'up', 'down')
# VeLoRA on the LoRA adapters' inputs, sub-token 16: the layers whose inputs a LoRA step keeps
# only for the adapters (configs/vit_b16_lora_velora.py), and the previous choice, VeLoRA's
# full-tuning layers (q, k, v and the MLP's down projection), whose down input a LoRA step
# never keeps (see velora_analytic_saving).
VELORA_LAYERS = ('q', 'k', 'v', 'o', 'up')
VELORA_LAYERS_QKV_DOWN = ('q', 'k', 'v', 'down')
VELORA_SUB_TOKEN = 16
GALORE_RANK = 128
NUM_CLASSES = 9  # PathMNIST
REMATS = ('block',)  # model.remat of the memory-short rows ('matmul_inputs' also works: add it here)


@dataclasses.dataclass(frozen=True)
class Case:
  """One compiled configuration. The study's rows: no remat, float32 parameters."""
  size: str
  method: str                   # full, lora, lora_velora, galore
  rank: int | None = None       # LoRA rank
  remat: str = 'none'           # model.remat
  param_dtype: str = 'float32'  # model.param_dtype: every parameter and the Adam moments
  velora: tuple = ()            # lora_velora: the layers whose adapter input VeLoRA compresses

  def fields(self) -> dict:
    return dict(size=self.size, method=self.method, rank=self.rank, remat=self.remat,
                param_dtype=self.param_dtype, velora_layers=list(self.velora))

  @classmethod
  def of(cls, row: dict) -> 'Case':
    """The case of a JSON row (rows without the later fields are the study's setting)."""
    return cls(row['size'], row['method'], row['rank'], row.get('remat', 'none'),
               row.get('param_dtype', 'float32'), tuple(row.get('velora_layers', ())))

  def label(self) -> str:
    name = {'full': 'full fine-tuning (AdamW)', 'galore': f'GaLore rank {GALORE_RANK}',
            'lora': f'LoRA rank {self.rank}',
            'lora_velora': f'LoRA rank {self.rank} + VeLoRA (sub-token {VELORA_SUB_TOKEN}: '
                           f'{", ".join(self.velora)})'}[self.method]
    extras = ([f'`model.remat={self.remat}`'] if self.remat != 'none' else []) + (
        ['bf16 parameters and moments'] if self.param_dtype != 'float32' else [])
    return name + (f', {", ".join(extras)}' if extras else '')


def factory_for(method: str, rank: int | None, velora: tuple = ()) -> LinearFactory:
  if method in ('full', 'galore'):
    return LinearFactory()
  layer_options = {n: {'velora_sub_token_size': VELORA_SUB_TOKEN} for n in velora}
  return LinearFactory({n: 'lora' for n in ADAPTED}, {'lora': {'rank': rank, 'alpha': 2.0 * rank}},
                       layer_options)


def _frozen_paths(params_state) -> set:
  """Kernels of adapted layers (beside a lora_a): not trained, no gradient, no optimizer state."""
  paths = {tuple(p) for p, _ in nnx.to_flat_state(params_state)}
  return {p for p in paths if p[-1] == 'kernel' and p[:-1] + ('lora_a',) in paths}


def make_optimizer(method: str, lr, trainable):
  if method == 'galore':
    # The mask on the State's own structure: the default rule reads path names, and an
    # nnx.State's leaves sit under a Variable (its last key is not 'kernel').
    mask = jax.tree.map(lambda x: x, trainable)
    nnx.replace_by_pure_dict(mask, default_projection_mask(trainable.to_pure_dict(), rank=GALORE_RANK))
    return optim.galore(lr, rank=GALORE_RANK, update_proj_gap=200, scale=0.25, split_refresh=True,
                        projection_mask=mask)
  return optax.adamw(lr, weight_decay=0.0)


class Step:
  """model + method -> (graphdef, frozen, trainable, rest) and one jitted update."""

  def __init__(self, model_fn, method: str, lr):
    model = nnx.eval_shape(model_fn) if lr is None else model_fn()
    frozen = _frozen_paths(nnx.state(model, nnx.Param))
    is_frozen = lambda path, x: tuple(path) in frozen  # noqa: E731
    self.graphdef, self.frozen, self.trainable, self.rest = nnx.split(model, is_frozen, nnx.Param, ...)
    self.tx = make_optimizer(method, 1e-3 if lr is None else lr, self.trainable)
    graphdef, tx = self.graphdef, self.tx

    def loss_fn(trainable, frozen, rest, images, labels):
      # Fresh variables at this trace level (VeLoRA updates its vector in the forward pass).
      frozen, rest = jax.tree.map(lambda x: x, (frozen, rest))
      m = nnx.merge(graphdef, frozen, trainable, rest)
      metrics = vit.classification_metrics(m(images), labels)
      return metrics['loss'] / metrics['count'], (metrics, nnx.state(m, nnx.Not(nnx.Param)))

    def step(trainable, opt_state, frozen, rest, images, labels):
      grads, (metrics, rest) = jax.grad(loss_fn, has_aux=True)(trainable, frozen, rest, images, labels)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, rest, metrics

    self.step = jax.jit(step, donate_argnums=(0, 1, 3))
    self.logits = jax.jit(lambda tr, fr, rest, images: nnx.merge(graphdef, fr, tr, rest)(images))


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _bytes(tree) -> int:
  return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def measure(case: 'Case', device, batch: int, dtype: str, n_layers: int | None = None) -> dict:
  """One case's compiled step; `n_layers` None: the published depth."""
  size, method, rank = case.size, case.method, case.rank
  depth = {} if n_layers is None else {'n_layers': n_layers}
  cfg = vit.vit_config(size, NUM_CLASSES, image_size=224, dtype=dtype, param_dtype=case.param_dtype,
                       remat=case.remat, **depth)
  factory = factory_for(method, rank, case.velora)
  step = Step(lambda: vit.ViT(cfg, linear_factory=factory, rngs=nnx.Rngs(0)), method, None)
  sharding = jax.sharding.SingleDeviceSharding(device)
  abstract = lambda t: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), t)  # noqa: E731
  opt_state = jax.eval_shape(step.tx.init, step.trainable)
  args = (abstract(step.trainable), abstract(opt_state), abstract(step.frozen), abstract(step.rest),
          jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32, sharding=sharding),
          jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding))
  t0 = time.perf_counter()
  lowered = step.step.lower(*args)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  print(f'  ({case.label()}, {cfg.n_layers} blocks: lowered in {t1 - t0:.0f}s, compiled in '
        f'{time.perf_counter() - t1:.0f}s)', flush=True)
  stats = compiled.memory_analysis()
  formula = (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes)
  reported = getattr(stats, 'peak_memory_in_bytes', 0) or 0
  peak = reported if device.platform != 'cpu' and reported else formula
  return dict(case.fields(), batch=batch, n_layers=cfg.n_layers, peak_bytes=int(peak),
              argument_bytes=stats.argument_size_in_bytes, temp_bytes=stats.temp_size_in_bytes,
              output_bytes=stats.output_size_in_bytes, alias_bytes=stats.alias_size_in_bytes,
              trainable_params=_count(step.trainable), frozen_params=_count(step.frozen),
              opt_state_bytes=_bytes(opt_state), compile_s=round(time.perf_counter() - t0, 1))


# Inputs a LoRA step keeps for backward only because an adapter reads them (buffer dump of the
# ViT-B/16 step on tpu-v5e): the LayerNorm outputs read by q, k, v (shared) and by up, and the
# attention output read by o, each [tokens, d_model]. The GELU output read by down is not kept:
# the compiler rebuilds it from the GELU's own residuals (its input h and erfc(-h / sqrt 2)),
# which the GELU's gradient needs anyway, so compressing down frees nothing.
FREED_BY_COMPRESSING = ((('q', 'k', 'v'), True), (('o',), True), (('up',), True), (('down',), False))


def velora_analytic_saving(size: str, batch: int, dtype: str, layers: tuple) -> int:
  """Bytes VeLoRA on the adapters' inputs of `layers` removes from what a LoRA step keeps: per
  block, each input in FREED_BY_COMPRESSING whose readers are all compressed, in the compute
  dtype, minus the sub-token scalars kept instead ([tokens, width / sub_token] per layer)."""
  cfg = vit.vit_config(size, NUM_CLASSES, image_size=224)
  itemsize = jnp.dtype(dtype).itemsize
  tokens = batch * cfg.num_tokens
  freed = sum(tokens * cfg.d_model * itemsize for readers, kept in FREED_BY_COMPRESSING
              if kept and set(readers) <= set(layers))
  scalars = sum(tokens * ((cfg.d_ff if n == 'down' else cfg.d_model) // VELORA_SUB_TOKEN) * itemsize
                for n in layers)
  return cfg.n_layers * (freed - scalars)


# --- accuracy on real images -----------------------------------------------------------------


def _subset(source, classes):
  idx = [i for i in range(len(source)) if source[i]['label'] in classes]
  lo = min(classes)

  class Sub:
    num_classes = len(classes)

    def __len__(self):
      return len(idx)

    def __getitem__(self, i):
      ex = source[idx[i]]
      return {'image': ex['image'], 'label': ex['label'] - lo}
  return Sub()


def _train(step: Step, train_src, eval_batches, steps: int, seed: int) -> tuple[float, float]:
  transform = I.ImageTransform(28, 1, crop_padding=2, flip=True)
  it = I.make_image_train_iterator(train_src, transform, batch_size=128, seed=seed)
  trainable, opt_state, rest = step.trainable, step.tx.init(step.trainable), step.rest
  for _ in range(steps):
    b = next(it)
    trainable, opt_state, rest, _ = step.step(trainable, opt_state, step.frozen, rest,
                                               jnp.asarray(b['images']), jnp.asarray(b['labels']))
  step.trainable, step.rest = trainable, rest
  correct = count = 0.0
  for b in eval_batches:
    m = vit.classification_metrics(step.logits(trainable, step.frozen, rest, jnp.asarray(b['images'])),
                                   jnp.asarray(b['labels']), jnp.asarray(b['mask']))
    correct += float(m['correct'])
    count += float(m['count'])
  return correct / count, count


def accuracy_study(steps: int) -> dict:
  path = I.offline_npz('fashion_mnist')
  train, test = I.NpzImageSource(path, 'train'), I.NpzImageSource(path, 'test')
  up_train, down_train, down_test = _subset(train, range(5)), _subset(train, range(5, 10)), _subset(test, range(5, 10))
  up_test = _subset(test, range(5))
  ev = lambda s: I.make_image_eval_batches(s, I.ImageTransform(28, 1), batch_size=500)  # noqa: E731
  cfg = vit.vit_config('tiny', 5, image_size=28, num_channels=1)
  t0 = time.perf_counter()
  upstream = Step(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)), 'full', optax.warmup_cosine_decay_schedule(0, 3e-3, steps // 10, steps))
  up_acc, _ = _train(upstream, up_train, ev(up_test), steps, seed=0)
  print(f'  upstream (classes 0-4): accuracy {up_acc:.4f}', flush=True)
  pretrained = nnx.merge(upstream.graphdef, upstream.frozen, upstream.trainable, upstream.rest)
  # Host copies: each fine-tuning run donates its parameters to its step.
  pre_params = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(pretrained, nnx.Param))}
  results = {'upstream_classes_0_4_acc': up_acc, 'runs': []}
  down_eval = ev(down_test)
  ft_steps = steps // 2
  for method, lrs in (('full', (3e-4, 1e-3, 3e-3)), ('lora', (1e-3, 3e-3, 1e-2))):
    for lr in lrs:
      def build(method=method):
        m = vit.ViT(cfg, linear_factory=factory_for(method, 16), rngs=nnx.Rngs(1))
        state = nnx.state(m, nnx.Param)
        for p, var in nnx.to_flat_state(state):
          if tuple(p) in pre_params and p[0] != 'head':  # a new head for the new classes
            var.set_value(pre_params[tuple(p)])
        nnx.update(m, state)
        return m
      schedule = optax.warmup_cosine_decay_schedule(0, lr, ft_steps // 10, ft_steps)
      acc, n = _train(Step(build, method, schedule), down_train, down_eval, ft_steps, seed=1)
      results['runs'].append(dict(method=method, lr=lr, accuracy=acc, eval_examples=int(n)))
      print(f'  fine-tune {method:5s} lr {lr:g}: accuracy {acc:.4f} on {int(n)} test images', flush=True)
  for method in ('full', 'lora'):
    results[f'best_{method}'] = max((r for r in results['runs'] if r['method'] == method),
                                    key=lambda r: r['accuracy'])
  results['chance'] = 1 / 5
  results['steps'] = dict(upstream=steps, fine_tune=ft_steps, batch=128)
  results['wall_s'] = round(time.perf_counter() - t0, 1)
  return results


def plot(rows, out_png, target_label):
  plt = pyplot()
  if plt is None:
    return False
  fig, ax = plt.subplots(figsize=(7, 4.6))
  get = lambda case: next((r['peak_bytes'] / 2**20 for r in rows if Case.of(r) == case), None)  # noqa: E731
  for size, colour in (('b16', 'tab:blue'), ('l16', 'tab:red')):
    name = {'b16': 'ViT-B/16', 'l16': 'ViT-L/16'}[size]
    for remat, marker in (('none', 'o-'), ('block', 's--')):
      lora = sorted((r for r in rows if Case.of(r) == Case(size, 'lora', r['rank'], remat)), key=lambda r: r['rank'])
      if lora:
        ax.plot([r['rank'] for r in lora], [r['peak_bytes'] / 2**20 for r in lora], marker, color=colour,
                label=f'{name} LoRA' + ('' if remat == 'none' else f', remat={remat}'))
    bf16 = get(Case(size, 'lora', 16, 'block', 'bfloat16'))
    if bf16:
      ax.plot([16], [bf16], '^', color=colour, label=f'{name} LoRA, remat=block, bf16 params')
    for case, style, text in ((Case(size, 'full'), '--', 'full'), (Case(size, 'galore'), ':', 'GaLore'),
                              (Case(size, 'lora_velora', 16, velora=VELORA_LAYERS), '-.', 'LoRA r16 + VeLoRA'),
                              (Case(size, 'full', remat='block'), (0, (6, 2, 1, 2)), 'full, remat=block')):
      if get(case):
        ax.axhline(get(case), color=colour, linestyle=style, linewidth=1, label=f'{name} {text}')
  ax.set_xscale('log', base=2)
  ranks = sorted({r['rank'] for r in rows if r['method'] == 'lora'})
  ax.set_xticks(ranks, labels=[str(r) for r in ranks])
  ax.set_ylim(bottom=0)
  ax.set_xlabel('LoRA rank')
  ax.set_ylabel('peak memory per chip (MiB)')
  depth = '' if all(len(r['from_depths']) == 1 for r in rows) else '\npublished depth on the line through two compiled depths'
  ax.set_title(f'ViT fine-tuning at 224x224, batch {rows[0]["batch"]} ({target_label}{depth})', fontsize=9)
  ax.legend(fontsize=6.5, ncol=2, loc='center')
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)
  return True


FIELDS = ('peak_bytes', 'argument_bytes', 'temp_bytes', 'output_bytes', 'alias_bytes', 'trainable_params',
          'frozen_params', 'opt_state_bytes')


def at_depth(measured: list[dict], depth: int) -> dict:
  """One case at `depth` blocks: compiled there, or on the straight line through the two deepest
  compiled depths (a 1-block program's peak can sit elsewhere than a deep one's)."""
  by_depth = {r['n_layers']: r for r in measured}
  if depth in by_depth:
    return dict(by_depth[depth], from_depths=[depth])
  (l1, a), (l2, b) = sorted(by_depth.items())[-2:]
  row = dict(a, n_layers=depth, from_depths=[l1, l2], compile_s=round(a['compile_s'] + b['compile_s'], 1))
  for f in FIELDS:
    row[f] = int(round(a[f] + (depth - l1) * (b[f] - a[f]) / (l2 - l1)))
  return row


GROUPS = GROUPS_DEFAULT


def case_plan(sizes, ranks, groups) -> list[Case]:
  """The cases of each size: the study's (full, LoRA per rank, GaLore; no remat, float32), LoRA +
  VeLoRA, and a memory-short user's (`model.remat`, bf16 parameters)."""
  plan = []
  for size in sizes:
    if 'study' in groups:
      plan += [Case(size, 'full'), *(Case(size, 'lora', r) for r in ranks), Case(size, 'galore')]
    if 'velora' in groups:
      plan += [Case(size, 'lora_velora', 16, velora=VELORA_LAYERS),
               Case(size, 'lora_velora', 16, velora=VELORA_LAYERS_QKV_DOWN)]
    if 'remat' in groups:
      for remat in REMATS:
        plan += [Case(size, 'full', remat=remat), Case(size, 'lora', 16, remat=remat)]
      plan.append(Case(size, 'lora', 16, remat='block', param_dtype='bfloat16'))
  return plan


def figures_of(rows, sizes, batch, dtype) -> dict:
  get = lambda case: next((r['peak_bytes'] for r in rows if Case.of(r) == case), None)  # noqa: E731
  figures = {}
  if get(Case('b16', 'lora', 16)) and get(Case('l16', 'lora', 16)):
    figures['l16_over_b16_peak_lora_r16'] = get(Case('l16', 'lora', 16)) / get(Case('b16', 'lora', 16))
  for size in sizes:
    full, lora16 = get(Case(size, 'full')), get(Case(size, 'lora', 16))
    if full:
      lora = [r['peak_bytes'] for r in rows if Case.of(r) == Case(size, 'lora', r['rank'])]
      if lora:
        figures[f'{size}_lora_over_full_peak_max_over_ranks'] = max(lora) / full
        figures[f'{size}_lora_over_full_peak_min_over_ranks'] = min(lora) / full
      if get(Case(size, 'galore')):
        figures[f'{size}_galore_over_full_peak'] = get(Case(size, 'galore')) / full
    for remat in REMATS:
      full_r, lora_r = get(Case(size, 'full', remat=remat)), get(Case(size, 'lora', 16, remat=remat))
      if full_r and lora_r:
        figures[f'{size}_lora_r16_over_full_peak_both_remat_{remat}'] = lora_r / full_r
      if full and lora_r:
        figures[f'{size}_lora_r16_remat_{remat}_over_full_no_remat_peak'] = lora_r / full
    lora_bf16 = get(Case(size, 'lora', 16, remat='block', param_dtype='bfloat16'))
    if lora_bf16 and get(Case(size, 'full', remat='block')):
      figures[f'{size}_lora_r16_bf16_over_full_peak_both_remat_block'] = lora_bf16 / get(Case(size, 'full', remat='block'))
    if lora_bf16 and full:
      figures[f'{size}_lora_r16_remat_block_bf16_over_full_no_remat_peak'] = lora_bf16 / full
    for name, layers in (('', VELORA_LAYERS), ('_qkv_down', VELORA_LAYERS_QKV_DOWN)):
      lv = get(Case(size, 'lora_velora', 16, velora=layers))
      if lora16 and lv:
        figures[f'{size}_lora_velora{name}_over_lora_peak'] = lv / lora16
        figures[f'{size}_velora{name}_saving_measured_bytes'] = lora16 - lv
        figures[f'{size}_velora{name}_saving_analytic_bytes'] = velora_analytic_saving(size, batch, dtype, layers)
  return figures


def table(rows) -> str:
  """The README's table: one line per case, ViT-B/16 and ViT-L/16 side by side."""
  lines = ['| method | ViT-B/16 peak | ViT-B/16 trained params | ViT-L/16 peak | ViT-L/16 trained params |',
           '|---|---|---|---|---|']
  seen = []
  for r in rows:
    c = dataclasses.replace(Case.of(r), size='b16')
    if c in seen:
      continue
    seen.append(c)
    cells = []
    for size in ('b16', 'l16'):
      row = next((x for x in rows if Case.of(x) == dataclasses.replace(c, size=size)), None)
      cells += ([f'{row["peak_bytes"] / 2**20:,.1f} MiB', f'{row["trainable_params"]:,}'] if row
                else ['not compiled', '-'])
    lines.append(f'| {c.label()} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  args = ARGS
  if args.target == 'tpu-v5e':
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    try:
      device = topologies.get_topology_desc('v5e:2x2', 'tpu').devices[0]
    except Exception as e:  # pylint: disable=broad-except
      sys.exit(f'--target tpu-v5e needs libtpu (jax[tpu] at jax {jax.__version__}): {e}; '
               'or pass --target cpu')
    label = 'TPU v5e, AOT compile'
  else:
    device = jax.devices('cpu')[0]
    label = 'XLA:CPU (bf16 held as f32; not an accelerator figure)'
  sizes = [x for x in args.sizes.split(',') if x]
  ranks = [int(r) for r in args.ranks.split(',')]
  depths = None if args.depths == 'full' else [int(d) for d in args.depths.split(',')]
  if depths is not None and len(depths) != 2:
    sys.exit(f"--depths: 'full' or two block counts such as '1,2', got {args.depths!r}")
  settings = dict(target=label, batch=args.batch, compute_dtype=args.dtype)
  info = meta(args)
  measured = []
  if args.resume and os.path.exists(args.out + '.json'):
    with open(args.out + '.json') as f:
      old = json.load(f)
    if all(old.get(k) == v for k, v in settings.items()):
      measured = old.get('measured', [])
      if measured:  # those compiles were made then, not now
        info['resumed_measured_meta'] = old.get('meta')
      print(f'resuming: {len(measured)} compiled cases from {args.out}.json')
  groups = [g for g in args.groups.split(',') if g]
  if not set(groups) <= set(GROUPS):
    sys.exit(f'--groups: a comma list of {list(GROUPS)}, got {args.groups!r}')
  rows = []
  for case in case_plan(sizes, ranks, groups):
    published = vit.vit_config(case.size, NUM_CLASSES).n_layers
    compiled = {r['n_layers'] for r in measured if Case.of(r) == case}
    missing = [] if published in compiled else [n for n in depths or [published] if n not in compiled]
    if args.no_compile:
      if published not in compiled and len(compiled) < 2:
        continue
      missing = []
    for n in missing:
      measured.append(measure(case, device, args.batch, args.dtype, n))
      write(args, dict(settings, measured=measured, partial=True), info)
    # Every compiled depth of the case counts (e.g. an extra 4-block check): the published depth
    # itself, or the line through the two deepest.
    row = at_depth([r for r in measured if Case.of(r) == case], published)
    rows.append(row)
    print(f'{case.label()}, {case.size}: peak {row["peak_bytes"] / 2**20:9,.1f} MiB  '
          f'(args {row["argument_bytes"] / 2**20:8,.1f}, temp {row["temp_bytes"] / 2**20:8,.1f}; '
          f'trainable {row["trainable_params"]:,}; blocks compiled {row["from_depths"]})', flush=True)
  figures = figures_of(rows, sizes, args.batch, args.dtype)
  result = dict(settings, image_size=224, num_classes=NUM_CLASSES, depths=args.depths, lora_layers=list(ADAPTED),
                velora=dict(layers=[list(VELORA_LAYERS), list(VELORA_LAYERS_QKV_DOWN)],
                            sub_token_size=VELORA_SUB_TOKEN),
                galore=dict(rank=GALORE_RANK, update_proj_gap=200, scale=0.25), rows=rows, figures=figures,
                measured=measured)
  if args.accuracy_steps:
    with jax.default_device(jax.devices('cpu')[0]):
      result['accuracy'] = accuracy_study(args.accuracy_steps)
    acc = result['accuracy']
    figures['tiny_full_acc'] = acc['best_full']['accuracy']
    figures['tiny_lora_acc'] = acc['best_lora']['accuracy']
    figures['tiny_lora_minus_full_points'] = 100 * (figures['tiny_lora_acc'] - figures['tiny_full_acc'])
  write(args, result, info)
  plotted = bool(rows) and plot(rows, args.out + '.png', label)
  print(table(rows))
  print(json.dumps(figures, indent=2))
  print(f'wrote {args.out}.json' + (f' and {args.out}.png' if plotted else ''))


def write(args, result, info):
  write_json(args.out + '.json', result, meta=info, indent=2)


if __name__ == '__main__':
  main()
