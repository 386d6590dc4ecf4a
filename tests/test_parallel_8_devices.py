"""Eight host CPU devices: LTE heads spread over them agree with one device and communicate only
at merges; FSDP stores an eighth per device and its 8-bit states equal one device's bit for bit;
a checkpoint from 8 devices continues on 1 and 4."""

from __future__ import annotations

import json
import platform

import numpy as np
import pytest

from parallel_helpers import BASE, Worker, assert_close, single_device


# LTE parallel heads, 8 of them: one per device when spread over 8 devices. Clipping is
# active (grad_clip 1.0), merges happen at steps 2 and 4, and two micro-batches per step.
HEADS = {**BASE, "optimizer.name": "mhlora", "optimizer.mhlora.mode": "parallel", "optimizer.mhlora.num_heads": 8,
         "optimizer.mhlora.rank": 4, "optimizer.mhlora.merge_every": 2, "train.grad_accum": 2}


def test_heads_spread_over_8_devices_equal_one_device_and_talk_only_at_merges(tmp_path):
  modes = {"mesh": {}, "pmap": {"parallel.mode": "pmap"}}
  jobs = [{"kind": "train", "workdir": str(tmp_path / name), "out": str(tmp_path / f"{name}.npz"),
           "overrides": {**HEADS, "parallel.shard_heads": True, **extra}} for name, extra in modes.items()]
  jobs += [{"kind": "collectives", "out": str(tmp_path / f"comm_{shard}.json"),
            "overrides": {**HEADS, "parallel.shard_heads": shard}} for shard in (True, False)]
  worker = Worker(8, jobs, tmp_path / "worker.log")
  try:
    reference, ref_summary = single_device(HEADS, tmp_path / "one")  # while the worker runs
    worker.wait()
  finally:
    worker.stop()
  for name in modes:
    got = dict(np.load(tmp_path / f"{name}.npz"))
    # Measured: <= 1.2e-4 (a young lora_b); heads' gradients not scaled to the global mean
    # (so clipping differs) already give 4e-3.
    assert_close(got, reference, f"heads over devices ({name}) vs 1 device", tol=5e-4)
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


# 8-bit states under FSDP, compared update for update (`train_helpers.optimizer_updates`: the
# trainer's optimizer, shardings and refreshes on fixed gradients; the train step's gradient
# all-reduce sums in another order on 8 devices, so trained parameters differ in the last bits
# whatever the states). XLA:CPU contracts a * b + c into one FMA where both sit in one fusion,
# and the FSDP program fuses the 8-bit update (dequantize, Adam, quantize) of the leaves split
# along their last axis, the blocks' axis, otherwise than one device does: with FMA a few second
# moments differ by one ulp (their block scales by 1e-7, a code now and then; parameters 1e-8).
# Without FMA (x86: --xla_cpu_max_isa=AVX) the layouts agree bit for bit, which is what
# catches a block scale taken per shard or a code placed on the wrong device.
NO_FMA = "--xla_cpu_max_isa=AVX"
EIGHT_BIT_FSDP = {**BASE, "optimizer.state_bits": 8, "parallel.fsdp": True}


@pytest.fixture(scope="module")
def fsdp_on_8_devices(request, tmp_path_factory):
  """One 8-device worker (one JAX start-up) for the selected FSDP tests: the memory reports and
  the 8-bit optimizer updates, on 8 devices and, as the reference, on the first one alone."""
  selected = {getattr(item, "function", None) for item in request.session.items}
  out = tmp_path_factory.mktemp("fsdp_on_8")
  jobs = []
  if request.module.test_fsdp_stores_an_eighth_per_device in selected:
    jobs += [{"kind": "memory", "overrides": {**BASE, "parallel.fsdp": fsdp, "model.tie_embeddings": False},
              "out": str(out / f"fsdp_{fsdp}.json")} for fsdp in (False, True)]
  if request.module.test_8bit_states_under_fsdp_on_8_devices_equal_one_device_bitwise in selected:
    jobs += [{"kind": "updates", "overrides": EIGHT_BIT_FSDP, "devices": n, "out": str(out / f"updates_on_{n}.npz")}
             for n in (8, 1)]
  x86 = platform.machine().lower() in ("x86_64", "amd64")
  worker = Worker(8, jobs, out / "worker.log", xla_flags=NO_FMA if x86 else "")
  try:
    worker.wait()
  finally:
    worker.stop()
  return out, x86


