"""Multi-device training on 8 host CPU devices: mesh, pmap, FSDP and LTE heads spread over
devices agree with one device; the heads communicate only at merges.

Each multi-device case runs in a subprocess (tests/parallel_worker.py) because the
number of host devices is fixed when JAX starts; the one-device references run here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lowrank_jax.train import method_names, train
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


def _run_worker(devices: int, jobs: list[dict]) -> None:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, str(WORKER), str(devices), json.dumps({"jobs": jobs})], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=env)
  assert out.returncode == 0, out.stderr[-4000:]


def _single_device(overrides, workdir):
  """Train on this process's single device; flattened final params and the summary."""
  import jax

  from lowrank_jax.train.checkpoint import Checkpointer
  from lowrank_jax.train.setup import build_setup, vocab_size_of

  assert jax.device_count() == 1
  config = tiny_config(**overrides)
  summary = train(config, str(workdir))
  setup = build_setup(config, vocab_size_of(config))
  state, _, _ = Checkpointer(os.path.join(workdir, "checkpoints"), keep=100).restore(setup.abstract_state)
  flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, state.params))[0]
  return {jax.tree_util.keystr(k): v for k, v in flat}, summary


def _assert_close(a: dict, b: dict, what: str, tol: float = 2e-3):
  """Per leaf, ||a - b|| <= tol ||b||: summation order differs between layouts (and moves an
  SVD's subspace slightly for GaLore/OSD), while a wrong all-reduce or a drifting replica is
  off by O(1)."""
  assert a.keys() == b.keys()
  for key in a:
    err = np.linalg.norm(np.asarray(a[key], np.float64) - b[key]) / max(np.linalg.norm(b[key]), 1e-12)
    assert err <= tol, f"{what}: {key}: relative error {err:.2e}"


def test_mesh_pmap_and_fsdp_on_8_devices_equal_one_device_for_every_method(tmp_path):
  all_modes = {"mesh": {}, "pmap": {"parallel.mode": "pmap"}, "fsdp": {"parallel.fsdp": True}}
  # FSDP for the full-rank and the projected optimizer states; mesh and pmap for every method.
  modes_of = {m: all_modes if m in ("adamw", "galore") else {k: all_modes[k] for k in ("mesh", "pmap")}
              for m in method_names()}
  jobs, references = [], {}
  for method, modes in modes_of.items():
    overrides = {**BASE, **method_overrides(method)}
    references[method] = _single_device(overrides, tmp_path / f"{method}_one")
    jobs += [{"kind": "train", "workdir": str(tmp_path / f"{method}_{name}"), "overrides": {**overrides, **extra},
              "out": str(tmp_path / f"{method}_{name}.npz")} for name, extra in modes.items()]
  _run_worker(8, jobs)  # one process: every method under every mode
  for method, (reference, ref_summary) in references.items():
    for name in modes_of[method]:
      got = dict(np.load(tmp_path / f"{method}_{name}.npz"))
      _assert_close(got, reference, f"{method} {name} vs 1 device", tol=2e-3)
      summary = json.loads((tmp_path / f"{method}_{name}.npz.json").read_text())
      assert abs(summary["train_loss"] - ref_summary["train_loss"]) < 1e-3, (method, name)


# LTE parallel heads, 8 of them: one per device when spread over 8 devices. Clipping is
# active (grad_clip 1.0), merges happen at steps 2 and 4, and two micro-batches per step.
HEADS = {**BASE, "optimizer.name": "mhlora", "optimizer.mhlora.mode": "parallel", "optimizer.mhlora.num_heads": 8,
         "optimizer.mhlora.rank": 4, "optimizer.mhlora.merge_every": 2, "train.grad_accum": 2}


