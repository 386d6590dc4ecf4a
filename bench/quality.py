"""Quality benchmark: every method against tuned full-rank baselines on real text.

For each method (one per `configs/llama_tiny_<method>.py`, so a newly registered method with a
tiny config appears here by itself) it sweeps the peak learning rate on a log grid around that
config's own lr, picks the best lr on the validation loss, re-runs the best lr with more seeds,
and reports eval loss, perplexity, the spread over seeds, tokens seen, wall time and three
perplexity ratios: to the best AdamW, to the best AdamW with parameter groups, and to the fair
baseline, the better of AdamW with groups and Muon (issue #30). AdamW with groups is AdamW whose
embeddings, head and norms run at `s` times its lr (`optimizer.embed_lr_scale` and
`other_lr_scale`), one entry `adamw_groups_x<s>` per factor in `--groups`, each swept over
`--group_lrs`; the low-rank methods run their non-matrix leaves as plain Adam at their own, larger,
lr, so their lead over plain AdamW is partly that. Every run is the real trainer (`python train.py
...`) in a fresh process, so nothing here can differ from what a user runs.

  python bench/quality.py --quick                 # C4 sample, byte tokens, ~26 min on 2 idle CPU cores
  python bench/quality.py --quick --methods adamw,galore --steps 100
  python bench/quality.py --small                 # 8.6M parameters (T5 vocabulary), 5 methods, ~55 min
  python bench/quality.py --full                  # GaLore paper protocol at 60m (GPU)

`--small` trains AdamW with groups, Muon, GaLore, APOLLO and LoRA once each at the lr (and group
factor) the tiny sweep found best (read from `--tiny_report`, default the `--quick` report) on the
tiny LLaMA blocks with the T5 vocabulary, and reports the Spearman rank correlation of the five
methods' eval losses between the two scales: whether the ranking holds when the model grows.

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
    # Five methods once each at their tiny-tuned lr, about 55 minutes on two cores: the tiny blocks with
    # the T5 vocabulary (8.6M parameters, 8.2M of them the embedding and head), 2M tokens of the C4 sample.
    "small": {
        "model.size": "tiny",
        "data.source": "jsonl",
        "data.path": os.path.join(SHARED, "c4", "train.jsonl"),
        "data.eval_path": os.path.join(SHARED, "c4", "validation.jsonl"),
        "data.tokenizer": os.path.join(SHARED, "tokenizers", "c4_t5_32k.model"),
        "data.seq_len": 128,
        "train.batch_size": 16,
        "train.steps": 1000,
        "train.eval_batches": 16,
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

# The fair baselines: the ratio column `x fair` divides by the lower perplexity of these.
GROUPS_PREFIX = "adamw_groups"  # every `adamw_groups_x<s>` entry
FAIR = (GROUPS_PREFIX, "muon")
# --small: these methods, each at its best point of the tiny sweep.
SMALL_METHODS = (GROUPS_PREFIX, "muon", "galore", "apollo", "lora")


def group_variants(spec: str) -> dict[str, dict[str, float]]:
  """`--groups` ("4,16", or "8:1" for embed 8, other 1) -> {name: the lr-group overrides}."""
  out = {}
  for item in filter(None, spec.split(",")):
    embed, _, other = item.partition(":")
    e, o = float(embed), float(other or embed)
    name = f"{GROUPS_PREFIX}_x{e:g}" if e == o else f"{GROUPS_PREFIX}_e{e:g}_o{o:g}"
    out[name] = {"optimizer.embed_lr_scale": e, "optimizer.other_lr_scale": o}
  return out


def family(name: str) -> str:
  """The entry's fair-baseline family: every AdamW-with-groups variant counts as one method."""
  return GROUPS_PREFIX if name.startswith(GROUPS_PREFIX) else name


def best_of_family(results: dict[str, Any], name: str) -> str | None:
  """The entry of `name`'s family with the lowest finite eval loss (None: none ran)."""
  entries = [m for m in results if family(m) == name and math.isfinite(results[m].get("eval_loss") or math.inf)]
  return min(entries, key=lambda m: results[m]["eval_loss"]) if entries else None


def add_ratios(results: dict[str, Any]) -> dict[str, str]:
  """Each entry's perplexity over AdamW's (`ppl_ratio_to_adamw`), the best AdamW with groups'
  (`ppl_ratio_to_adamw_groups`) and the fair baseline's (`ppl_ratio_to_fair`), where those ran.
  Returns {reference: the entry it is}."""
  refs = {"adamw": "adamw" if "adamw" in results and math.isfinite(results["adamw"]["eval_ppl"]) else None,
          "adamw_groups": best_of_family(results, GROUPS_PREFIX)}
  fair = [m for m in (best_of_family(results, f) for f in FAIR) if m]
  refs["fair"] = min(fair, key=lambda m: results[m]["eval_loss"]) if fair else None
  for key, ref in refs.items():
    if ref is not None:
      for entry in results.values():
        entry[f"ppl_ratio_to_{key}"] = entry["eval_ppl"] / results[ref]["eval_ppl"]
  return {k: v for k, v in refs.items() if v}


