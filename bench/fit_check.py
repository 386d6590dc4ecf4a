"""Does `train.py --fit` answer right? Predicted against compiled peaks, and the cost of its choice.

For each (config, target) case, `train.py --config C --fit TARGET` runs in its own process (its wall
time is the planner's, one verifying compile included) and this table reads its JSON line:

* predicted: the planner's peak for the candidate it chose, before the verifying compile;
* compiled: the compiler's peak for it (the verification); the ratio must be within 10%;
* fits: the chosen candidate compiles and fits;
* relative FLOPs: its model FLOPs per step over the config's own (the hand-tuned settings of the
  README's memory tables: the config files as shipped); the goal is <= 1.05;
* wall: the planner's time on this host (goals: 7b <= 12 min, 1b <= 4 min).

Cases: 1b and 7b x AdamW, GaLore, APOLLO-Mini, LoRA (the 7b SFT config; at 1b the C4 config with
LoRA adapters alone trained) x tpu-v5e, tpu-v5p; and 7b GaLore at 2048-token rows (`7b_galore_T2048`). The data are the shipped C4 sample and tokenizer (the
planner reads the vocabulary only); the programs compiled are the train step's (`--memory_programs=step`,
as the README's 7b tables; a refresh program's SVD compiles for many minutes on the TPU targets).

  python bench/fit_check.py                                  # every case (hours on a 2-core host)
  python bench/fit_check.py --cases 1b --targets tpu-v5e     # a subset; rows are merged into the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import OFFLINE_DATA, RESULTS, ROOT, meta, write_json

GIB = 2**30
OUT = os.path.join(RESULTS, "fit_check.json")
_LORA_1B = ["--config.optimizer.name=lora", "--config.optimizer.lora.layers=q,k,v,o,gate,up,down",
            "--config.optimizer.lora.rank=64", "--config.optimizer.lora.train_rest=False", "--config.optimizer.lr=2e-4"]
# The README memory tables' hand-tuned settings per case, as overrides of the config (the 7b configs
# ship them; the 1b rows there add remat per block); FLOPs are compared per token.
HAND_TUNED = {"1b_adamw": {"model.remat": "block"}, "1b_galore": {"model.remat": "block"},
              "1b_apollo_mini": {"model.remat": "block"}, "1b_lora": {"model.remat": "block"}}
CASES = {  # name -> (config, extra flags)
    "1b_adamw": ("llama_1b_adamw", []),
    "1b_galore": ("llama_1b_galore", []),
    "1b_apollo_mini": ("llama_1b_apollo_mini", []),
    "1b_lora": ("llama_1b_adamw", _LORA_1B),
    "7b_adamw": ("llama_7b_adamw", []),
    "7b_galore": ("llama_7b_galore", []),
    "7b_apollo_mini": ("llama_7b_apollo_mini", []),
    "7b_lora_sft": ("llama_sft_lora", ["SFT"]),
    # 2048-token rows, the tokens per step kept: XLA's attention does not fit tpu-v5e, splash does.
    "7b_galore_T2048": ("llama_7b_galore", ["--config.data.seq_len=2048", "--config.train.batch_size=2"]),
}


def _data_flags(extra: list[str], tmp: str) -> list[str]:
  if extra[:1] == ["SFT"]:
    import memory_report_all  # (the bench next door: its stand-in Alpaca file)
    return [f"--config.data.path={memory_report_all.stand_in_alpaca(tmp)}"]
  return [f"--config.{k}={v}" for k, v in OFFLINE_DATA.items()] + extra


def run_case(name: str, target: str, tmp: str) -> dict:
  config, extra = CASES[name]
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", f"{config}.py"),
         *_data_flags(extra, tmp), "--fit", target, "--memory_programs=step"]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT})
  wall = round(time.perf_counter() - start, 1)
  lines = proc.stdout.splitlines()
  answer = next((json.loads(line) for line in reversed(lines) if line.startswith("{")), None)
  row = {"case": name, "config": config, "target": target, "wall_s": wall, "exit_code": proc.returncode,
         "log": [line for line in lines if not line.startswith("{")][-12:]}
  if answer is None:
    row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return row
  row.update(fits=answer["fits"], verified=answer["verified"], overrides=answer["overrides"])
  compiled = [r for r in answer["rows"] if r.get("compiled_bytes")]
  if not answer["fits"] and compiled:  # the closest candidate, compiled: the compiler's bytes needed
    closest = min(compiled, key=lambda r: r["compiled_bytes"])
    row.update(needs_bytes=closest["compiled_bytes"], needs_predicted_bytes=closest["predicted_bytes"],
               needs_overrides=closest["overrides"],
               needs_predicted_over_compiled=round(closest["predicted_bytes"] / closest["compiled_bytes"], 4))
  chosen = answer["rows"][0] if answer["fits"] else None
  if chosen:
    row.update(predicted_bytes=chosen["predicted_bytes"], compiled_bytes=chosen["compiled_bytes"],
               relative_flops=chosen["relative_flops"], relative_cost=chosen["relative_cost"])
    if chosen["compiled_bytes"]:
      row["predicted_over_compiled"] = round(chosen["predicted_bytes"] / chosen["compiled_bytes"], 4)
    row["hand_tuned"] = HAND_TUNED.get(name, {})
    row["flops_over_hand_tuned"] = round(_flops(name, tmp, answer["overrides"]) / _flops(name, tmp, row["hand_tuned"]), 4)
  return row


def _flops(name: str, tmp: str, overrides: dict) -> float:
  """The planner's model FLOPs per step of the case's config with `overrides` (its cost model alone)."""
  from _common import apply_overrides, load_config  # pylint: disable=g-import-not-at-top
  from lowrank_jax.train import fit  # pylint: disable=g-import-not-at-top
  config, extra = CASES[name]
  flags = [f[len("--config."):] for f in _data_flags(extra, tmp)]
  cfg = apply_overrides(load_config(os.path.join(ROOT, "configs", f"{config}.py")), flags)
  planner = fit.Planner(cfg, "1TiB", log=lambda _: None)
  # (a capacity planner resolves for this host, which refuses splash; the cost model counts the same
  # FLOPs for every attention kernel)
  overrides = {k: v for k, v in overrides.items() if k != "model.attention"}
  run = planner._candidate_run(overrides)  # pylint: disable=protected-access
  return planner.cost(run, planner.state(run))[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cases", default="all", help="comma list of case names or prefixes (1b, 7b_galore, ...)")
  parser.add_argument("--targets", default="tpu-v5e,tpu-v5p")
  args = parser.parse_args()
  info = meta(args)
  wanted = [c for c in CASES if args.cases == "all" or any(c.startswith(p) for p in args.cases.split(","))]
  old = json.load(open(OUT))["rows"] if os.path.exists(OUT) else []
  rows = {(r["case"], r["target"]): r for r in old}
  print(f"{'case':<16} {'target':<8} {'predicted':>10} {'compiled':>10} {'ratio':>6} {'fits':>5} {'FLOPs':>6} "
        f"{'wall':>6}  overrides", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    for target in args.targets.split(","):
      for name in wanted:
        row = run_case(name, target, tmp)
        row["measured"] = {k: info.get(k) for k in ("commit", "dirty", "date")}  # (rows merge across runs)
        rows[(name, target)] = row
        write_json(OUT, {"rows": list(rows.values()),
                         "note": "Rows merge across runs: the recorded commit is the last run's; each row's "
                                 "`measured` holds its own."}, meta=info)
        p, c = row.get("predicted_bytes"), row.get("compiled_bytes")
        print(f"{name:<16} {target:<8} {p / GIB if p else 0:>9.2f}G {c / GIB if c else 0:>9.2f}G "
              f"{row.get('predicted_over_compiled', 0):>6.3f} {str(row.get('fits')):>5} "
              f"{row.get('relative_flops', 0):>6.3f} {row['wall_s']:>5.0f}s  {row.get('overrides') or row.get('error')}",
              flush=True)


if __name__ == "__main__":
  main()
