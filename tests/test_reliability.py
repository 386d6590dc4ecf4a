"""What protects a user's run: divergence is stopped before it destroys a checkpoint, a damaged
checkpoint falls back to the one before, nothing restarts or is overwritten silently, and bad
input gets one line. Every test starts from one shared 4-step run (checkpoints at 2 and 4)."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from lowrank_jax.train import ConfigError, train
from lowrank_jax.train.errors import TrainingStopped
from train_helpers import REPO, saved_params, tiny_config

SMALL = {"data.seq_len": 32, "train.batch_size": 4, "train.eval_batches": 1, "train.log_every": 1,
         "train.eval_every": 0, "train.checkpoint_every": 2, "train.keep_checkpoints": 2}


def _config(**overrides):
  return tiny_config(**{**SMALL, "train.steps": 4, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained") / "run"
  train(_config(), str(workdir))
  return workdir


def _copy(trained, tmp_path, name="run"):
  return shutil.copytree(trained, tmp_path / name)


def _strict_records(workdir):
  def refuse(constant):
    raise ValueError(f"not strict JSON: {constant}")

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def _files(workdir):
  return {p: open(p, "rb").read() for p in glob.glob(str(workdir / "**"), recursive=True) if os.path.isfile(p)}


def test_divergence_skips_steps_stops_with_exit_3_and_keeps_the_good_checkpoints(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  before = {step: saved_params(str(workdir), step) for step in (2, 4)}
  # An absurd learning rate: the parameters overflow, the loss turns NaN.
  diverging = _config(**{"train.steps": 30, "optimizer.lr": 1e30, "train.max_nonfinite_steps": 3})
  with pytest.raises(TrainingStopped) as info:
    train(diverging, str(workdir))
  message = str(info.value)
  assert info.value.exit_code == 3 and "\n" not in message
  assert "diverged" in message and "step 4" in message and "optimizer.lr" in message
  # No checkpoint of the bad state was written, so the good ones were not rotated away.
  assert sorted(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()) == [2, 4]
  for step, params in before.items():
    jax.tree.map(np.testing.assert_array_equal, saved_params(str(workdir), step), params)
  records = _strict_records(workdir)  # no bare NaN
  skipped = [r for r in records if r.get("skipped_steps")]
  assert skipped and sum(r["skipped_steps"] for r in skipped) >= 3
  flagged = [r for r in records if r.get("nonfinite")]
  assert all(r[k] is None for r in flagged for k in r["nonfinite"])


def test_corrupt_newest_checkpoint_falls_back_bit_exactly(trained, tmp_path):
  damaged, by_hand = _copy(trained, tmp_path, "damaged"), _copy(trained, tmp_path, "by_hand")
  arrays = [p for p in glob.glob(str(damaged / "checkpoints" / "4" / "params" / "**"), recursive=True)
            if os.path.isfile(p) and "/d/" in p]
  biggest = max(arrays, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 3)
  shutil.rmtree(by_hand / "checkpoints" / "4")
  summary = train(_config(**{"train.steps": 6}), str(damaged))
  assert summary["resumed_from"] == 2
  aside = glob.glob(str(damaged / "checkpoints" / "4.corrupt-*"))
  assert len(aside) == 1 and os.path.exists(os.path.join(aside[0], "params"))  # moved, not deleted
  train(_config(**{"train.steps": 6}), str(by_hand))
  jax.tree.map(np.testing.assert_array_equal, saved_params(str(damaged), 6), saved_params(str(by_hand), 6))


def test_metrics_without_a_checkpoint_are_refused_unless_restart(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  shutil.rmtree(workdir / "checkpoints")
  metrics = (workdir / "metrics.jsonl").read_bytes()
  with pytest.raises(TrainingStopped, match="--restart") as info:
    train(_config(), str(workdir))
  assert info.value.exit_code == 2 and (workdir / "metrics.jsonl").read_bytes() == metrics
  summary = train(_config(**{"train.steps": 2}), str(workdir), restart=True)
  assert summary["steps"] == 2 and summary["resumed_from"] is None
  (kept,) = glob.glob(str(workdir / "metrics.before-restart-*.jsonl"))
  assert open(kept, "rb").read() == metrics


def test_rerunning_a_finished_run_changes_nothing(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  before = _files(workdir)
  summary = train(_config(), str(workdir))
  assert summary["steps"] == 4 and summary["train_loss"] is not None
  assert _files(workdir) == before


def test_resume_with_another_seed_is_refused_by_name(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  with pytest.raises(ConfigError, match=r"^config\.seed: differs"):
    train(_config(**{"seed": 7, "train.steps": 6}), str(workdir))


def test_a_setting_that_changes_the_state_is_refused_not_taken_for_damage(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  with pytest.raises(TrainingStopped, match="optimizer.grad_clip") as info:  # clipping off: no clip state
    train(_config(**{"optimizer.grad_clip": 0.0, "train.steps": 6}), str(workdir))
  assert info.value.exit_code == 2
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # nothing moved aside


def test_warm_start_from_must_exist_and_is_not_created(tmp_path):
  missing = tmp_path / "no_such_run"
  config = _config(**{"optimizer.name": "relora", "optimizer.relora.warm_start_from": str(missing)})
  with pytest.raises(ConfigError, match="optimizer.relora.warm_start_from"):
    train(config, str(tmp_path / "run"))
  assert not missing.exists()


@pytest.mark.parametrize("args, names", [
    (["--config.train.stepz=3"], "config.train.stepz"),
    (["extra_word"], "extra_word"),
    (["--config.optimizer.lr=nan"], "config.optimizer.lr"),
    (["--config.seed=99999999999"], "config.seed"),
    (["--config.model.linear.q=nope"], "config.model.linear.q"),
    (["--workdir={tmp}/afile/run"], "afile"),
], ids=["unknown key", "positional argument", "lr nan", "seed out of range", "linear kind", "workdir under a file"])
def test_bad_input_gets_one_line_naming_it(tmp_path, args, names):
  (tmp_path / "afile").write_text("x")
  cmd = [sys.executable, "train.py", "--config=configs/llama_tiny_adamw.py", f"--workdir={tmp_path}/run",
         *(a.replace("{tmp}", str(tmp_path)) for a in args)]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], out.stderr


def test_a_missing_config_file_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, "train.py", "--config=configs/no_such_config.py"], cwd=REPO,
                       capture_output=True, text=True)
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      "error: --config configs/no_such_config.py: cannot load it ([Errno 2] No such file or directory: "
      "'configs/no_such_config.py')"]


def test_nan_is_refused_for_every_float_setting():
  from lowrank_jax.train import resolve

  for key in ("optimizer.lr", "optimizer.eps", "optimizer.weight_decay", "optimizer.galore.scale"):
    config = _config(**{key: math.nan, "optimizer.name": key.split(".")[1] if key.count(".") == 2 else "adamw"})
    with pytest.raises(ConfigError, match=f"config.{key}"):
      resolve(config)
