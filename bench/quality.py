"""Quality benchmark: every method against a tuned full-rank baseline on real text.

For each method (one per `configs/llama_tiny_<method>.py`, so a newly registered method with a
tiny config appears here by itself) it sweeps the peak learning rate on a log grid around that
config's own lr, picks the best lr on the validation loss, re-runs the best lr with more seeds,
and reports eval loss, perplexity, the perplexity ratio to the best AdamW, the spread over
seeds, tokens seen and wall time. Every run is the real trainer (`python train.py ...`) in a
fresh process, so nothing here can differ from what a user runs.

  python bench/quality.py --quick                 # C4 sample, byte tokens, ~22 min on 2 idle CPU cores
  python bench/quality.py --quick --methods adamw,galore --steps 100
  python bench/quality.py --full --budget_s 420   # GaLore paper protocol at 60m (GPU)

Writes bench/results/quality_<mode>.json and, with matplotlib installed (`pip install -e
".[bench]"`), bench/results/quality_<mode>.png: eval-loss curves of every method at its best lr.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import glob
import itertools
import json
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from _common import RESULTS, ROOT, SHARED_DATA as SHARED, config_module, meta, pyplot, write_json

# Data and shape of each mode. Keys are trainer config keys (`--config.<key>=<value>`).
MODES: dict[str, dict[str, Any]] = {
    # Two cores, about 20 minutes: tiny LLaMA on the C4 sample with the byte tokenizer.
    "quick": {
        "model.size": "tiny",
        "data.source": "jsonl",
        "data.path": os.path.join(SHARED, "c4", "train.jsonl"),
        "data.eval_path": os.path.join(SHARED, "c4", "validation.jsonl"),
        "data.tokenizer": "byte",
        "data.seq_len": 128,
        "train.batch_size": 16,
        "train.steps": 200,
        "train.eval_batches": 8,
    },
    # The GaLore paper's protocol at 60m (T5 vocabulary, sequence 256); a GPU job.
    "full": {
        "model.size": "60m",
        "model.dtype": "bfloat16",
        "data.source": "jsonl",
        "data.path": os.path.join(SHARED, "c4", "train.jsonl"),
        "data.eval_path": os.path.join(SHARED, "c4", "validation.jsonl"),
        "data.tokenizer": os.path.join(SHARED, "tokenizers", "c4_t5_32k.model"),
        "data.seq_len": 256,
        "train.batch_size": 128,
        "train.steps": 400,
        "train.eval_batches": 8,
    },
    # The synthetic language, a handful of steps: the harness's own smoke test.
    "smoke": {
        "model.size": "tiny",
        "data.source": "synthetic",
        "data.seq_len": 32,
        "train.batch_size": 4,
        "train.steps": 4,
        "train.eval_batches": 1,
    },
}

# Keys every run sets: no progress bar, no intermediate checkpoints.
RUN_KEYS = {"train.progress_bar": False, "train.checkpoint_every": 0, "train.log_every": 5}


def tiny_methods() -> dict[str, str]:
  """{method: config path} for every `configs/llama_tiny_<method>.py`."""
  paths = sorted(glob.glob(os.path.join(ROOT, "configs", "llama_tiny_*.py")))
  return {os.path.basename(p)[len("llama_tiny_"):-3]: p for p in paths}


def config_lr(path: str) -> float:
  """The peak lr a config file sets (its tuned default, or the paper's)."""
  return float(config_module(os.path.basename(path)[:-3]).get_config().optimizer.lr)


def lr_grid(center: float, points: int, factor: float) -> list[float]:
  """`points` learning rates spaced by `factor` on a log grid around `center`.

  With an even count the grid leans one step up (most tiny configs were set low).
  """
  lo = -((points - 1) // 2)
  return [float(f"{center * factor ** k:.3g}") for k in range(lo, lo + points)]


def run_trainer(config_path: str, overrides: dict[str, Any], workdir: str, threads: int | None) -> dict[str, Any]:
  """One training run of the real trainer in its own process; its summary and eval curve."""
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={config_path}", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  env = dict(os.environ)
  if threads:  # several runs side by side: keep each process's XLA pool to its share of cores
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1").strip()
  os.makedirs(workdir, exist_ok=True)
  log_path = os.path.join(workdir, "output.log")
  start = time.perf_counter()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    # wait4 gives the run's own CPU time: on a shared machine wall time says little, while
    # CPU time / cores is what the run would take on idle ones.
    _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  wall = time.perf_counter() - start
  result: dict[str, Any] = {"overrides": overrides, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                            "returncode": proc.returncode}
  summary_path = os.path.join(workdir, "summary.json")
  if proc.returncode != 0 or not os.path.exists(summary_path):
    with open(log_path) as f:
      result["error"] = f.read().strip().splitlines()[-1:] or ["no output"]
    result["eval_loss"] = math.inf
    return result
  with open(summary_path) as f:
    summary = json.load(f)
  curve, train_curve = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if record.get("eval_loss") is not None:
        curve.append((record["step"], record["eval_loss"]))
      elif record.get("loss") is not None:
        train_curve.append((record["step"], record["loss"]))
  loss = summary.get("eval_loss")
  result.update(eval_loss=loss if loss is not None and math.isfinite(loss) else math.inf,
                train_loss=summary.get("train_loss"), tokens_per_s=summary.get("tokens_per_s"),
                trainable_params=summary.get("trainable_params"), eval_curve=curve, train_curve=train_curve)
  return result


def run_key(config_path: str, overrides: dict[str, Any]) -> str:
  """What makes a run: its config file and every override (lr, seed, data, shape)."""
  return json.dumps([os.path.relpath(config_path, ROOT), overrides], sort_keys=True)


def read_journal(path: str) -> dict[str, dict[str, Any]]:
  """{run_key: result} of the successful runs a journal holds (failed ones are run again)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return {r["key"]: r["result"] for r in records if r["result"].get("returncode") == 0}


Runner = Callable[[str, dict[str, Any]], dict[str, Any]]


class PriorityPool:
  """`jobs` worker threads that always start the waiting run of the earliest method first.

  So methods finish one after another in the order given (a stopped sweep holds whole methods,
  see --resume), and a method's follow-up runs (a step past an edge, its seeds) do not queue
  behind every other method's grid.
  """

  def __init__(self, jobs: int):
    self.queue: queue.PriorityQueue = queue.PriorityQueue()
    self.order = itertools.count()  # first come first served within a method
    self.threads = [threading.Thread(target=self._work, daemon=True) for _ in range(jobs)]
    for thread in self.threads:
      thread.start()

  def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> cf.Future:
    future: cf.Future = cf.Future()
    self.queue.put((priority, next(self.order), future, fn, args))
    return future

  def _work(self) -> None:
    while True:
      _, _, future, fn, args = self.queue.get()
      if fn is None:
        return
      try:
        future.set_result(fn(*args))
      except BaseException as error:  # handed to whoever waits on the future
        future.set_exception(error)

  def shutdown(self) -> None:
    for _ in self.threads:
      self.queue.put((math.inf, next(self.order), None, None, None))
    for thread in self.threads:
      thread.join()


def sweep(methods: dict[str, str], mode: dict[str, Any], *, points: int, factor: float, seeds: int,
          runner: Runner, jobs: int = 1, extend: int = 2, variants: dict[str, dict[str, str]] | None = None,
          grids: dict[str, list[float]] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The lr sweep of every method, then the extra seeds at each method's best lr.

  A method whose best lr sits at an edge of its grid gets one more lr beyond that edge (a factor
  further), up to `extend` times; `best_at_edge` says it is still at an edge after that.

  `variants` adds config overrides per method name (e.g. 8-bit states of a method).
  """
  variants = variants or {}
  base = {**mode, **RUN_KEYS}
  eval_every = max(1, base["train.steps"] // 8)
  base.setdefault("train.eval_every", eval_every)
  grids = {m: (grids or {}).get(m) or lr_grid(config_lr(p), points, factor) for m, p in methods.items()}
  tokens = base["train.steps"] * base["train.batch_size"] * base["data.seq_len"]

  def overrides(method, lr, seed):
    return {**base, **variants.get(method, {}), "optimizer.lr": lr, "seed": seed}

  results: dict[str, Any] = {}
  for m in methods:
    results[m] = {"config": os.path.relpath(methods[m], ROOT), "overrides": variants.get(m, {}),
                  "grid": grids[m], "sweep": {}}

  def best_and_edge(entry):
    runs = {float(lr): r for lr, r in entry["sweep"].items()}
    best_lr = min(runs, key=lambda lr: runs[lr]["eval_loss"])
    grid = sorted(runs)
    edge = None if len(grid) < 2 else -1 if best_lr == grid[0] else 1 if best_lr == grid[-1] else None
    return best_lr, edge

  def drive(rank, m):
    """One method's runs: its grid, a step past a best edge (up to `extend` times), then the seeds."""
    entry = results[m]

    def run_all(lrs, seed):
      futures = {lr: pool.submit(rank, runner, methods[m], overrides(m, lr, seed)) for lr in lrs}
      return {lr: fut.result() for lr, fut in futures.items()}

    def record(runs):
      for lr, run in runs.items():
        entry["sweep"][repr(lr)] = run
        log(f"  {m:<12} lr {lr:<8.3g} eval loss {run['eval_loss']:.4f}  ({run['wall_s']:.0f}s)"
            + (f"  FAILED: {run['error']}" if "error" in run else ""))

    record(run_all(grids[m], 0))
    for _ in range(extend):  # a best lr at the grid's edge may not be the best
      best_lr, edge = best_and_edge(entry)
      if not edge:
        break
      record(run_all([float(f"{best_lr * factor ** edge:.3g}")], 0))
    entry["best_lr"], edge = best_and_edge(entry)
    entry["best_at_edge"] = edge is not None
    futures = {s: pool.submit(rank, runner, methods[m], overrides(m, entry["best_lr"], s)) for s in range(1, seeds)}
    entry["seeds"] = {str(s): fut.result() for s, fut in futures.items()}

  pool = PriorityPool(jobs)
  try:
    with cf.ThreadPoolExecutor(max_workers=len(methods)) as drivers:
      for fut in [drivers.submit(drive, rank, m) for rank, m in enumerate(methods)]:
        fut.result()
  finally:
    pool.shutdown()

  for m, entry in results.items():
    best = entry["sweep"][repr(entry["best_lr"])]
    losses = [best["eval_loss"]] + [r["eval_loss"] for r in entry.get("seeds", {}).values()]
    finite = [x for x in losses if math.isfinite(x)]
    entry["seed_losses"] = losses
    entry["eval_loss"] = sum(finite) / len(finite) if finite else math.inf
    entry["eval_ppl"] = math.exp(entry["eval_loss"]) if finite else math.inf
    entry["seed_spread"] = (max(finite) - min(finite)) if len(finite) > 1 else None
    entry["tokens"] = tokens
    entry["wall_s"] = sum(r["wall_s"] for r in entry["sweep"].values()) + sum(
        r["wall_s"] for r in entry.get("seeds", {}).values())
    entry["eval_curve"] = best.get("eval_curve", [])
  if "adamw" in results and math.isfinite(results["adamw"]["eval_ppl"]):
    ref = results["adamw"]["eval_ppl"]
    for entry in results.values():
      entry["ppl_ratio_to_adamw"] = entry["eval_ppl"] / ref
  return results


def _strict(value: Any) -> Any:
  """Failed runs carry an infinite loss; strict JSON has no infinity, so they become null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_strict(v) for v in value]
  return value


def table(results: dict[str, Any]) -> str:
  rows = ["| method | best lr | eval loss (mean of seeds) | perplexity | x AdamW | seed spread (loss) | "
          "tokens | wall |", "|---|---|---|---|---|---|---|---|"]
  order = sorted(results, key=lambda m: (m != "adamw", results[m]["eval_loss"]))
  for m in order:
    e = results[m]
    edge = " (edge)" if e["best_at_edge"] else ""
    ratio = e.get("ppl_ratio_to_adamw")
    spread = e["seed_spread"]
    rows.append(f"| {m} | {e['best_lr']:.3g}{edge} | {e['eval_loss']:.4f} | {e['eval_ppl']:.3f} | "
                f"{'-' if ratio is None else f'{ratio:.3f}'} | {'-' if spread is None else f'{spread:.4f}'} | "
                f"{e['tokens']:,} | {e['wall_s']:.0f}s |")
  return "\n".join(rows)


def plot(results: dict[str, Any], path: str, title: str) -> bool:
  plt = pyplot()
  if plt is None:
    return False
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for m in sorted(results, key=lambda m: results[m]["eval_loss"]):
    curve = results[m]["eval_curve"]
    if curve:
      steps, losses = zip(*curve)
      ax.plot(steps, losses, marker="o", ms=3, label=f"{m} (lr {results[m]['best_lr']:.3g})",
              lw=2.5 if m == "adamw" else 1.2, color="black" if m == "adamw" else None)
  ax.set_xlabel("step")
  ax.set_ylabel("eval loss (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def plot_sweep(results: dict[str, Any], path: str, title: str) -> bool:
  """Eval loss against learning rate for every method: where each method's best lr sits in its grid."""
  plt = pyplot()
  if plt is None:
    return False
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for m in sorted(results, key=lambda m: results[m]["eval_loss"]):
    points = sorted((float(lr), r["eval_loss"]) for lr, r in results[m]["sweep"].items()
                    if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"]))
    if points:
      lrs, losses = zip(*points)
      ax.plot(lrs, losses, marker="o", ms=3, label=f"{m} ({results[m]['eval_loss']:.3f})",
              lw=2.5 if m == "adamw" else 1.2, color="black" if m == "adamw" else None)
  ax.set_xscale("log")
  ax.set_xlabel("peak learning rate")
  ax.set_ylabel("eval loss (nats / token)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--quick", action="store_const", dest="mode", const="quick", help="C4 sample, CPU (default)")
  group.add_argument("--full", action="store_const", dest="mode", const="full", help="60m protocol, GPU")
  group.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="harness self-test")
  parser.add_argument("--methods", default="", help="comma list (default: every configs/llama_tiny_*.py)")
  parser.add_argument("--variant", action="append", default=[],
                      help="NAME=METHOD:key=value;key=value adds a method variant, e.g. "
                           "'adamw_8bit=adamw:optimizer.state_bits=8' (repeatable)")
  parser.add_argument("--grid", default="",
                      help="explicit learning rates per method instead of the log grid, e.g. "
                           "'adamw=1.5e-3,galore=2e-2/4e-2' (methods not named keep the log grid)")
  parser.add_argument("--points", type=int, default=4, help="learning rates per method (>= 2)")
  parser.add_argument("--factor", type=float, default=2.0, help="ratio between neighbouring learning rates")
  parser.add_argument("--extend", type=int, default=2,
                      help="times a method whose best lr is at its grid's edge gets one more lr beyond it")
  parser.add_argument("--seeds", type=int, default=2, help="seeds at the best lr (>= 1)")
  parser.add_argument("--steps", type=int, default=0, help="override the mode's train.steps")
  parser.add_argument("--jobs", type=int, default=2, help="runs side by side (one XLA thread each when > 1)")
  parser.add_argument("--out", default=RESULTS, help="output folder")
  parser.add_argument("--name", default="", help="output file stem (default quality_<mode>)")
  parser.add_argument("--resume", action="store_true",
                      help="reuse the finished runs of an earlier, stopped sweep from its journal "
                           "(<out>/<name>.runs.jsonl; without --resume a new journal replaces it)")
  parser.add_argument("--replot", default="", help="only redraw the plots of a written JSON report")
  args = parser.parse_args(argv)
  if args.replot:
    with open(args.replot) as f:
      report = json.load(f)
    stem = os.path.splitext(args.replot)[0]
    title = f"{report['settings'].get('model.size', '')} LLaMA, lr sweep per method"
    plot_sweep(report["methods"], stem + "_lr.png", title)
    if any(e.get("eval_curve") for e in report["methods"].values()):
      plot(report["methods"], stem + ".png", title)
    return 0
  mode_name = args.mode or "quick"
  mode = dict(MODES[mode_name])
  if args.steps:
    mode["train.steps"] = args.steps
  available = tiny_methods()
  chosen = [m for m in args.methods.split(",") if m] or list(available)
  unknown = [m for m in chosen if m not in available]
  if unknown:
    parser.error(f"--methods: no configs/llama_tiny_<method>.py for {unknown} (valid choices: {sorted(available)})")
  if args.points < 2 or args.seeds < 1 or args.jobs < 1 or args.factor <= 1 or args.extend < 0:
    parser.error("--points >= 2, --seeds >= 1, --jobs >= 1, --extend >= 0 and --factor > 1 are required")
  if mode.get("data.source") == "jsonl" and not os.path.exists(mode["data.path"]):
    parser.error(f"{mode['data.path']}: the C4 sample is missing (expected ../shared/data beside the repo)")

  os.makedirs(args.out, exist_ok=True)
  stem = args.name or f"quality_{mode_name}"
  # Every finished run is appended to a journal at once, so a sweep that is stopped loses nothing:
  # --resume takes the journal's successful runs instead of running them again.
  journal_path = os.path.join(args.out, stem + ".runs.jsonl")
  done = read_journal(journal_path) if args.resume else {}
  if done:
    print(f"--resume: {len(done)} finished runs from {journal_path}")
  journal = open(journal_path, "a" if args.resume else "w")
  lock = threading.Lock()
  scratch = tempfile.mkdtemp(prefix="lowrank_quality_")
  counter = iter(range(10**9))

  def runner(config_path: str, overrides: dict[str, Any]) -> dict[str, Any]:
    key = run_key(config_path, overrides)
    if key in done:
      return done[key]
    workdir = os.path.join(scratch, f"run{next(counter)}")
    try:
      result = run_trainer(config_path, overrides, workdir, threads=1 if args.jobs > 1 else None)
    finally:
      shutil.rmtree(workdir, ignore_errors=True)
    with lock:
      journal.write(json.dumps({"key": key, "result": result}) + "\n")
      journal.flush()
    return result

  methods = {m: available[m] for m in chosen}
  variants: dict[str, dict[str, str]] = {}
  for spec in args.variant:
    name, _, rest = spec.partition("=")
    method, _, keys = rest.partition(":")
    if not name or method not in available:
      parser.error(f"--variant {spec!r}: expected NAME=METHOD:key=value;... with METHOD one of {sorted(available)}")
    methods[name] = available[method]
    variants[name] = dict(kv.split("=", 1) for kv in keys.split(";") if kv)
  grids = {}
  for item in filter(None, args.grid.split(",")):
    name, _, lrs = item.partition("=")
    if name not in methods:
      parser.error(f"--grid {item!r}: {name!r} is not among the methods run ({sorted(methods)})")
    grids[name] = [float(x) for x in lrs.split("/")]
  info = meta(args)
  start, load_at_start = time.perf_counter(), os.getloadavg()
  print(f"quality ({mode_name}): {len(methods)} methods x {args.points} lrs + {args.seeds - 1} extra seed(s); "
        f"{mode['train.steps']} steps of {mode['train.batch_size']} x {mode['data.seq_len']} tokens")
  try:
    results = sweep(methods, mode, points=args.points, factor=args.factor, seeds=args.seeds, runner=runner,
                    jobs=args.jobs, extend=args.extend, variants=variants, grids=grids)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
    journal.close()
  total = time.perf_counter() - start
  runs = [r for e in results.values() for r in [*e["sweep"].values(), *e.get("seeds", {}).values()]]
  cpu = sum(r.get("cpu_s", 0.0) for r in runs)
  load = os.getloadavg()
  print(table(results))
  print(f"{len(runs)} runs in {total:.0f}s wall; their CPU time {cpu:.0f}s, i.e. about {cpu / args.jobs:.0f}s "
        f"on {args.jobs} idle cores; load average at the end {load[0]:.1f} (1 min), {load[2]:.1f} (15 min)")
  for m, e in results.items():
    if e["best_at_edge"]:
      print(f"note: {m}'s best lr {e['best_lr']:.3g} is at the edge of its grid {e['grid']}")
  report = {"mode": mode_name, "settings": mode, "points": args.points, "factor": args.factor,
            "seeds": args.seeds, "extend": args.extend, "jobs": args.jobs, "runs": len(runs), "wall_s": total,
            "cpu_s": cpu, "idle_estimate_s": cpu / args.jobs, "load_at_start": load_at_start, "load_at_end": load, "cpus": os.cpu_count(),
            "command": " ".join(["python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])]),
            "methods": results}
  write_json(os.path.join(args.out, stem + ".json"), _strict(report), meta=info)
  plot_sweep(results, os.path.join(args.out, stem + "_lr.png"), f"{mode['model.size']} LLaMA, lr sweep per method")
  if plot(results, os.path.join(args.out, stem + ".png"),
          f"{mode['model.size']} LLaMA, {mode['data.source']}, best lr per method"):
    print(f"wrote {os.path.join(args.out, stem)}.json and .png ({total:.0f}s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
