"""QLoRA and the LoRA variants (issue #27): memory on a TPU v5e, host memory while a 7B checkpoint loads
quantized, and a tiny fine-tuning comparison. Each part writes its own JSON.

  python bench/qlora.py --parts memory   # 7b SFT, micro-batch 4 x 512, remat: bf16 LoRA / QLoRA / QDoRA, tpu-v5e
  python bench/qlora.py --parts host     # a random bf16 LLaMA-7B checkpoint on disk, loaded as the NF4 run loads it
  python bench/qlora.py --parts sft      # tiny LLaMA: NF4 vs bf16 base, DoRA vs LoRA, PiSSA vs Gaussian, 2 seeds

memory: `train.py --memory_report --memory_target=tpu-v5e` of configs/llama_sft_qlora.py and _qdora.py
(LLaMA-7B's shapes from configs/hf/llama_7b, no weights), and of configs/llama_sft_lora.py at the same
rank, micro-batch, remat and loss chunks with the base in bf16: the compiler's peak per chip. Writes
bench/results/qlora_memory.json.

host: writes LLaMA-7B's tensors (configs/hf/llama_7b, bf16, 5 GB shards, a random block tiled) to a
temporary directory, then in a fresh process loads them the way `train.py --config
configs/llama_sft_qlora.py` does (`models.from_pretrained(..., store=...)`, each kernel quantized to NF4
as it arrives) and reports the process's peak resident memory (VmHWM) over the bytes the loaded model
holds. Needs about 14 GB of disk (`--tmp`). Writes bench/results/qlora_host.json.

sft: bench/sft_tiny.py's setting: a tiny LLaMA pre-trained on the C4 sample and exported, then
fine-tuned on Alpaca-format examples made from C4 (bench/c4_instructions.py) with LoRA rank 16 on every
linear, bf16, for `--sft_steps`; the held-out response loss at the end, per arm and seed. Writes
bench/results/qlora_sft.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from _common import RESULTS, ROOT, meta, write_json

GIB = 2**30


# --- memory -----------------------------------------------------------------------------------

MEMORY_ARMS = (  # (name, config, overrides)
    ("lora_bf16_base", "llama_sft_lora", ["--config.model.remat=block", "--config.train.grad_accum=4",
                                          "--config.train.loss_chunk_positions=64",
                                          "--config.optimizer.lora.rank=16", "--config.optimizer.lora.alpha=16"]),
    ("lora_int8_base", "llama_sft_qlora", ["--config.model.base_bits=8"]),
    ("qlora_nf4", "llama_sft_qlora", []),
    ("qlora_nf4_no_double_quant", "llama_sft_qlora", ["--config.model.base_double_quant=False"]),
    ("qdora_nf4", "llama_sft_qdora", []),
)


def memory(args, info) -> None:
  import memory_report_all  # (the bench next door: one config's report in its own process)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    alpaca = memory_report_all.stand_in_alpaca(tmp)
    for name, config, overrides in MEMORY_ARMS:
      row = memory_report_all.report(config, args.target, None, [f"--config.data.path={alpaca}", *overrides], tmp)
      row["arm"] = name
      rows.append(row)
      peak = f"{row['peak_bytes'] / GIB:.2f} GiB" if row.get("peak_bytes") else row.get("error", "")
      print(f"{name}: exit {row['exit_code']}, {row['wall_s']} s, peak {peak}, fits {row.get('fits')}", flush=True)
      write_json(os.path.join(RESULTS, "qlora_memory.json"), {"target": args.target, "rows": rows}, meta=info)
  print(f"\n7b SFT, LoRA r16 on q,k,v,o,gate,up,down, micro-batch 4 x 512, remat block, {args.target}:")
  print("| arm | peak GiB | weights GiB | optimizer GiB | temporaries GiB | fits |\n|---|---|---|---|---|---|")
  for r in rows:
    g = lambda k: f"{r[k] / GIB:.2f}" if r.get(k) is not None else "-"  # noqa: E731
    print(f"| {r['arm']} | {g('peak_bytes')} | {g('params_bytes')} | {g('opt_state_bytes')} | {g('temp_bytes')} | "
          f"{r.get('fits')} |")


# --- host memory while loading ------------------------------------------------------------------

def _write_shards(out, family, config, block, shard_bytes) -> int:
  """The tensors of `family`'s HF format for `config`, each `block` tiled to its shape, in shards."""
  import numpy as np
  from flax import nnx
  from lowrank_jax.models.pretrained import _to_hf
  from lowrank_jax.models.safetensors_io import write_safetensors
  abstract = nnx.eval_shape(lambda: family.model_class(config, rngs=nnx.Rngs(0)))
  ours = {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
  by_name = {}
  for our_path, (name, layout) in family.hf.tensors(config).items():
    empty = np.lib.stride_tricks.as_strided(np.zeros(1, np.bool_), ours[our_path].shape, (0,) * ours[our_path].ndim)
    by_name[name] = tuple(_to_hf([empty], layout).shape)
  dtype = block.dtype

  def produce(name):
    shape = by_name[name]
    n = int(np.prod(shape))
    return np.resize(block, n).reshape(shape)

  shards, current, size = [], [], 0
  for name, shape in by_name.items():
    nbytes = int(np.prod(shape)) * 2
    if current and size + nbytes > shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((name, shape, dtype))
    size += nbytes
  shards.append(current)
  files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
  total = 0
  for file, shard in zip(files, shards):
    total += write_safetensors(os.path.join(out, file), shard, produce)
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total},
               "weight_map": {name: file for file, shard in zip(files, shards) for name, _, _ in shard}}, f)
  return total


