"""int8 trainable weights (`model.weight_bits=8`) against bf16 weights: quality and CPU step time (issue #25).

Quality: tiny LLaMA on the C4 sample, exactly the runs of `bench/quality.py --quick` (its MODES["quick"],
its RUN_KEYS, the real trainer in a fresh process per run: `quality.run_trainer`), at each method's
tuned lr (the best lr in bench/results/quality_quick.json), every run with bf16 parameters and compute
(`model.dtype=model.param_dtype=bfloat16`), once with the weights stored as bf16 (weight_bits=16) and
once as int8 codes + per-column float32 scales with stochastic rounding (weight_bits=8): the storage is
the only difference. Per method and seed the ratio of final eval losses int8 / bf16 (same seed: same
init, same batches), their mean, and each arm's seed spread (max - min over seeds). Goal: <= 1.01.

Speed: the trainer's compiled step (`build_setup`, as `train.py` runs it: forward, backward,
clipping, update; int8: dequantize per layer, requantize with stochastic rounding) of
configs/llama_60m_adamw.py (bf16 params) at a small CPU batch, both arms compiled ahead of time
in ONE process and stepped alternately (the order flips every round), random tokens; median
ms/step after warm-up and the median of per-round ratios int8 / bf16. Goal: <= 1.3.

  python bench/int8_weights.py                                     # both sections, ~10 min on 2 idle cores
  python bench/int8_weights.py --steps 6 --rounds 2 --out /tmp/int8_dry.json   # a dry run of the harness
  python bench/int8_weights.py --sections speed --batch 8

Writes bench/results/int8_weights.json (or --out) and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

from _common import OFFLINE_DATA, RESULTS, ROOT, T5_VOCAB, load_config, meta, write_json
import quality

METHODS = ("adamw", "galore", "apollo_mini")
BF16 = {"model.dtype": "bfloat16", "model.param_dtype": "bfloat16"}
QUALITY_GOAL, SPEED_GOAL = 1.01, 1.3
ARMS = (16, 8)  # weight_bits: bf16 storage, int8 storage


def _label(bits: int) -> str:
  return "bf16" if bits == 16 else "int8"


# --- quality --------------------------------------------------------------------------------------

def tuned_lrs(path: str, methods: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
  """{method: best lr} from a quality_quick.json, and the float32 losses it recorded at that lr (seeds 0, 1...)."""
  with open(path) as f:
    report = json.load(f)
  lrs, reference = {}, {}
  for m in methods:
    entry = report["methods"][m]
    lrs[m] = float(entry["best_lr"])
    reference[m] = {"seed_losses": entry.get("seed_losses"), "eval_loss": entry.get("eval_loss"),
                    "commit": report.get("meta", {}).get("commit"), "dtype": "float32"}
  return lrs, reference


def run_quality(args, lrs: dict[str, float]) -> dict[str, Any]:
  mode = dict(quality.MODES["quick"])
  if args.steps:
    mode["train.steps"] = args.steps
  base = {**mode, **quality.RUN_KEYS, **BF16}
  base.setdefault("train.eval_every", max(1, base["train.steps"] // 8))
  configs = quality.tiny_methods()
  scratch = tempfile.mkdtemp(prefix="lowrank_int8_")
  counter = iter(range(10**9))

  def one(method: str, seed: int, bits: int) -> dict[str, Any]:
    overrides = {**base, "optimizer.lr": lrs[method], "seed": seed, "model.weight_bits": bits}
    workdir = os.path.join(scratch, f"run{next(counter)}")
    try:
      result = quality.run_trainer(configs[method], overrides, workdir, threads=1 if args.jobs > 1 else None)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    print(f"  {method:<12} seed {seed} {_label(bits)}: eval loss {result['eval_loss']:.4f}  "
          f"({result['wall_s']:.0f}s wall, {result['cpu_s']:.0f}s CPU)"
          + (f"  FAILED: {result['error']}" if "error" in result else ""), flush=True)
    return result

  jobs = [(m, s, b) for m in args.methods for s in range(args.seeds) for b in ARMS]
  start = time.perf_counter()
  try:
    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:
      futures = {job: pool.submit(one, *job) for job in jobs}
      runs = {job: fut.result() for job, fut in futures.items()}
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  wall = time.perf_counter() - start

  methods: dict[str, Any] = {}
  for m in args.methods:
    losses = {_label(b): [runs[(m, s, b)]["eval_loss"] for s in range(args.seeds)] for b in ARMS}
    per_seed = [i8 / bf if math.isfinite(i8) and math.isfinite(bf) else math.inf
                for bf, i8 in zip(losses["bf16"], losses["int8"])]
    mean = {k: statistics.fmean(v) for k, v in losses.items()}
    methods[m] = {
        "config": os.path.relpath(configs[m], ROOT), "lr": lrs[m], "eval_loss": losses, "mean_eval_loss": mean,
        "seed_spread": {k: (max(v) - min(v)) if len(v) > 1 else None for k, v in losses.items()},
        "ratio_per_seed": per_seed, "ratio_mean": statistics.fmean(per_seed),
        "ratio_of_means": mean["int8"] / mean["bf16"],
        "within_goal": statistics.fmean(per_seed) <= QUALITY_GOAL,
        "runs": {f"{_label(b)}_seed{s}": {k: v for k, v in runs[(m, s, b)].items() if k != "overrides"}
                 for s in range(args.seeds) for b in ARMS},
    }
  cpu = sum(r["cpu_s"] for r in runs.values())
  tokens = base["train.steps"] * base["train.batch_size"] * base["data.seq_len"]
  settings = {k: v for k, v in base.items() if k not in ("data.path", "data.eval_path")}
  return {"settings": settings, "tokens_per_run": tokens, "seeds": args.seeds, "jobs": args.jobs,
          "runs": len(runs), "wall_s": wall, "cpu_s": cpu, "methods": methods}


# --- speed ----------------------------------------------------------------------------------------

def speed_config(args, bits: int):
  return load_config(os.path.join(ROOT, "configs", f"llama_{args.size}_adamw.py"), [
      f"model.size={args.size!r}", "model.dtype='bfloat16'", "model.param_dtype='bfloat16'",
      f"model.weight_bits={bits}", f"train.batch_size={args.batch}", "train.grad_accum=1",
      f"data.seq_len={args.seq}", *(f"{k}={v!r}" for k, v in OFFLINE_DATA.items())])


class Stepper:
  """One arm's compiled trainer step (compiled ahead of time), its state and a fixed batch."""

  def __init__(self, args, bits: int):
    import jax
    import numpy as np

    from lowrank_jax.train.config import resolve
    from lowrank_jax.train.setup import build_setup, init_state

    run = resolve(speed_config(args, bits))
    self.setup = setup = build_setup(run, T5_VOCAB)
    self.state = init_state(setup, T5_VOCAB)
    t0 = time.perf_counter()
    self.compiled = setup.compiled_step.lower(setup.abstract_state, setup.abstract_tokens()).compile()
    self.compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    self.tokens = setup.step_tokens(rng.integers(0, T5_VOCAB, setup.tokens_shape, dtype=np.int32))
    jax.block_until_ready(self.tokens)
    self.param_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.state.params)))
    self.loss = None

  def step(self) -> float:
    import jax

    t0 = time.perf_counter()
    self.state, metrics = self.compiled(self.state, self.tokens)
    jax.block_until_ready((self.state, metrics))
    elapsed = time.perf_counter() - t0
    self.loss = float(metrics["loss"])
    return elapsed


