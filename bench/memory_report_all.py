"""`train.py --memory_report` for every shipped config on one memory target, each in its own process.

  python bench/memory_report_all.py --target tpu-v5e                 # every config, every program
  python bench/memory_report_all.py --target tpu-v5e --programs step --only llama_1b
  python bench/memory_report_all.py --target tpu-v5e --resume        # only configs not yet in the JSON

It checks that the report works for each config on this host and how long it takes, and collects
the figures: peak bytes per device, the capacity and whether the run fits. The inputs a user brings
are stood in for, since a memory report needs only their shapes: the ViT-B/16 configs read a
9-class 224 x 224 npz in PathMNIST's layout written here (3 images per split); the fine-tuning
configs read a few Alpaca-format records written here, and already point at configs/hf/llama_7b
(a config.json without weights). Prints a markdown
table and writes bench/results/memory_report_all_<target>[_<programs>].json after every config.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from _common import OFFLINE_DATA, RESULTS, ROOT, config_module, meta, write_json
from lowrank_jax.data import images

GIB = 2**30
NOT_RUN_CONFIGS = ("base", "c4_recipe", "gpt2_recipe", "__init__")  # building blocks, not runs


def shipped_configs() -> list[str]:
  names = [os.path.basename(p)[:-3] for p in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))]
  return [n for n in names if n not in NOT_RUN_CONFIGS]


def stand_in_pathmnist(directory: str) -> str:
  """A PathMNIST-layout npz with PathMNIST's shape (224 x 224 RGB, 9 classes), 3 images per split."""
  path = os.path.join(directory, "pathmnist_224_stand_in.npz")
  rng = np.random.default_rng(0)
  split = lambda: (rng.integers(0, 256, (9, 224, 224, 3), dtype=np.uint8), np.arange(9))  # noqa: E731
  images.write_medmnist_npz(path, {"train": split(), "val": split(), "test": split()})
  return path


def stand_in_alpaca(directory: str) -> str:
  """Alpaca-format JSON lines (instruction / input / output), a few records."""
  path = os.path.join(directory, "alpaca_stand_in.jsonl")
  record = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
  with open(path, "w") as f:
    f.writelines(json.dumps(record) + "\n" for _ in range(64))
  return path


def report(name: str, target: str, programs: str | None, extra: list[str], log_dir: str) -> dict:
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", f"{name}.py"),
         "--memory_report", f"--memory_target={target}", *extra]
  if programs:
    cmd.append(f"--memory_programs={programs}")
  log = os.path.join(log_dir, f"{name}.log")
  start, cpu_start = time.perf_counter(), os.times()
  with open(log, "w") as out:
    rc = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
  cpu_end = os.times()
  row = {"config": name, "exit_code": rc, "wall_s": round(time.perf_counter() - start, 1),
         "cpu_s": round((cpu_end.children_user - cpu_start.children_user)
                        + (cpu_end.children_system - cpu_start.children_system), 1),
         "programs": programs or "all", "overrides": extra}
  lines = open(log).read().splitlines()
  result = next((json.loads(line) for line in reversed(lines) if line.startswith("{")), None)
  if result is not None:
    row.update({k: result.get(k) for k in ("peak_bytes", "params_bytes", "opt_state_bytes", "temp_bytes",
                                           "capacity_bytes", "fits")})
  else:
    row["error"] = lines[-1] if lines else "(no output)"
  return row


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--target", default="tpu-v5e", help="the --memory_target (cpu, tpu-v5e, tpu-v5p, tpu-v6e, gpu)")
  parser.add_argument("--programs", default=None, help="--memory_programs (default: every program the run executes)")
  parser.add_argument("--only", default="", help="comma-separated name prefixes of the configs to run")
  parser.add_argument("--resume", action="store_true", help="keep the rows already in the JSON; run the others")
  args = parser.parse_args()

  suffix = f"_{args.programs.replace(',', '+')}" if args.programs else ""
  out_path = os.path.join(RESULTS, f"memory_report_all_{args.target}{suffix}.json")
  info = meta(args)
  rows = {}
  if args.resume and os.path.exists(out_path):
    with open(out_path) as f:
      previous = json.load(f)
    rows = {r["config"]: r for r in previous["rows"] if r["exit_code"] == 0}
    if rows:  # those rows were measured then, not now
      info["resumed_rows_meta"] = previous.get("meta")
  names = [n for n in shipped_configs()
           if not args.only or any(n.startswith(p) for p in args.only.split(","))]
  with tempfile.TemporaryDirectory() as tmp:
    pathmnist = None
    for name in names:
      if name in rows:
        continue
      extra = [f"--config.{k}={v}" for k, v in OFFLINE_DATA.items()] if config_module(name).get_config().data.source == "hf" else []
      if name.startswith("vit_b16"):
        pathmnist = pathmnist or stand_in_pathmnist(tmp)
        extra = [f"--config.data.path={pathmnist}", "--config.data.eval_split=val"]
      if name.startswith("llama_sft"):
        extra = [f"--config.data.path={stand_in_alpaca(tmp)}"]
      row = report(name, args.target, args.programs, extra, tmp)
      rows[name] = row
      peak = f"{row['peak_bytes'] / GIB:.2f} GiB" if row.get("peak_bytes") else row.get("error", "")
      print(f"{name}: exit {row['exit_code']}, {row['wall_s']} s, {peak}, fits {row.get('fits')}", flush=True)
      write_json(out_path, {"target": args.target, "rows": list(rows.values())}, meta=info)

  print("\n| config | exit | wall s | peak GiB | capacity GiB | fits |\n|---|---|---|---|---|---|")
  for row in rows.values():
    peak = f"{row['peak_bytes'] / GIB:.2f}" if row.get("peak_bytes") else "-"
    cap = f"{row['capacity_bytes'] / GIB:.2f}" if row.get("capacity_bytes") else "-"
    print(f"| {row['config']} | {row['exit_code']} | {row['wall_s']} | {peak} | {cap} | {row.get('fits')} |")
  print(f"\nwrote {out_path}")


if __name__ == "__main__":
  main()
