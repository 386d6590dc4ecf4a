"""Runs trainer jobs in a process with N host CPU devices (the device count is fixed at start).

  python tests/parallel_worker.py N SPEC_JSON

SPEC: {"jobs": [{"kind": "train", "workdir": ..., "overrides": {...}, "out": "x.npz",
                 "copy_to": [dirs to copy the workdir to afterwards]},
                {"kind": "memory", "overrides": {...}, "out": "x.json"},
                {"kind": "collectives", "overrides": {...}, "out": "x.json"},
                {"kind": "updates", "overrides": {...}, "devices": n, "out": "x.npz"}],
       "xla_flags": "more XLA_FLAGS (optional)"}
Trained parameters go to `out` as flattened npz (key = path), with the summary beside it
(`out`.json, written last: its presence means the job is complete).
"updates" writes `train_helpers.optimizer_updates` on the first `devices` devices (all if absent).
"collectives" writes the compiled step's collectives and the shapes of the LTE head and
kernel variables (whole, and one device's block).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={int(sys.argv[1])} "
                           f"{json.loads(sys.argv[2]).get('xla_flags', '')}").strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lowrank_jax.train import memory_report, train  # noqa: E402
from lowrank_jax.train.checkpoint import Checkpointer  # noqa: E402
from lowrank_jax.train.config import resolve, validate  # noqa: E402
from lowrank_jax.train.setup import build_setup, vocab_size_of  # noqa: E402
from train_helpers import optimizer_updates, tiny_config  # noqa: E402


def final_params(config, workdir):
  run = resolve(config)
  setup = build_setup(run, vocab_size_of(run))
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=100)
  state, _, _ = ckpt.restore(setup.abstract_state)
  flat = jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, state.params))[0]
  return {jax.tree_util.keystr(k): v for k, v in flat}


def collectives(config):
  from lowrank_jax.optim.lte import lte_leaf_roles
  from lowrank_jax.train.collectives import collectives as collectives_of

  run = resolve(config)
  setup = build_setup(run, vocab_size_of(run))
  hlo = setup.compiled_step.lower(setup.abstract_state, setup.abstract_tokens()).compile().as_text()
  params = setup.abstract_state.params
  shapes = {"head": set(), "head_block": set(), "kernel": set()}
  for role, leaf in zip(jax.tree.leaves(lte_leaf_roles(params)), jax.tree.leaves(params)):
    if role == "kernel":
      shapes["kernel"].add(tuple(leaf.shape))
    elif role:
      shapes["head"].add(tuple(leaf.shape))
      shapes["head_block"].add(tuple(leaf.sharding.shard_shape(leaf.shape)))
  return {"collectives": [{"kind": c.kind, "conditional": c.conditional, "shapes": [list(s) for _, s in c.shapes]}
                          for c in collectives_of(hlo)],
          **{k: sorted(list(s) for s in v) for k, v in shapes.items()}}


def main():
  assert jax.device_count() == int(sys.argv[1])
  for job in json.loads(sys.argv[2])["jobs"]:
    config = tiny_config(**job["overrides"])
    validate(config, num_devices=jax.device_count())
    if job["kind"] == "updates":
      np.savez(job["out"] + ".partial.npz", **optimizer_updates(config, job.get("devices")))
      os.replace(job["out"] + ".partial.npz", job["out"])  # whole or absent
      continue
    if job["kind"] in ("memory", "collectives"):
      with open(job["out"], "w") as f:
        json.dump(memory_report(config) if job["kind"] == "memory" else collectives(config), f)
      continue
    summary = train(config, job["workdir"])
    np.savez(job["out"], **final_params(config, job["workdir"]))
    for target in job.get("copy_to", []):
      shutil.copytree(job["workdir"], target)
    # The summary last, by rename: a test waiting for it (the worker still running) sees a whole job.
    with open(job["out"] + ".json.partial", "w") as f:
      json.dump(summary, f)
    os.replace(job["out"] + ".json.partial", job["out"] + ".json")


if __name__ == "__main__":
  main()