def ranks(values: list[float]) -> list[float]:
  """1-based ranks, ties sharing their mean rank."""
  order = sorted(range(len(values)), key=lambda i: values[i])
  out = [0.0] * len(values)
  i = 0
  while i < len(order):
    j = i
    while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
      j += 1
    for k in range(i, j + 1):
      out[order[k]] = (i + j) / 2 + 1
    i = j + 1
  return out


def spearman(a: list[float], b: list[float]) -> float:
  """Spearman's rank correlation: Pearson's of the ranks (ties get their mean rank)."""
  ra, rb = ranks(a), ranks(b)
  n = len(a)
  ma, mb = sum(ra) / n, sum(rb) / n
  cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
  sa = math.sqrt(sum((x - ma) ** 2 for x in ra))
  sb = math.sqrt(sum((y - mb) ** 2 for y in rb))
  return cov / (sa * sb) if sa and sb else math.nan


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
  add_ratios(results)
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
  ratios = ("adamw", "adamw_groups", "fair")
  rows = ["| method | best lr | eval loss (mean of seeds) | perplexity | x AdamW | x AdamW+groups | x fair | "
          "seed spread (loss) | tokens | wall |", "|---|---|---|---|---|---|---|---|---|---|"]
  order = sorted(results, key=lambda m: (m != "adamw", results[m]["eval_loss"]))
  for m in order:
    e = results[m]
    edge = " (edge)" if e["best_at_edge"] else ""
    cells = [f"{e[f'ppl_ratio_to_{r}']:.3f}" if f"ppl_ratio_to_{r}" in e else "-" for r in ratios]
    spread = e["seed_spread"]
    rows.append(f"| {m} | {e['best_lr']:.3g}{edge} | {e['eval_loss']:.4f} | {e['eval_ppl']:.3f} | "
                f"{' | '.join(cells)} | {'-' if spread is None else f'{spread:.4f}'} | "
                f"{e['tokens']:,} | {e['wall_s']:.0f}s |")
  return "\n".join(rows)


def small_methods(tiny: dict[str, Any], names: list[str]) -> tuple[dict, dict, dict]:
  """--small's methods (`names`, default SMALL_METHODS), each at its best point of the tiny report
  `tiny` (AdamW with groups: its best variant's lr and factors): their configs, overrides, lrs."""
  methods, variants, grids = {}, {}, {}
  for name in names or SMALL_METHODS:
    best = best_of_family(tiny, name)
    if best is None:
      raise SystemExit(f"--small: the tiny report has no finished {name!r} entry")
    methods[name] = os.path.join(ROOT, tiny[best]["config"])
    variants[name] = dict(tiny[best].get("overrides") or {})
    grids[name] = [float(tiny[best]["best_lr"])]
  return methods, variants, grids


