"""Multi-head LoRA (LTE): sequential heads vs parallel heads vs full training, on GPT-2.

  python bench/bench_mhlora.py                 # GPT-2 124M shape, short sequences (CPU-sized)
  python bench/bench_mhlora.py --size tiny     # seconds, for a smoke run

For each of full training (AdamW), `mhlora` mode (every example sees every head) and
`parallel` mode (each head trains on its own share of the batch), it prints the trained
parameters and the median time of a whole train step (forward, backward, optimizer,
merges amortised), as ratios to full training measured in the same run, interleaved so
machine noise hits all three alike. Writes bench/results/mhlora_<size>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import gpt2_124m_mhlora  # noqa: E402
from lowrank_jax.train.setup import build_setup, init_state, param_count, trainable_count  # noqa: E402


def make_config(size: str, variant: str, batch: int, seq: int, heads: int, rank: int):
  config = gpt2_124m_mhlora.get_config()
  config.model.size = size
  config.model.dtype = config.model.param_dtype = "float32"  # CPU: bf16 is emulated
  config.data.source = "synthetic"
  config.data.seq_len = seq
  config.train.batch_size = batch
  config.optimizer.mhlora.num_heads = heads
  config.optimizer.mhlora.rank = rank
  if variant == "full":
    config.optimizer.name = "adamw"
  else:
    config.optimizer.mhlora.mode = variant
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="124m")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--rank", type=int, default=32)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  args = parser.parse_args()

  variants = ["full", "mhlora", "parallel"]
  runs = {}
  for v in variants:
    config = make_config(args.size, v, args.batch, args.seq, args.heads, args.rank)
    setup = build_setup(config, 258)
    state = init_state(setup, 258)
    tokens = np.random.default_rng(0).integers(2, 258, (1, args.batch, args.seq), dtype=np.int32)
    start = time.perf_counter()
    state, _ = setup.train_step(state, tokens)
    jax.block_until_ready(state)
    runs[v] = {"setup": setup, "state": state, "tokens": tokens, "compile_s": time.perf_counter() - start,
               "times": [], "params": param_count(setup), "trainable": trainable_count(setup)}
  for _ in range(args.steps):  # interleaved
    for v in variants:
      r = runs[v]
      start = time.perf_counter()
      r["state"], _ = r["setup"].train_step(r["state"], r["tokens"])
      jax.block_until_ready(r["state"])
      r["times"].append(time.perf_counter() - start)

  full_t = statistics.median(runs["full"]["times"])
  rows = []
  for v in variants:
    r = runs[v]
    t = statistics.median(r["times"])
    rows.append({"variant": v, "step_s": t, "step_ratio": t / full_t, "params": r["params"],
                 "trainable": r["trainable"], "trainable_ratio": r["trainable"] / runs["full"]["trainable"],
                 "compile_s": r["compile_s"]})
  print(f"\nGPT-2 {args.size}, batch {args.batch} x {args.seq}, {args.heads} heads of rank {args.rank} on q,k,v,o, "
        f"float32, {jax.devices()[0].platform}; median of {args.steps} steps\n")
  print("| training | step time | x full | trained parameters | x full |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['variant']} | {1e3 * r['step_s']:,.0f} ms | {r['step_ratio']:.2f} | {r['trainable'] / 1e6:.2f}M "
          f"| {r['trainable_ratio']:.3f} |")
  out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"mhlora_{args.size}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"args": vars(args), "backend": jax.devices()[0].platform, "rows": rows}, f, indent=2)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
