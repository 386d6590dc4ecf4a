"""Memory reports of several configs side by side, as ratios to the first.

  python bench/memory_table.py --name relora_130m \
      configs/llama_130m_adamw.py configs/llama_130m_lora.py configs/llama_130m_relora.py \
      --set train.grad_accum=16

Each config's train step is compiled on abstract shapes (nothing is allocated; see
`python train.py --memory_report`). Prints a markdown table and writes
bench/results/memory_<name>.json. Every row is measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _common import RESULTS, load_config, meta, write_json
from lowrank_jax.train import memory_report

MIB = 2**20


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("configs", nargs="+", help="config files; CONFIG:KEY=VALUE;KEY=VALUE adds row overrides")
  parser.add_argument("--set", action="append", default=[], help="KEY=VALUE override for every row")
  parser.add_argument("--name", required=True, help="results go to bench/results/memory_<name>.json")
  args = parser.parse_args()
  info = meta(args)

  rows = []
  for entry in args.configs:
    path, _, extra = entry.partition(":")
    row_overrides = [x for x in extra.split(";") if x]
    config = load_config(path, args.set + row_overrides)
    start = time.perf_counter()
    report = memory_report(config)
    label = os.path.splitext(os.path.basename(path))[0] + (f" ({', '.join(row_overrides)})" if row_overrides else "")
    rows.append({"config": label, "compile_s": time.perf_counter() - start, **report})
    print(f"measured {label} in {rows[-1]['compile_s']:.1f}s", file=sys.stderr)

  base = rows[0]
  print(f"\n{base['model']}; per-step batch {base['batch_tokens']}; overrides {args.set}\n")
  print("| config | optimizer state MiB | x | params MiB | temporaries MiB | peak MiB | x |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['config']} | {r['opt_state_bytes'] / MIB:,.1f} | {r['opt_state_bytes'] / base['opt_state_bytes']:.3f} "
          f"| {r['params_bytes'] / MIB:,.1f} | {r['temp_bytes'] / MIB:,.1f} | {r['peak_bytes'] / MIB:,.1f} "
          f"| {r['peak_bytes'] / base['peak_bytes']:.3f} |")
  out = write_json(os.path.join(RESULTS, f"memory_{args.name}.json"), {"overrides": args.set, "rows": rows},
                   meta=info, indent=2)
  print(f"\nwrote {out}")


if __name__ == "__main__":
  main()
