"""What the fused attention kernels save: the train step's compiled peak with `model.attention=xla`
against `splash` (Pallas' flash attention for TPU), compiled ahead of time for a TPU on this host.

  python bench/attention_memory.py                       # tpu-v5e, every case (about 30 min on 2 cores)
  python bench/attention_memory.py --target tpu-v5p --only 7b

Each case is `train.py --memory_report --memory_programs=step` in its own process (the refresh
program has no attention). With XLA's kernel the backward keeps the [T, T] softmax of every head
of every block that is not recomputed; splash keeps q, k, v, the output and one logsumexp per
query. The cases, each with the tokens per micro-batch of its shipped config: LLaMA-7B GaLore with
the lean settings of configs/llama_7b_galore.py (remat per block: only one block's scores are ever
live) at the recipe's 256-token rows and at 2048-token rows, and LLaMA-1b AdamW
(configs/llama_1b_adamw.py, no remat) at 2048-token rows in one micro-batch.
The cuDNN kernel (`model.attention=cudnn`) needs a GPU and is measured by bench/gpu_session.sh.

Writes bench/results/attention_<target>.json after every case and prints a table.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from _common import OFFLINE_DATA, RESULTS, meta, write_json
from memory_report_all import GIB, report

KERNELS = ("xla", "splash")
# name -> (config, {key: value}): the shipped config with only the sequence length and rows changed.
CASES = {
    "7b_galore_T256": ("llama_7b_galore", {}),
    "7b_galore_T2048": ("llama_7b_galore", {"data.seq_len": 2048, "train.batch_size": 2}),
    "1b_adamw_T2048": ("llama_1b_adamw", {"data.seq_len": 2048, "train.batch_size": 8, "train.grad_accum": 1}),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--target", default="tpu-v5e", help="a TPU memory target (tpu-v5e, tpu-v5p, tpu-v6e)")
  parser.add_argument("--only", default="", help="comma-separated substrings of the case names to run")
  args = parser.parse_args()
  out_path = os.path.join(RESULTS, f"attention_{args.target}.json")
  info, rows = meta(args), []
  with tempfile.TemporaryDirectory() as tmp:
    for case, (config, overrides) in CASES.items():
      if args.only and not any(s in case for s in args.only.split(",")):
        continue
      for kernel in KERNELS:
        settings = {**OFFLINE_DATA, **overrides, "model.attention": kernel}
        row = report(config, args.target, "step", [f"--config.{k}={v}" for k, v in settings.items()], tmp)
        row.update(case=case, attention=kernel, seq_len=overrides.get("data.seq_len", 256))
        rows.append(row)
        peak = f"{row['peak_bytes'] / GIB:.2f} GiB" if row.get("peak_bytes") else row.get("error", "")
        print(f"{case} {kernel}: exit {row['exit_code']}, {row['wall_s']} s, peak {peak}", flush=True)
        write_json(out_path, {"target": args.target, "rows": rows}, meta=info)
  print("\n| case | peak xla (GiB) | peak splash (GiB) | splash / xla |\n|---|---|---|---|")
  for case in dict.fromkeys(r["case"] for r in rows):
    peaks = {r["attention"]: r.get("peak_bytes") for r in rows if r["case"] == case}
    x, s = peaks.get("xla"), peaks.get("splash")
    print(f"| {case} | {x / GIB if x else float('nan'):.2f} | {s / GIB if s else float('nan'):.2f} | "
          f"{s / x if x and s else float('nan'):.3f} |")


if __name__ == "__main__":
  main()
