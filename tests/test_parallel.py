"""Every method under mesh, pmap and FSDP on 2 host CPU devices agrees with one device (and so
do int8 weights). The 2-device runs go to one worker subprocess (the number of host devices is
fixed when JAX starts); the one-device references run here meanwhile."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lowrank_jax.train import method_names
from parallel_helpers import BASE, Worker, assert_close, method_overrides, single_device


# Every method on 2 devices: what makes a layout equal one device (the gradient all-reduce,
# pmap's explicit pmean, FSDP's sharded state and gathers) is the same on 2 devices as on 8,
# while 8 host devices on a 2-core machine cost several times the CPU (GaLore/OSD: 8x). The
# 8-device layouts are checked in test_parallel_8_devices.py (heads over devices; checkpoints moved
# from 8 to 1 and 4).
EQUALITY_DEVICES = 2


def _layouts(method: str) -> dict:
  modes = {"mesh": {}, "pmap": {"parallel.mode": "pmap"}}
  if method in ("adamw", "galore"):  # FSDP for the full-rank and the projected optimizer states
    modes["fsdp"] = {"parallel.fsdp": True}
  return modes


@pytest.fixture(scope="module")
def every_method_on_2_devices(request, tmp_path_factory):
  """One worker process trains every selected method in every layout (one JAX start-up and
  one set of small compiled helpers for all), while the tests compute their one-device
  references here. Yields (outputs directory, worker)."""
  test = request.module.test_mesh_pmap_and_fsdp_equal_one_device
  selected = [item.callspec.params["method"] for item in request.session.items
              if getattr(item, "function", None) is test]
  out = tmp_path_factory.mktemp("every_method")
  jobs = [{"kind": "train", "workdir": str(out / f"{method}_{name}"), "out": str(out / f"{method}_{name}.npz"),
           "overrides": {**BASE, **method_overrides(method), **extra}}
          for method in selected for name, extra in _layouts(method).items()]
  if any(getattr(item, "function", None) is request.module.test_int8_weights_in_every_layout_equal_one_device
         for item in request.session.items):
    jobs += [{"kind": "train", "workdir": str(out / f"int8_{name}"), "out": str(out / f"int8_{name}.npz"),
              "overrides": {**BASE, **INT8, **extra}} for name, extra in _layouts("adamw").items()]
  worker = Worker(EQUALITY_DEVICES, jobs, out / "worker.log")
  yield out, worker
  worker.stop()


@pytest.mark.parametrize("method", method_names())
def test_mesh_pmap_and_fsdp_equal_one_device(tmp_path, method, every_method_on_2_devices):
  out, worker = every_method_on_2_devices
  reference, ref_summary = single_device({**BASE, **method_overrides(method)}, tmp_path / "one")
  # GaLore refreshes its projectors by SVD every 2 steps here: where two singular values at the rank's
  # edge nearly coincide, the 1e-7 differences of a 2-device gradient sum turn the kept subspace a
  # little (measured on one machine: 7.1e-3 on one MLP kernel, every other leaf <= 1e-4). The layouts
  # all sum the same way, so among themselves they must still agree to the tight tolerance.
  tol = 1e-2 if method == "galore" else 2e-3
  first = None
  for name in _layouts(method):
    worker.wait_for(out / f"{method}_{name}.npz.json")
    got = dict(np.load(out / f"{method}_{name}.npz"))
    assert_close(got, reference, f"{method} {name} on {EQUALITY_DEVICES} devices vs 1", tol=tol)
    if first is None:
      first = (name, got)
    else:
      assert_close(got, first[1], f"{method} {name} vs {first[0]}, both on {EQUALITY_DEVICES} devices", tol=2e-3)
    summary = json.loads((out / f"{method}_{name}.npz.json").read_text())
    assert abs(summary["train_loss"] - ref_summary["train_loss"]) < 1e-3, (method, name)


INT8 = {"optimizer.name": "adamw", "model.weight_bits": 8}


def test_int8_weights_in_every_layout_equal_one_device(tmp_path, every_method_on_2_devices):
  """int8 weights (`model.weight_bits=8`) under mesh, pmap and FSDP on 2 devices: the codes and
  scales equal one device's. The stochastic rounding draws from each element's global index, so
  every layout rounds the same way (a layout drawing per shard would differ in most codes)."""
  out, worker = every_method_on_2_devices
  reference, ref_summary = single_device({**BASE, **INT8}, tmp_path / "one")
  assert any(key.endswith(".codes") for key in reference)
  for name in _layouts("adamw"):
    worker.wait_for(out / f"int8_{name}.npz.json")
    got = dict(np.load(out / f"int8_{name}.npz"))
    assert_close(got, reference, f"int8 {name} on {EQUALITY_DEVICES} devices vs 1")
    summary = json.loads((out / f"int8_{name}.npz.json").read_text())
    assert abs(summary["train_loss"] - ref_summary["train_loss"]) < 1e-3, name