def rank_agreement(tiny: dict[str, Any], small: dict[str, Any]) -> dict[str, Any]:
  """The methods' eval losses at both scales, their ranks, and Spearman's correlation of the two."""
  names = [m for m in small if math.isfinite(small[m]["eval_loss"]) and best_of_family(tiny, m)]
  a = [tiny[best_of_family(tiny, m)]["eval_loss"] for m in names]
  b = [small[m]["eval_loss"] for m in names]
  return {"methods": names, "tiny_entries": [best_of_family(tiny, m) for m in names], "tiny_eval_loss": a,
          "small_eval_loss": b, "tiny_rank": ranks(a), "small_rank": ranks(b),
          "spearman": spearman(a, b) if len(names) > 1 else math.nan}


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
  group.add_argument("--small", action="store_const", dest="mode", const="small",
                     help=f"{', '.join(SMALL_METHODS)} at their tiny-tuned lr on an 8.6M-parameter model, CPU")
  group.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="harness self-test")
  parser.add_argument("--methods", default="", help="comma list (default: every configs/llama_tiny_*.py and "
                      f"the {GROUPS_PREFIX}_* entries; {GROUPS_PREFIX} names them all)")
  parser.add_argument("--groups", default="4,16",
                      help=f"the {GROUPS_PREFIX}_x<s> entries: AdamW with embeddings, head and norms at s x lr; "
                           "'e:o' sets the embedding-and-head and the other factor apart, e.g. '8:1'")
  parser.add_argument("--group_lrs", default="1.5e-3,3e-3", help=f"the learning rates of the {GROUPS_PREFIX} grid")
  parser.add_argument("--tiny_report", default=os.path.join(RESULTS, "quality_quick.json"),
                      help="--small: the tiny sweep whose best lr per method it runs")
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
  parser.add_argument("--seeds", type=int, default=None, help="seeds at the best lr (>= 1; default 2, --small 1)")
  parser.add_argument("--steps", type=int, default=0, help="override the mode's train.steps")
  parser.add_argument("--jobs", type=int, default=None,
                      help="runs side by side (one XLA thread each when > 1; default 2, --small 1: its five runs "
                           "take as long one at a time on both cores as two at a time on one core each)")
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
  if args.seeds is None:
    args.seeds = 1 if mode_name == "small" else 2
  if args.jobs is None:
    args.jobs = 1 if mode_name == "small" else 2
  available = tiny_methods()
  groups = group_variants(args.groups)
  available.update({name: available["adamw"] for name in groups})
  chosen = [m for m in args.methods.split(",") if m] or list(available)
  chosen = [g for m in chosen for g in (groups if m == GROUPS_PREFIX else [m])]
  unknown = [m for m in chosen if m not in available]
  if unknown:
    parser.error(f"--methods: no configs/llama_tiny_<method>.py for {unknown} (valid choices: "
                 f"{sorted(available)} and {GROUPS_PREFIX})")
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
  variants: dict[str, dict[str, Any]] = {m: groups[m] for m in chosen if m in groups}
  for spec in args.variant:
    name, _, rest = spec.partition("=")
    method, _, keys = rest.partition(":")
    if not name or method not in available:
      parser.error(f"--variant {spec!r}: expected NAME=METHOD:key=value;... with METHOD one of {sorted(available)}")
    methods[name] = available[method]
    variants[name] = dict(kv.split("=", 1) for kv in keys.split(";") if kv)
  grids = {m: [float(x) for x in args.group_lrs.split(",") if x] for m in chosen if m in groups}
  tiny = None
  if mode_name == "small":
    if not os.path.exists(args.tiny_report):
      parser.error(f"--small runs each method at its best lr of the tiny sweep: {args.tiny_report} is missing "
                   "(run python bench/quality.py --quick first, or pass --tiny_report)")
    with open(args.tiny_report) as f:
      tiny = json.load(f)["methods"]
    methods, variants, grids = small_methods(tiny, [m for m in args.methods.split(",") if m])
  for item in filter(None, args.grid.split(",")):
    name, _, lrs = item.partition("=")
    if name not in methods:
      parser.error(f"--grid {item!r}: {name!r} is not among the methods run ({sorted(methods)})")
    grids[name] = [float(x) for x in lrs.split("/")]
  info = meta(args)
  start, load_at_start = time.perf_counter(), os.getloadavg()
  swept = "at their tiny-tuned lr" if tiny is not None else f"x {args.points} lrs (or their --grid)"
  print(f"quality ({mode_name}): {len(methods)} methods {swept} + {args.seeds - 1} extra seed(s); "
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
  agreement = None
  if tiny is not None:
    agreement = rank_agreement(tiny, results)
    print(f"ranking tiny -> small over {', '.join(agreement['methods'])}: Spearman {agreement['spearman']:.3f}")
  cores = args.jobs if args.jobs > 1 else os.cpu_count() or 1  # one job runs XLA on every core
  print(f"{len(runs)} runs in {total:.0f}s wall; their CPU time {cpu:.0f}s, i.e. about {cpu / cores:.0f}s "
        f"on {cores} idle cores; load average at the end {load[0]:.1f} (1 min), {load[2]:.1f} (15 min)")
  for m, e in results.items():
    if e["best_at_edge"]:
      print(f"note: {m}'s best lr {e['best_lr']:.3g} is at the edge of its grid {e['grid']}")
  report = {"mode": mode_name, "settings": mode, "points": args.points, "factor": args.factor,
            "seeds": args.seeds, "extend": args.extend, "jobs": args.jobs, "runs": len(runs), "wall_s": total,
            "cpu_s": cpu, "idle_estimate_s": cpu / cores, "load_at_start": load_at_start, "load_at_end": load,
            "cpus": os.cpu_count(),
            "command": " ".join(["python", "bench/quality.py", *(argv if argv is not None else sys.argv[1:])]),
            "references": add_ratios(results), "methods": results}
  if agreement is not None:
    report["rank_agreement"] = agreement
  write_json(os.path.join(args.out, stem + ".json"), _strict(report), meta=info)
  plot_sweep(results, os.path.join(args.out, stem + "_lr.png"), f"{mode['model.size']} LLaMA, lr sweep per method")
  if plot(results, os.path.join(args.out, stem + ".png"),
          f"{mode['model.size']} LLaMA, {mode['data.source']}, best lr per method"):
    print(f"wrote {os.path.join(args.out, stem)}.json and .png ({total:.0f}s)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
