"""What the multi-device tests share: the small run they all train, a background worker
process with N host devices (tests/parallel_worker.py), one-device references, and the
tolerance a different summation order allows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from lowrank_jax.train import train
from train_helpers import REPO, tiny_config

WORKER = REPO / "tests" / "parallel_worker.py"

# Small enough to be quick, long enough that a wrong all-reduce or a replica that
# drifts shows up in the parameters.
BASE = {"train.steps": 4, "train.log_every": 2, "train.eval_every": 0, "train.checkpoint_every": 0,
        "train.batch_size": 16, "data.seq_len": 32, "train.eval_batches": 1}


def method_overrides(method: str) -> dict:
  extra = {"relora": {"optimizer.relora.merge_every": 2, "optimizer.relora.restart_warmup_steps": 1},
           "lora": {"optimizer.lora.rank": 8}, "galore": {"optimizer.galore.rank": 16,
                                                          "optimizer.galore.update_proj_gap": 2},
           "osd": {"optimizer.osd.rank": 16},
           # Sequential heads: every example sees every head, so data parallelism is exact.
           "mhlora": {"optimizer.mhlora.mode": "mhlora", "optimizer.mhlora.merge_every": 2,
                      "optimizer.mhlora.rank": 4}}
  return {"optimizer.name": method, **extra.get(method, {})}


class Worker:
  """tests/parallel_worker.py with `devices` host devices, started in the background.

  The caller computes its one-device references in this process meanwhile, then waits for
  each job's output. Output goes to a file: a pipe nobody reads while waiting can fill up and
  block the worker. No timeout: the work is sized (tiny model, few steps); a loaded machine
  only takes longer, and a worker that dies is reported at once with its log.
  """

  def __init__(self, devices: int, jobs: list[dict], log, xla_flags: str = ""):
    self.log = log
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    spec = json.dumps({"jobs": jobs, "xla_flags": xla_flags})
    with open(log, "w") as out:
      self.proc = subprocess.Popen([sys.executable, str(WORKER), str(devices), spec],
                                   cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

  def _failed(self) -> str:
    return f"worker exited {self.proc.returncode}:\n{self.log.read_text(errors='replace')[-4000:]}"

  def wait(self) -> None:
    assert self.proc.wait() == 0, self._failed()

  def wait_for(self, path) -> None:
    """Until `path` exists (a train job's summary: written last, by rename) or the worker ends."""
    while not os.path.exists(path) and self.proc.poll() is None:
      time.sleep(0.2)
    assert os.path.exists(path) or self.proc.wait() == 0, self._failed()
    assert os.path.exists(path), f"the worker finished without writing {path}"

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def single_device(overrides, workdir):
  """Train on this process's single device; flattened final params and the summary."""
  import jax

  from lowrank_jax.train.checkpoint import Checkpointer
  from lowrank_jax.train.config import resolve
  from lowrank_jax.train.setup import build_setup, vocab_size_of

  assert jax.device_count() == 1
  config = tiny_config(**overrides)
  summary = train(config, str(workdir))
  run = resolve(config)
  setup = build_setup(run, vocab_size_of(run))
  state, _, _ = Checkpointer(os.path.join(workdir, "checkpoints"), keep=100).restore(setup.abstract_state)
  flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, state.params))[0]
  return {jax.tree_util.keystr(k): v for k, v in flat}, summary


def assert_close(a: dict, b: dict, what: str, tol: float = 2e-3):
  """Per leaf, ||a - b|| <= tol ||b||: summation order differs between layouts (and moves an
  SVD's subspace slightly for GaLore/OSD), while a wrong all-reduce or a drifting replica is
  off by O(1)."""
  assert a.keys() == b.keys()
  for key in a:
    err = np.linalg.norm(np.asarray(a[key], np.float64) - b[key]) / max(np.linalg.norm(b[key]), 1e-12)
    assert err <= tol, f"{what}: {key}: relative error {err:.2e}"