LOAD_CHILD = r"""
import json, os, sys, time
import jax
from _common import config_module
from lowrank_jax import models
from lowrank_jax.nn import int8_weight
from lowrank_jax.train import config as config_lib
from lowrank_jax.train.model import linear_factory, pretrained_overrides, store_base
ckpt, base_bits = sys.argv[1], int(sys.argv[2])
config = config_module("llama_sft_qlora").get_config()
config.model.init_from = ckpt
config.model.base_bits = base_bits
config.data.path = sys.argv[3]
run = config_lib.resolve(config)
start = time.perf_counter()
model = models.from_pretrained(ckpt, linear_factory=linear_factory(run), seed=0,
                               store=lambda path, x: store_base(run, path, x), **pretrained_overrides(run, 32000))
seconds = time.perf_counter() - start
from flax import nnx
leaves = jax.tree.leaves(nnx.state(model), is_leaf=int8_weight.is_stored)
held = sum(sum(a.nbytes for a in jax.tree.leaves(x)) if int8_weight.is_stored(x) else x.nbytes for x in leaves)
status = open("/proc/self/status").read()
hwm = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
print(json.dumps({"seconds": seconds, "held_bytes": held, "peak_rss_bytes": hwm}))
"""


def host(args, info) -> None:
  import memory_report_all
  work = tempfile.mkdtemp(prefix="qlora_host_", dir=args.tmp)
  try:
    ckpt = os.path.join(work, "llama_7b_random")
    written = _write_random(os.path.join(ROOT, "configs", "hf", "llama_7b"), ckpt)
    print(f"wrote a random LLaMA-7B checkpoint: {written / GIB:.2f} GiB bf16", flush=True)
    alpaca = memory_report_all.stand_in_alpaca(work)
    rows = []
    for bits in args.host_bits:
      env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.join(ROOT, "bench")}
      out = subprocess.run([sys.executable, "-c", LOAD_CHILD, ckpt, str(bits), alpaca], env=env, cwd=ROOT,
                           capture_output=True, text=True)
      if out.returncode:
        raise SystemExit(f"loading failed:\n{out.stderr[-3000:]}")
      row = {"base_bits": bits, **json.loads(out.stdout.strip().splitlines()[-1]), "checkpoint_bytes": written}
      row["peak_over_held"] = row["peak_rss_bytes"] / row["held_bytes"]
      rows.append(row)
      print(f"base_bits {bits}: held {row['held_bytes'] / GIB:.2f} GiB, peak RSS {row['peak_rss_bytes'] / GIB:.2f} GiB "
            f"({row['peak_over_held']:.3f} x), {row['seconds']:.0f} s", flush=True)
    write_json(os.path.join(RESULTS, "qlora_host.json"), {"rows": rows}, meta=info)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def _write_random(hf_dir: str, out: str) -> int:
  """`hf_dir`'s config.json and random bf16 tensors of its shapes (a tiled random block: drawing 6.7 G
  fresh normals would take longer than the load it serves). Returns the bytes written."""
  import numpy as np
  from lowrank_jax import models
  from lowrank_jax.models.safetensors_io import DTYPE_CODES
  os.makedirs(out, exist_ok=True)
  shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(out, "config.json"))
  block = (np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32) * 0.02).astype(DTYPE_CODES["BF16"])
  return _write_shards(out, models.family_of(hf_dir), models.pretrained_config(hf_dir), block, 5 * 10**9)


# --- tiny SFT -----------------------------------------------------------------------------------