def run_speed(args) -> dict[str, Any]:
  arms = {}
  for bits in ARMS:
    print(f"[speed] compiling {args.size} {_label(bits)} (batch {args.batch} x {args.seq}) ...", flush=True)
    arms[bits] = Stepper(args, bits)
  first = {_label(b): arms[b].step() for b in ARMS}
  for _ in range(args.warmup - 1):
    for b in ARMS:
      arms[b].step()
  rounds = []
  for i in range(args.rounds):
    order = ARMS if i % 2 == 0 else ARMS[::-1]  # no arm always runs right after the other
    times = {b: arms[b].step() for b in order}
    rounds.append({_label(b): times[b] for b in ARMS})
    print(f"[speed] round {i + 1}/{args.rounds}: " + ", ".join(f"{k} {1e3 * v:,.0f} ms" for k, v in rounds[-1].items()),
          flush=True)
  per = [r["int8"] / r["bf16"] for r in rounds]
  rows = {}
  for b in ARMS:
    k = _label(b)
    times = [r[k] for r in rounds]
    rows[k] = {"weight_bits": b, "step_s": statistics.median(times), "step_s_min": min(times), "step_s_all": times,
               "first_step_s": first[k], "compile_s": arms[b].compile_s, "param_bytes": arms[b].param_bytes,
               "tokens_per_s": args.batch * args.seq / statistics.median(times), "last_loss": arms[b].loss}
  ratio = {"median": statistics.median(per), "min": min(per), "max": max(per), "n": len(per),
           "of_medians": rows["int8"]["step_s"] / rows["bf16"]["step_s"]}
  return {"config": f"configs/llama_{args.size}_adamw.py", "size": args.size, "batch": args.batch, "seq": args.seq,
          "vocab": T5_VOCAB, "warmup_steps": args.warmup, "rounds": args.rounds, "rows": rows, "ratio": ratio,
          "within_goal": ratio["median"] <= SPEED_GOAL, "loadavg_end": list(os.getloadavg())}