def test_heads_spread_over_8_devices_equal_one_device_and_talk_only_at_merges(tmp_path):
  reference, ref_summary = _single_device(HEADS, tmp_path / "one")
  modes = {"mesh": {}, "pmap": {"parallel.mode": "pmap"}}
  jobs = [{"kind": "train", "workdir": str(tmp_path / name), "out": str(tmp_path / f"{name}.npz"),
           "overrides": {**HEADS, "parallel.shard_heads": True, **extra}} for name, extra in modes.items()]
  jobs += [{"kind": "collectives", "out": str(tmp_path / f"comm_{shard}.json"),
            "overrides": {**HEADS, "parallel.shard_heads": shard}} for shard in (True, False)]
  _run_worker(8, jobs)
  for name in modes:
    got = dict(np.load(tmp_path / f"{name}.npz"))
    # Measured: <= 1.2e-4 (a young lora_b); heads' gradients not scaled to the global mean
    # (so clipping differs) already give 4e-3.
    _assert_close(got, reference, f"heads over devices ({name}) vs 1 device", tol=5e-4)
    summary = json.loads((tmp_path / f"{name}.npz.json").read_text())
    assert abs(summary["train_loss"] - ref_summary["train_loss"]) < 1e-3, name

  split = json.loads((tmp_path / "comm_True.json").read_text())
  head_shapes = split["head"] + split["head_block"]
  assert all(s[0] == 1 for s in split["head_block"])  # each device holds one head
  every_step = [s for c in split["collectives"] if not c["conditional"] for s in c["shapes"]]
  at_merges = [(c["kind"], s) for c in split["collectives"] if c["conditional"] for s in c["shapes"]]
  # Every step: the all-reduce of the replicated leaves' gradients and of scalars, no heads.
  assert every_step and not any(s in head_shapes for s in every_step), every_step
  # The merges sum each layer's heads: kernel-shaped all-reduces, only there.
  assert at_merges and all(k == "all-reduce" and s in split["kernel"] for k, s in at_merges), at_merges
  assert not any(s in split["kernel"] for s in every_step)
  # The same check sees what replicated heads cost every step (their updates gathered).
  replicated = json.loads((tmp_path / "comm_False.json").read_text())
  assert any(s in replicated["head"] for c in replicated["collectives"] if not c["conditional"]
             for s in c["shapes"])


def test_fsdp_stores_an_eighth_per_device(tmp_path):
  jobs = [{"kind": "memory", "overrides": {**BASE, "parallel.fsdp": fsdp, "model.tie_embeddings": False},
           "out": str(tmp_path / f"fsdp_{fsdp}.json")} for fsdp in (False, True)]
  _run_worker(8, jobs)
  full = json.loads((tmp_path / "fsdp_False.json").read_text())
  sharded = json.loads((tmp_path / "fsdp_True.json").read_text())
  for key in ("params_bytes", "opt_state_bytes"):
    ratio = sharded[key] / full[key]
    # Exactly 1/8 for every sharded leaf; the few small leaves (norm scales, counters) stay whole.
    assert 1 / 8 <= ratio < 1 / 8 + 0.01, (key, ratio)
  assert sharded["argument_bytes"] < full["argument_bytes"] / 4


def test_checkpoint_from_8_devices_continues_on_1_and_4(tmp_path):
  first = {**BASE, "train.steps": 4}
  resumed = {**BASE, "train.steps": 8}
  eight = tmp_path / "eight"
  _run_worker(8, [
      {"kind": "train", "workdir": str(eight), "overrides": first, "out": str(tmp_path / "first.npz"),
       "copy_to": [str(tmp_path / "on1"), str(tmp_path / "on4")]},
      {"kind": "train", "workdir": str(eight), "overrides": resumed, "out": str(tmp_path / "on8.npz")},
  ])
  _run_worker(4, [{"kind": "train", "workdir": str(tmp_path / "on4"), "overrides": resumed,
                   "out": str(tmp_path / "on4.npz")}])
  on1, summary = _single_device(resumed, tmp_path / "on1")
  assert summary["resumed_from"] == 4
  on8 = dict(np.load(tmp_path / "on8.npz"))
  on4 = dict(np.load(tmp_path / "on4.npz"))
  _assert_close(on1, on8, "restored on 1 vs continued on 8")
  _assert_close(on4, on8, "restored on 4 vs continued on 8")
  # And they really trained on from the checkpoint: step 8 differs from step 4.
  first_params = dict(np.load(tmp_path / "first.npz"))
  assert any(not np.allclose(first_params[k], on8[k]) for k in on8)


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_hosts(workdir, *overrides):
  """One training job as 2 processes x 2 CPU devices on localhost, joined by jax.distributed."""
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(pid), "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/llama_tiny_adamw.py"),
            "--workdir", str(workdir), "--config.train.progress_bar=False", *overrides]
    procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True))
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs


@pytest.mark.skipif(os.environ.get("LOWRANK_JAX_MULTIHOST") != "1",
                    reason="set LOWRANK_JAX_MULTIHOST=1: two jax.distributed processes on localhost; "
                           "it has hung intermittently when run inside the full suite")
def test_two_hosts_resume_exactly(tmp_path):
  common = ["--config.data.seq_len=32", "--config.train.log_every=3", "--config.train.eval_batches=1",
            "--config.train.checkpoint_every=4", "--config.train.eval_every=0"]
  _two_hosts(tmp_path / "straight", "--config.train.steps=8", *common)
  # The same run as if it had died after its step-4 checkpoint, continued by a second launch.
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")
  logs = _two_hosts(tmp_path / "resumed", "--config.train.steps=8", *common)
  assert "resumed from the checkpoint at step 4" in logs[0]
  import jax
  from train_helpers import saved_params

  straight, resumed = saved_params(str(tmp_path / "straight"), 8), saved_params(str(tmp_path / "resumed"), 8)
  jax.tree.map(np.testing.assert_array_equal, straight, resumed)
