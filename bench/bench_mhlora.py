"""Multi-head LoRA (LTE): sequential heads vs parallel heads vs full training, on GPT-2.

  python bench/bench_mhlora.py                 # GPT-2 124M's blocks, 384-token vocabulary, short sequences (CPU-sized)
  python bench/bench_mhlora.py --size tiny     # seconds, for a smoke run
  python bench/bench_mhlora.py --devices 4     # + heads spread over 4 devices (host CPU devices on CPU)

For each of full training (AdamW), `mhlora` mode (every example sees every head) and
`parallel` mode (each head trains on its own share of the batch), it prints the trained
parameters and the median time of a whole train step (forward, backward, optimizer,
merges amortised), as ratios to full training measured in the same run, interleaved so
machine noise hits all of them alike.

With several devices every variant is data parallel, and two more run: parallel heads
spread over the devices (`parallel.shard_heads`, one per device with --heads = --devices)
under jit + shard_map and under pmap. For each it also reports, read from the compiled
step's HLO, the bytes its collectives move on every step and, separately, only at merges
(inside the merge's lax.cond), and the parameter and optimizer-state bytes each device
holds. Writes bench/results/mhlora_<size>[_<N>dev].json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from _common import RESULTS, meta, write_json


def _devices_flag() -> int:
  """--devices N, read before JAX starts: on CPU, N host devices."""
  for i, arg in enumerate(sys.argv):
    if arg.startswith("--devices"):
      return int(arg.split("=", 1)[1] if "=" in arg else sys.argv[i + 1])
  return 1


if _devices_flag() > 1:  # affects the CPU platform only; GPUs are used as they are
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_devices_flag()}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import gpt2_124m_mhlora  # noqa: E402
from lowrank_jax.train import collectives, parallel  # noqa: E402
from lowrank_jax.train.config import resolve  # noqa: E402
from lowrank_jax.train.setup import build_setup, init_state, param_count, trainable_count  # noqa: E402

MiB = 2**20
# Variant -> (method variant, config.parallel overrides).
VARIANTS = {
    "full": ("full", {}),
    "mhlora": ("mhlora", {}),
    "parallel": ("parallel", {}),
    "parallel, heads per device (shard_map)": ("parallel", {"shard_heads": True}),
    "parallel, heads per device (pmap)": ("parallel", {"shard_heads": True, "mode": "pmap"}),
}


def make_config(size: str, variant: str, batch: int, seq: int, heads: int, rank: int, parallel_overrides=None):
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
  for key, value in (parallel_overrides or {}).items():
    config.parallel[key] = value
  return config


def communication(setup, state) -> dict:
  """Bytes moved by the compiled step's collectives (every step / only at merges), and held per device."""
  hlo = setup.compiled_step.lower(setup.abstract_state, setup.abstract_tokens()).compile().as_text()
  every, merges = collectives.bytes_per_step(hlo)
  return {"comm_every_step_bytes": every, "comm_at_merge_bytes": merges,
          "params_bytes_per_device": parallel.bytes_per_device(state.params),
          "opt_state_bytes_per_device": parallel.bytes_per_device(state.opt_state)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", default="124m")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--rank", type=int, default=32)
  parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
  parser.add_argument("--devices", type=int, default=1,
                      help="devices to use (on CPU, host devices); > 1 adds heads spread over devices")
  args = parser.parse_args()
  if jax.device_count() != args.devices:
    sys.exit(f"--devices {args.devices}, but JAX sees {jax.device_count()} devices")
  info = meta(args)

  variants = list(VARIANTS) if args.devices > 1 else ["full", "mhlora", "parallel"]
  runs = {}
  for v in variants:
    method_variant, overrides = VARIANTS[v]
    config = make_config(args.size, method_variant, args.batch, args.seq, args.heads, args.rank, overrides)
    setup = build_setup(resolve(config), 258)
    state = init_state(setup, 258)
    tokens = np.random.default_rng(0).integers(2, 258, (1, args.batch, args.seq), dtype=np.int32)
    start = time.perf_counter()
    state, _ = setup.train_step(state, tokens)
    jax.block_until_ready(state)
    runs[v] = {"setup": setup, "state": state, "tokens": tokens, "compile_s": time.perf_counter() - start,
               "times": [], "params": param_count(setup), "trainable": trainable_count(setup),
               **communication(setup, state)}
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
                 "compile_s": r["compile_s"],
                 **{k: r[k] for k in ("comm_every_step_bytes", "comm_at_merge_bytes", "params_bytes_per_device",
                                      "opt_state_bytes_per_device")}})
  print(f"\nGPT-2 {args.size}, batch {args.batch} x {args.seq}, {args.heads} heads of rank {args.rank} on q,k,v,o, "
        f"float32, {args.devices} x {jax.devices()[0].device_kind}; median of {args.steps} steps\n")
  if args.devices == 1:
    print("| training | step time | x full | trained parameters | x full |")
    print("|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['variant']} | {1e3 * r['step_s']:,.0f} ms | {r['step_ratio']:.2f} | {r['trainable'] / 1e6:.2f}M "
            f"| {r['trainable_ratio']:.3f} |")
  else:
    print("| training | step time | x full | trained parameters | communicated every step | at a merge "
          "| params + opt. state per device |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
      held = (r["params_bytes_per_device"] + r["opt_state_bytes_per_device"]) / MiB
      print(f"| {r['variant']} | {1e3 * r['step_s']:,.0f} ms | {r['step_ratio']:.2f} | {r['trainable'] / 1e6:.2f}M "
            f"| {r['comm_every_step_bytes'] / MiB:,.1f} MiB | {r['comm_at_merge_bytes'] / MiB:,.1f} MiB "
            f"| {held:,.0f} MiB |")
  suffix = f"_{args.devices}dev" if args.devices > 1 else ""
  out = os.path.join(RESULTS, f"mhlora_{args.size}{suffix}.json")
  write_json(out, {"args": vars(args), "backend": jax.devices()[0].platform,
                   "device_kind": jax.devices()[0].device_kind, "rows": rows}, meta=info, indent=2)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