# --- report ---------------------------------------------------------------------------------------

def format_report(result: dict[str, Any]) -> str:
  lines = []
  q = result.get("quality")
  if q:
    lines += [f"Quality: tiny LLaMA, C4 sample, {q['settings']['train.steps']} steps, bf16 params and compute; "
              f"final eval loss (seeds {', '.join(map(str, range(q['seeds'])))}); goal int8/bf16 <= {QUALITY_GOAL}",
              "| method | lr | bf16 eval loss (per seed) | int8 eval loss (per seed) | int8/bf16 per seed | "
              "int8/bf16 mean | seed spread bf16 | seed spread int8 | float32 (quality_quick.json) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m, e in q["methods"].items():
      f = lambda xs: ", ".join(f"{x:.4f}" for x in xs)  # noqa: E731
      ref = (result.get("float32_reference") or {}).get(m, {}).get("seed_losses") or []
      spread = lambda k: "-" if e["seed_spread"][k] is None else f"{e['seed_spread'][k]:.4f}"  # noqa: E731
      lines.append(f"| {m} | {e['lr']:.3g} | {e['mean_eval_loss']['bf16']:.4f} ({f(e['eval_loss']['bf16'])}) | "
                   f"{e['mean_eval_loss']['int8']:.4f} ({f(e['eval_loss']['int8'])}) | "
                   f"{', '.join(f'{x:.4f}' for x in e['ratio_per_seed'])} | {e['ratio_mean']:.4f} | "
                   f"{spread('bf16')} | {spread('int8')} | {f(ref) or '-'} |")
    lines.append(f"{q['runs']} runs, {q['wall_s']:.0f}s wall, {q['cpu_s']:.0f}s CPU")
  s = result.get("speed")
  if s:
    r = s["ratio"]
    lines += ["", f"Speed: LLaMA-{s['size']} ({s['config']}, bf16), batch {s['batch']} x {s['seq']}, trainer step, "
              f"{s['rounds']} interleaved rounds after {s['warmup_steps']} warm-up step(s); goal int8/bf16 <= {SPEED_GOAL}",
              "| weights | median ms/step | min ms/step | first step ms | compile s | param MiB |", "|---|---|---|---|---|---|"]
    for k, row in s["rows"].items():
      lines.append(f"| {k} | {1e3 * row['step_s']:,.0f} | {1e3 * row['step_s_min']:,.0f} | "
                   f"{1e3 * row['first_step_s']:,.0f} | {row['compile_s']:.1f} | {row['param_bytes'] / 2**20:,.1f} |")
    lines.append(f"int8/bf16 step time: median of per-round ratios {r['median']:.3f} [{r['min']:.3f}, {r['max']:.3f}] "
                 f"(n={r['n']}); ratio of medians {r['of_medians']:.3f}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sections", default="quality,speed", help="comma list of quality, speed")
  parser.add_argument("--methods", default=",".join(METHODS), help="quality: methods (configs/llama_tiny_<m>.py)")
  parser.add_argument("--seeds", type=int, default=2, help="quality: seeds 0..N-1 per method and arm")
  parser.add_argument("--steps", type=int, default=0, help="quality: train.steps (default: quality.py --quick's)")
  parser.add_argument("--lrs", default=os.path.join(RESULTS, "quality_quick.json"),
                      help="quality: the JSON whose best lr per method is used")
  parser.add_argument("--jobs", type=int, default=2, help="quality: runs side by side (one XLA thread each when > 1)")
  parser.add_argument("--size", default="60m", help="speed: LLaMA size (configs/llama_<size>_adamw.py)")
  parser.add_argument("--batch", type=int, default=4, help="speed: micro-batch (one micro-batch per step)")
  parser.add_argument("--seq", type=int, default=256, help="speed: sequence length")
  parser.add_argument("--warmup", type=int, default=2, help="speed: untimed steps per arm (the first included)")
  parser.add_argument("--rounds", type=int, default=10, help="speed: timed rounds (one step of each arm)")
  parser.add_argument("--out", default=os.path.join(RESULTS, "int8_weights.json"), help="output JSON")
  args = parser.parse_args(argv)
  sections = [s for s in args.sections.split(",") if s]
  if set(sections) - {"quality", "speed"} or args.warmup < 1 or args.rounds < 1 or args.seeds < 1:
    parser.error("--sections from quality,speed; --warmup, --rounds, --seeds >= 1")
  args.methods = [m for m in args.methods.split(",") if m]
  unknown = [m for m in args.methods if m not in quality.tiny_methods()]
  if unknown:
    parser.error(f"--methods: no configs/llama_tiny_<method>.py for {unknown}")
  info = meta(args)
  start = time.perf_counter()
  result: dict[str, Any] = {
      "command": " ".join(["python", "bench/int8_weights.py", *(argv if argv is not None else sys.argv[1:])]),
      "goals": {"quality_int8_over_bf16": QUALITY_GOAL, "speed_int8_over_bf16": SPEED_GOAL}}
  if "quality" in sections:
    lrs, reference = tuned_lrs(args.lrs, args.methods)
    result["lr_source"] = os.path.relpath(args.lrs, ROOT)
    result["float32_reference"] = reference
    result["quality"] = run_quality(args, lrs)
    write_json(args.out, quality._strict(result), meta=info)  # pylint: disable=protected-access
  if "speed" in sections:
    result["speed"] = run_speed(args)
  result["wall_s"] = time.perf_counter() - start
  result["note"] = ("Quality ratios pair the two arms seed by seed (same init, same batches); a ratio within the "
                    "seed spread / loss is no difference. The speed ratio is at a small CPU batch, where the "
                    "per-step weight update (requantizing every int8 weight) weighs most against the "
                    "forward/backward; it falls as tokens per step grow.")
  write_json(args.out, quality._strict(result), meta=info)  # pylint: disable=protected-access
  print(format_report(result))
  print(f"wrote {args.out} ({result['wall_s']:.0f}s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
