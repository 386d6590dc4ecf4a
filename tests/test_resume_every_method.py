"""Every registered method (and VeLoRA layers, and 8-bit optimizer states) resumes bit for bit.

Each case trains the tiny model to step N with a checkpoint every K steps, copies the workdir,
deletes the copy's step-N checkpoint (as if the run had been killed after step K) and trains the
copy again: it resumes from step K. Everything the two step-N checkpoints hold (parameters,
optimizer state, step, RNG, the other model variables, the data position) and the metrics must
be equal, exactly. K is chosen so that the resumed steps cross what each method keeps across
steps, and K itself is off that event's period: a GaLore/Fira projector refresh, an APOLLO
re-draw, a ReLoRA or mhLoRA merge (OSD moves its projector every step).

Deleting the last checkpoint stands in for a kill after step K, in process. The real `kill -9` path, a process killed mid-run and
restarted, is `test_train.py::test_resume_after_kill_9_equals_the_uninterrupted_run` (AdamW,
16- and 8-bit weights); what it adds here (a save cut off mid-write leaves the previous
checkpoint intact: orbax writes to a temporary directory and renames it) does not depend on
the method.

Both runs of a case compile the same programs: a persistent compilation cache (this module
only, restored afterwards) lets the second load them instead of compiling again.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.experimental.compilation_cache import compilation_cache

from lowrank_jax.train import method_names, train
from lowrank_jax.train import setup as setup_lib
from train_helpers import tiny_config

STEPS, EVERY = 8, 4  # resumed from step 4 of 8
PERIOD = 3  # refreshes, re-draws and merges at updates 3 and 6: step 4 is mid-period, 6 is in the resumed part

RUN = {"train.steps": STEPS, "train.checkpoint_every": EVERY, "train.log_every": 2, "train.eval_every": 0,
       "train.eval_batches": 1, "train.batch_size": 8, "data.seq_len": 32}

# Every registered method: its overrides and the period of what the resume must carry (None: a
# plain moment state, which every step changes).
METHODS = {
    "adamw": ({}, None),
    "sgd": ({}, None),  # momentum 0.9: one trace per parameter
    "lora": ({"optimizer.lora.rank": 8}, None),
    "relora": ({"optimizer.lora.rank": 8, "optimizer.relora.merge_every": PERIOD,
                "optimizer.relora.restart_warmup_steps": 1, "optimizer.relora.prune": "random"}, PERIOD),
    "mhlora": ({"optimizer.mhlora.rank": 4, "optimizer.mhlora.merge_every": PERIOD}, PERIOD),
    "galore": ({"optimizer.galore.rank": 16, "optimizer.galore.update_proj_gap": PERIOD}, PERIOD),
    "osd": ({"optimizer.osd.rank": 16}, None),  # online PCA: the projector and its Adam state move every step
    "apollo": ({"optimizer.apollo.rank": 16, "optimizer.apollo.update_proj_gap": PERIOD}, PERIOD),
    "apollo_mini": ({"optimizer.apollo_mini.update_proj_gap": PERIOD}, PERIOD),
    "fira": ({"optimizer.fira.rank": 16, "optimizer.fira.update_proj_gap": PERIOD}, PERIOD),
    "muon": ({}, None),  # its momentum and AdamW's moments on the rest
}
# Beyond the methods: VeLoRA's compressed layers (their v is set by the first batch and kept
# in the checkpoint's `rest`) and 8-bit states. GaLore's 8-bit state holds both kinds of coded
# moments: AdamW's full-rank ones (embedding and head, not projected) and the low-rank ones
# (rank 32: the 32 x 128 moments reach quantize_state's 4096-element minimum), so a separate
# AdamW case would add a compile and nothing else.
EXTRA = {
    "velora": ({"optimizer.name": "adamw", "model.velora.layers": "o:8,down:8"}, None),
    "galore_8bit": ({"optimizer.name": "galore", "optimizer.state_bits": 8, "optimizer.galore.rank": 32,
                     "optimizer.galore.update_proj_gap": PERIOD}, PERIOD),
    # Muon's momentum coded in 8 bits beside AdamW's moments of the embedding and head (the parameter
    # groups on: their chain around the state resumes too).
    "muon_8bit": ({"optimizer.name": "muon", "optimizer.state_bits": 8, "optimizer.embed_lr_scale": 2.0,
                   "optimizer.other_lr_scale": 0.5}, None),
    # QLoRA with DoRA and LoRA+: the NF4 base (codes and double-quantized scales, never updated), the
    # magnitudes and the scaled B learning rate.
    "qdora_nf4": ({"optimizer.name": "lora", "optimizer.lora.rank": 8, "model.base_bits": 4,
                   "optimizer.lora.variant": "dora", "optimizer.lora.b_lr_ratio": 4.0}, None),
}
# Where each 8-bit case must hold coded moments (names in the checkpoint's state paths).
CODED = {"galore_8bit": {"dense_state", "lowrank_state"}, "muon_8bit": {"muon", "adam"}}
CASES = {**{name: ({"optimizer.name": name, **extra}, period) for name, (extra, period) in METHODS.items()}, **EXTRA}


def test_every_registered_method_has_a_case():
  assert sorted(METHODS) == method_names(), "a registered method without a resume case: add it to METHODS"


@pytest.fixture(scope="module", autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """A persistent compilation cache for this module: the resumed run loads the programs the
  uninterrupted one compiled. The previous settings come back afterwards."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  saved = {name: getattr(jax.config, name) for name in names}
  compilation_cache.reset_cache()
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("compilation_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


def _checkpoint(workdir, step: int) -> dict:
  """Every item of a step's checkpoint as stored (numpy arrays in nested containers), read
  without the trainer's abstract state."""
  directory = os.path.join(workdir, "checkpoints", str(step))
  items = {}
  for item in sorted(os.listdir(directory)):
    path = os.path.join(directory, item)
    if item == "data":
      with open(os.path.join(path, "metadata")) as f:
        items[item] = json.load(f)
    elif os.path.isdir(path):
      items[item] = jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path))
  return items