def test_fsdp_stores_an_eighth_per_device(fsdp_on_8_devices):
  out, _ = fsdp_on_8_devices
  full = json.loads((out / "fsdp_False.json").read_text())
  sharded = json.loads((out / "fsdp_True.json").read_text())
  for key in ("params_bytes", "opt_state_bytes"):
    ratio = sharded[key] / full[key]
    # Exactly 1/8 for every sharded leaf; the few small leaves (norm scales, counters) stay whole.
    assert 1 / 8 <= ratio < 1 / 8 + 0.01, (key, ratio)
  assert sharded["argument_bytes"] < full["argument_bytes"] / 4


def test_8bit_states_under_fsdp_on_8_devices_equal_one_device_bitwise(fsdp_on_8_devices):
  """AdamW with 8-bit states (`optimizer.state_bits=8`), its parameters and state split over 8
  devices by `parallel.fsdp`: three updates equal one device's, every parameter, code and block
  scale bit for bit (without FMA contraction, see NO_FMA)."""
  out, x86 = fsdp_on_8_devices
  if not x86:
    pytest.skip(f"bitwise only without FMA contraction, forced by {NO_FMA} (x86 only)")
  on8, on1 = dict(np.load(out / "updates_on_8.npz")), dict(np.load(out / "updates_on_1.npz"))
  assert on8.keys() == on1.keys()
  codes = [key for key in on1 if key.endswith(".codes")]
  assert len(codes) >= 2 * 14 and all(on1[key].dtype == np.uint8 and on1[key].any() for key in codes)  # mu, nu
  assert [int(on1[key]) for key in on1 if key.endswith(".count")] == [3, 3]  # Adam's and the schedule's
  for key in on1:
    np.testing.assert_array_equal(on8[key], on1[key], err_msg=key)


def test_checkpoint_from_8_devices_continues_on_1_and_4(tmp_path):
  first = {**BASE, "train.steps": 4}
  resumed = {**BASE, "train.steps": 8}
  eight = tmp_path / "eight"
  workers = [Worker(8, [
      {"kind": "train", "workdir": str(eight), "overrides": first, "out": str(tmp_path / "first.npz"),
       "copy_to": [str(tmp_path / "on1"), str(tmp_path / "on4")]},
      {"kind": "train", "workdir": str(eight), "overrides": resumed, "out": str(tmp_path / "on8.npz")},
  ], tmp_path / "worker8.log")]
  try:
    # Once the step-4 checkpoint is copied, the 8-, 4- and 1-device runs continue side by side.
    workers[0].wait_for(tmp_path / "first.npz.json")
    workers.append(Worker(4, [{"kind": "train", "workdir": str(tmp_path / "on4"), "overrides": resumed,
                                "out": str(tmp_path / "on4.npz")}], tmp_path / "worker4.log"))
    on1, summary = single_device(resumed, tmp_path / "on1")
    for worker in workers:
      worker.wait()
  finally:
    for worker in workers:
      worker.stop()
  assert summary["resumed_from"] == 4
  on8 = dict(np.load(tmp_path / "on8.npz"))
  on4 = dict(np.load(tmp_path / "on4.npz"))
  assert_close(on1, on8, "restored on 1 vs continued on 8")
  assert_close(on4, on8, "restored on 4 vs continued on 8")
  # And they really trained on from the checkpoint: step 8 differs from step 4.
  first_params = dict(np.load(tmp_path / "first.npz"))
  assert any(not np.allclose(first_params[k], on8[k]) for k in on8)
