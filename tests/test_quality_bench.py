"""bench/quality.py: the lr sweep picks the lowest validation loss, and the real harness runs end to end."""

import importlib.util
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _quality():
  # quality.py imports its sibling bench/_common.py (a script's own folder is on sys.path).
  sys.modules.setdefault("_common", _bench_module("_common"))
  return _bench_module("quality")


def test_lr_grid_is_log_spaced_around_the_config_lr():
  q = _quality()
  assert q.lr_grid(1e-3, 4, 2.0) == [5e-4, 1e-3, 2e-3, 4e-3]
  assert q.lr_grid(1e-2, 3, 10.0) == [1e-3, 1e-2, 1e-1]


def test_sweep_picks_lowest_loss_reruns_seeds_and_ratios_to_adamw():
  q = _quality()
  # A fake trainer: loss is a parabola in log(lr) with a method-specific optimum, plus a seed offset.
  methods = {m: os.path.join(ROOT, "configs", f"llama_tiny_{m}.py") for m in ("adamw", "galore")}
  galore_lr = q.config_lr(methods["galore"])
  # AdamW's optimum lies below its grid (3e-3 x [1/2, 1, 2, 4]): the sweep must step past the edge.
  optimum = {"adamw": 1e-3, "galore": galore_lr}
  calls = []

  def runner(config_path, overrides):
    method = os.path.basename(config_path)[len("llama_tiny_"):-3]
    calls.append((method, overrides["optimizer.lr"], overrides["seed"]))
    if method == "galore" and overrides["optimizer.lr"] > 3 * galore_lr:
      return {"eval_loss": math.inf, "wall_s": 1.0, "error": ["diverged"]}
    loss = 2.0 + (math.log(overrides["optimizer.lr"] / optimum[method])) ** 2 + 0.01 * overrides["seed"]
    return {"eval_loss": loss, "wall_s": 1.0, "eval_curve": [(1, loss + 1), (2, loss)]}

  mode = dict(q.MODES["smoke"])
  results = q.sweep(methods, mode, points=4, factor=2.0, seeds=3, runner=runner, log=lambda s: None)
  for m, entry in results.items():
    swept = {float(lr): r["eval_loss"] for lr, r in entry["sweep"].items()}
    assert entry["best_lr"] == min(swept, key=swept.get)
    assert len(entry["seed_losses"]) == 3  # the sweep's seed 0 plus seeds 1 and 2
    assert entry["eval_loss"] == pytest.approx(sum(entry["seed_losses"]) / 3)
    assert entry["seed_spread"] == pytest.approx(0.02)
    assert sorted(s for (mm, lr, s) in calls if mm == m and lr == entry["best_lr"]) == [0, 1, 2]
  assert results["adamw"]["ppl_ratio_to_adamw"] == 1.0
  assert results["galore"]["ppl_ratio_to_adamw"] == pytest.approx(
      math.exp(results["galore"]["eval_loss"] - results["adamw"]["eval_loss"]))
  adamw_lrs = sorted(float(lr) for lr in results["adamw"]["sweep"])
  assert adamw_lrs == [3.75e-4, 7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2]  # two steps down, then interior
  assert results["adamw"]["best_lr"] == 7.5e-4 and not results["adamw"]["best_at_edge"]
  # GaLore's grid is its config lr x [1/2, 1, 2, 4]; the top one diverged and is never picked.
  assert results["galore"]["best_lr"] == pytest.approx(galore_lr) and not results["galore"]["best_at_edge"]


@pytest.mark.slow
def test_harness_runs_the_real_trainer_on_the_synthetic_language_and_resumes(tmp_path):
  q = _quality()
  assert q.main(["--smoke", "--methods", "adamw,lora", "--points", "2", "--seeds", "1", "--extend", "0",
                 "--out", str(tmp_path)]) == 0
  report = json.loads((tmp_path / "quality_smoke.json").read_text())
  assert set(report["methods"]) == {"adamw", "lora"}
  for entry in report["methods"].values():
    losses = {float(lr): r["eval_loss"] for lr, r in entry["sweep"].items()}
    assert all(math.isfinite(x) for x in losses.values()), entry
    assert entry["best_lr"] == min(losses, key=losses.get)
    assert entry["tokens"] == 4 * 4 * 32
    assert entry["eval_curve"]
  # Every run went to the journal: --resume rebuilds the same report without training again.
  def no_training(*args, **kwargs):
    raise AssertionError("--resume ran a run its journal holds")
  q.run_trainer = no_training
  assert q.main(["--smoke", "--methods", "adamw,lora", "--points", "2", "--seeds", "1", "--extend", "0",
                 "--out", str(tmp_path), "--resume"]) == 0
  resumed = json.loads((tmp_path / "quality_smoke.json").read_text())
  assert resumed["methods"] == report["methods"]