SFT_ARMS = {  # name -> overrides of the SFT config
    "lora_bf16_base": {},
    "lora_nf4_base": {"model.base_bits": 4},
    "dora_bf16_base": {"optimizer.lora.variant": "dora"},
    "lora_pissa_bf16_base": {"optimizer.lora.init": "pissa"},
}


def sft(args, info) -> None:
  import c4_instructions
  from _common import apply_overrides
  from configs import base, llama_sft_lora
  from lowrank_jax.data import samples
  from lowrank_jax.train import train
  work = tempfile.mkdtemp(prefix="qlora_sft_", dir=args.tmp)
  try:
    data_dir = os.path.join(work, "c4_sft")
    counts = c4_instructions.build(data_dir, prompt_chars=160, response_chars=80)
    config = base.get_config()
    config.model.size = "tiny"
    config.data.source = "jsonl"
    config.data.path, config.data.eval_path = str(samples.C4_TRAIN), str(samples.C4_VALIDATION)
    config.data.tokenizer = "byte"
    config.data.seq_len = 512  # (the SFT rows' length: the exported model's context)
    config.train.steps = args.pretrain_steps
    config.train.batch_size = 8
    config.train.eval_every = config.train.checkpoint_every = 0
    config.train.progress_bar = False
    config.optimizer.lr = 3e-3
    config.model.export_to = os.path.join(work, "base_hf")
    train(config, os.path.join(work, "pretrain"))
    rows = []
    for arm, overrides in SFT_ARMS.items():
      for seed in range(args.seeds):
        sft_config = llama_sft_lora.get_config()
        sft_config.seed = seed
        sft_config.model.init_from = config.model.export_to
        sft_config.data.path = os.path.join(data_dir, "train.jsonl")
        sft_config.data.eval_path = os.path.join(data_dir, "eval.jsonl")
        sft_config.data.tokenizer = "byte"
        sft_config.data.seq_len = 512
        sft_config.train.steps = args.sft_steps
        sft_config.train.batch_size = 8
        sft_config.train.eval_every = args.sft_steps
        sft_config.train.eval_batches = args.eval_batches
        sft_config.train.checkpoint_every = 0
        sft_config.train.progress_bar = False
        sft_config.optimizer.lr = args.lr
        sft_config.optimizer.warmup = 0.05
        sft_config.optimizer.lora.rank = 16
        sft_config.optimizer.lora.alpha = 32.0
        apply_overrides(sft_config, [f"{k}={v}" for k, v in overrides.items()])
        run_dir = os.path.join(work, f"{arm}_{seed}")
        train(sft_config, run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
          evals = [r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r]
        rows.append({"arm": arm, "seed": seed, "overrides": overrides, "eval_loss": evals[-1]})
        print(f"{arm} seed {seed}: held-out response loss {evals[-1]:.4f}", flush=True)
        write_json(os.path.join(RESULTS, "qlora_sft.json"), {"instruction_examples": counts, "rows": rows}, meta=info)
    means = {arm: statistics.mean(r["eval_loss"] for r in rows if r["arm"] == arm) for arm in SFT_ARMS}
    ratios = {"nf4_over_bf16": means["lora_nf4_base"] / means["lora_bf16_base"],
              "dora_over_lora": means["dora_bf16_base"] / means["lora_bf16_base"],
              "pissa_over_gaussian": means["lora_pissa_bf16_base"] / means["lora_bf16_base"]}
    print("\n| arm | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean |")
    print("|---|" + "---|" * (args.seeds + 1))
    for arm in SFT_ARMS:
      losses = [r["eval_loss"] for r in rows if r["arm"] == arm]
      print(f"| {arm} | " + " | ".join(f"{x:.4f}" for x in losses) + f" | {means[arm]:.4f} |")
    print("ratios:", {k: round(v, 4) for k, v in ratios.items()})
    write_json(os.path.join(RESULTS, "qlora_sft.json"),
               {"instruction_examples": counts, "rows": rows, "means": means, "ratios": ratios}, meta=info)
  finally:
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--parts", default="memory,host,sft")
  parser.add_argument("--target", default="tpu-v5e")
  parser.add_argument("--tmp", default=None, help="where the temporary checkpoint and runs go (host: ~14 GB)")
  parser.add_argument("--host_bits", type=int, nargs="+", default=[4])
  parser.add_argument("--pretrain_steps", type=int, default=150)
  parser.add_argument("--sft_steps", type=int, default=60)
  parser.add_argument("--eval_batches", type=int, default=4)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--lr", type=float, default=2e-3)
  args = parser.parse_args()
  info = meta(args)
  for part in args.parts.split(","):
    {"memory": memory, "host": host, "sft": sft}[part](args, info)


if __name__ == "__main__":
  main()