def _records(workdir) -> list[dict]:
  timing = ("tokens_per_s", "step_time_s")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in f]


def _assert_equal_trees(a, b, what: str):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b, what
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y, err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("case", list(CASES))
def test_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path, monkeypatch, case):
  overrides, period = CASES[case]
  if period is not None:  # the resumed steps cross an event, and the resume is not at one
    assert EVERY % period and any(EVERY < t < STEPS for t in range(0, STEPS, period)), case
  refreshed = []  # the split projector refreshes (GaLore, OSD, Fira), by the step they precede
  original = setup_lib.Setup.refresh_step

  def recording(self, state, tokens):
    refreshed.append(int(state.step))
    return original(self, state, tokens)

  monkeypatch.setattr(setup_lib.Setup, "refresh_step", recording)
  config = tiny_config(**RUN, **overrides)
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train(config, str(straight))
  straight_refreshes, refreshed[:] = list(refreshed), []
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / str(STEPS))  # killed after the step-4 checkpoint
  assert train(config, str(resumed))["resumed_from"] == EVERY

  a, b = _checkpoint(straight, STEPS), _checkpoint(resumed, STEPS)
  assert a.keys() == b.keys() >= {"params", "opt_state", "progress", "data"}
  for item in a:
    _assert_equal_trees(a[item], b[item], f"{case}: {item}")
  assert _records(resumed) == _records(straight)
  # The refresh program ran at the same steps after the resume.
  assert refreshed == [s for s in straight_refreshes if s >= EVERY], (straight_refreshes, refreshed)

  # The case trains what it names.
  if overrides.get("optimizer.state_bits") == 8:
    codes = {jax.tree_util.keystr(path): x for path, x in jax.tree_util.tree_flatten_with_path(a["opt_state"])[0]
             if "codes" in jax.tree_util.keystr(path)}
    assert CODED[case] <= {k for path in codes for k in path.split("'")}, codes.keys()
    assert all(x.dtype.itemsize == 1 for x in codes.values()), "no 8-bit moment in the state"
  if "model.velora.layers" in overrides:
    assert "rest" in a
  if straight_refreshes and period is not None:  # a refresh program ran in the resumed steps
    assert any(EVERY < s < STEPS for s in refreshed), refreshed
