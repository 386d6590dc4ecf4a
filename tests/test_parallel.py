"""Multi-device training on host CPU devices: every method under mesh, pmap and FSDP agrees
with one device; LTE heads spread over 8 devices agree with one device and communicate only
at merges; checkpoints move between device counts; two jax.distributed processes resume exactly.

Each multi-device case runs in a subprocess (tests/parallel_worker.py) because the
number of host devices is fixed when JAX starts; the one-device references run here.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time

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


class _Worker:
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


def _single_device(overrides, workdir):
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


def _assert_close(a: dict, b: dict, what: str, tol: float = 2e-3):
  """Per leaf, ||a - b|| <= tol ||b||: summation order differs between layouts (and moves an
  SVD's subspace slightly for GaLore/OSD), while a wrong all-reduce or a drifting replica is
  off by O(1)."""
  assert a.keys() == b.keys()
  for key in a:
    err = np.linalg.norm(np.asarray(a[key], np.float64) - b[key]) / max(np.linalg.norm(b[key]), 1e-12)
    assert err <= tol, f"{what}: {key}: relative error {err:.2e}"


# Every method on 2 devices: what makes a layout equal one device (the gradient all-reduce,
# pmap's explicit pmean, FSDP's sharded state and gathers) is the same on 2 devices as on 8,
# while 8 host devices on a 2-core machine cost several times the CPU (GaLore/OSD: 8x). The
# 8-device layouts are checked below (heads over devices; checkpoints moved from 8 to 1 and 4).
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
  worker = _Worker(EQUALITY_DEVICES, jobs, out / "worker.log")
  yield out, worker
  worker.stop()


@pytest.mark.parametrize("method", method_names())
def test_mesh_pmap_and_fsdp_equal_one_device(tmp_path, method, every_method_on_2_devices):
  out, worker = every_method_on_2_devices
  reference, ref_summary = _single_device({**BASE, **method_overrides(method)}, tmp_path / "one")
  # GaLore refreshes its projectors by SVD every 2 steps here: where two singular values at the rank's
  # edge nearly coincide, the 1e-7 differences of a 2-device gradient sum turn the kept subspace a
  # little (measured on one machine: 7.1e-3 on one MLP kernel, every other leaf <= 1e-4). The layouts
  # all sum the same way, so among themselves they must still agree to the tight tolerance.
  tol = 1e-2 if method == "galore" else 2e-3
  first = None
  for name in _layouts(method):
    worker.wait_for(out / f"{method}_{name}.npz.json")
    got = dict(np.load(out / f"{method}_{name}.npz"))
    _assert_close(got, reference, f"{method} {name} on {EQUALITY_DEVICES} devices vs 1", tol=tol)
    if first is None:
      first = (name, got)
    else:
      _assert_close(got, first[1], f"{method} {name} vs {first[0]}, both on {EQUALITY_DEVICES} devices", tol=2e-3)
    summary = json.loads((out / f"{method}_{name}.npz.json").read_text())
    assert abs(summary["train_loss"] - ref_summary["train_loss"]) < 1e-3, (method, name)


INT8 = {"optimizer.name": "adamw", "model.weight_bits": 8}


def test_int8_weights_in_every_layout_equal_one_device(tmp_path, every_method_on_2_devices):
  """int8 weights (`model.weight_bits=8`) under mesh, pmap and FSDP on 2 devices: the codes and
  scales equal one device's. The stochastic rounding draws from each element's global index, so
  every layout rounds the same way (a layout drawing per shard would differ in most codes)."""
  out, worker = every_method_on_2_devices
  reference, ref_summary = _single_device({**BASE, **INT8}, tmp_path / "one")
  assert any(key.endswith(".codes") for key in reference)
  for name in _layouts("adamw"):
    worker.wait_for(out / f"int8_{name}.npz.json")
    got = dict(np.load(out / f"int8_{name}.npz"))
    _assert_close(got, reference, f"int8 {name} on {EQUALITY_DEVICES} devices vs 1")
    summary = json.loads((out / f"int8_{name}.npz.json").read_text())
    assert abs(summary["train_loss"] - ref_summary["train_loss"]) < 1e-3, name


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
  worker = _Worker(8, jobs, tmp_path / "worker.log")
  try:
    reference, ref_summary = _single_device(HEADS, tmp_path / "one")  # while the worker runs
    worker.wait()
  finally:
    worker.stop()
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
  worker = _Worker(8, jobs, out / "worker.log", xla_flags=NO_FMA if x86 else "")
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
  workers = [_Worker(8, [
      {"kind": "train", "workdir": str(eight), "overrides": first, "out": str(tmp_path / "first.npz"),
       "copy_to": [str(tmp_path / "on1"), str(tmp_path / "on4")]},
      {"kind": "train", "workdir": str(eight), "overrides": resumed, "out": str(tmp_path / "on8.npz")},
  ], tmp_path / "worker8.log")]
  try:
    # Once the step-4 checkpoint is copied, the 8-, 4- and 1-device runs continue side by side.
    workers[0].wait_for(tmp_path / "first.npz.json")
    workers.append(_Worker(4, [{"kind": "train", "workdir": str(tmp_path / "on4"), "overrides": resumed,
                                "out": str(tmp_path / "on4.npz")}], tmp_path / "worker4.log"))
    on1, summary = _single_device(resumed, tmp_path / "on1")
    for worker in workers:
      worker.wait()
  finally:
    for worker in workers:
      worker.stop()
  assert summary["resumed_from"] == 4
  on8 = dict(np.load(tmp_path / "on8.npz"))
  on4 = dict(np.load(tmp_path / "on4.npz"))
  _assert_close(on1, on8, "restored on 1 vs continued on 8")
  _assert_close(on4, on8, "restored on 4 vs continued on 8")
  # And they really trained on from the checkpoint: step 8 differs from step 4.
  first_params = dict(np.load(tmp_path / "first.npz"))
  assert any(not np.allclose(first_params[k], on8[k]) for k in on8)


def _reserve_port():
  """A localhost port held for the whole test: bound (not listening) with SO_REUSEPORT.

  The coordinator's gRPC server binds with SO_REUSEPORT too, so it can listen on the held
  port, while the kernel hands it to no one else meanwhile. Picking a free port and closing
  it before the coordinator starts (seconds later: two JAX imports) left a window in which
  another socket could take it; process 1 then connected to a stranger and waited out the
  whole initialization timeout.
  """
  import socket

  sock = socket.socket()
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
  sock.bind(("127.0.0.1", 0))
  return sock


def _cpu_seconds(pids) -> float:
  """CPU time (user + system) the processes have used so far; 0 for one that is gone."""
  total = 0.0
  for pid in pids:
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
      pass
  return total


def _wait_all(procs, logs, idle_limit_s: float = 300.0) -> None:
  """Wait for every process; stop all as soon as one fails, or when none has used any CPU
  for `idle_limit_s` (deadlocked). No wall-clock limit: a slow machine only makes it slower."""

  last_cpu, last_change = -1.0, time.monotonic()
  while any(p.poll() is None for p in procs):
    if any(p.returncode not in (None, 0) for p in procs):
      break
    cpu = _cpu_seconds([p.pid for p in procs if p.poll() is None])
    # Progress is CPU used, not time passed: even a heavily loaded machine gives a live pair
    # more than this per window, while a deadlocked pair's heartbeats use far less.
    if cpu - last_cpu > 1.0:
      last_cpu, last_change = cpu, time.monotonic()
    elif time.monotonic() - last_change > idle_limit_s and os.path.isdir("/proc"):
      break
    time.sleep(1.0)
  failed = [(p, log) for p, log in zip(procs, logs) if p.poll() != 0]
  failed.sort(key=lambda item: item[0].returncode is None)  # the one that failed first, if any
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  if failed:
    p, log = failed[0]
    state = "deadlocked (no CPU used for a while)" if p.returncode < 0 else f"exited {p.returncode}"
    pytest.fail(f"process {procs.index(p)} {state}:\n{log.read_text(errors='replace')[-3000:]}")


def _two_hosts(workdir, *overrides, cache_dir):
  """One training job as 2 processes x 2 CPU devices on localhost, joined by jax.distributed.

  Each process writes its output to a file (a pipe nobody reads while the other process
  is waited for can fill and block it mid-collective). The compilation cache is shared,
  so a second launch of the same job does not compile again.
  """
  port = _reserve_port()
  procs, logs = [], []
  try:
    for pid in range(2):
      env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
             "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port.getsockname()[1]}", "JAX_NUM_PROCESSES": "2",
             "JAX_PROCESS_ID": str(pid), "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
             "JAX_COMPILATION_CACHE_DIR": str(cache_dir)}
      args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/llama_tiny_adamw.py"),
              "--workdir", str(workdir), "--config.train.progress_bar=False", *overrides]
      logs.append(workdir.parent / f"{workdir.name}.process{pid}.log")
      with open(logs[-1], "w") as out:
        procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    _wait_all(procs, logs)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    port.close()
  return [log.read_text() for log in logs]


def _launch_two(workdir, *overrides, cache_dir, port: int):
  """Both processes of a 2-process job (2 CPU devices each), their output to files beside `workdir`."""
  procs, logs = [], []
  for pid in range(2):
    env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"},
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
           "LOWRANK_LOST_AFTER_S": "10"}  # (30 s by default) a survivor blocked in a collective waits this long
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/llama_tiny_adamw.py"),
            "--workdir", str(workdir), "--config.train.progress_bar=False", *overrides]
    logs.append(workdir.parent / f"{workdir.name}.{len(list(workdir.parent.glob(workdir.name + '.*')))}.log")
    with open(logs[-1], "w") as out:
      procs.append(subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
  return procs, logs


def _interrupt_two(workdir, interrupt, *overrides, cache_dir):
  """A 2-process job, `interrupt(procs)` once it has written a checkpoint past its first; then
  wait for both (no time limit: a hang hangs the test, which is the failure). Returns the logs."""
  port = _reserve_port()
  def newest():
    return max((int(p.name) for p in (workdir / "checkpoints").glob("[0-9]*") if p.name.isdigit()), default=0)

  first = newest() + 8
  procs, logs = _launch_two(workdir, *overrides, cache_dir=cache_dir, port=port.getsockname()[1])
  try:
    while newest() < first:
      assert all(p.poll() is None for p in procs), logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
      time.sleep(0.05)
    interrupt(procs)
    for p in procs:
      p.wait()
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    port.close()
  return procs, [log.read_text().replace("\r", "\n") for log in logs]


def _error_lines(log):
  return [line for line in log.splitlines() if line.startswith("error:")]


def test_two_processes_stop_together_survive_a_dead_peer_and_resume_exactly(tmp_path):
  """One 2-process run, interrupted twice, then finished; it ends bit for bit where an
  uninterrupted run ends.
  1. SIGTERM to process 1 only: both save the same step (agreed at a log step) and exit 143.
  2. Relaunched, it resumes; process 1 is killed (kill -9): process 0 exits with code 4 and one
     line naming process 1, never hangs.
  3. Relaunched, it resumes from the last checkpoint and finishes."""
  common = ["--config.data.seq_len=32", "--config.train.log_every=2", "--config.train.eval_batches=1",
            "--config.train.checkpoint_every=4", "--config.train.eval_every=0",
            "--config.optimizer.schedule=constant"]  # the lr does not depend on train.steps
  cache, run = tmp_path / "compilation_cache", tmp_path / "run"
  forever = ["--config.train.steps=100000", *common]

  procs, logs = _interrupt_two(run, lambda procs: procs[1].send_signal(signal.SIGTERM), *forever, cache_dir=cache)
  assert [p.returncode for p in procs] == [143, 143], logs[0][-3000:] + logs[1][-3000:]
  stopped = json.loads((run / "summary.json").read_text())["steps"]
  assert f"stopped at step {stopped} by SIGTERM; checkpoint saved" in logs[0]
  assert "SIGTERM: saving a checkpoint at the next log step" in logs[1]  # the one that got it
  assert max(int(p.name) for p in (run / "checkpoints").glob("[0-9]*") if p.name.isdigit()) == stopped

  procs, logs = _interrupt_two(run, lambda procs: procs[1].kill(), *forever, cache_dir=cache)
  assert f"resumed from the checkpoint at step {stopped}" in logs[0]
  assert procs[0].returncode == 4, logs[0][-3000:]
  (line,) = _error_lines(logs[0])
  assert line.startswith("error: process 0 of 2 lost contact with process(es) 1 (") and "Traceback" not in logs[0]

  last = max(int(p.name) for p in (run / "checkpoints").glob("[0-9]*") if p.name.isdigit())
  end = [f"--config.train.steps={last + 4}", *common]
  assert f"resumed from the checkpoint at step {last}" in _two_hosts(run, *end, cache_dir=cache)[0]
  _two_hosts(tmp_path / "straight", *end, cache_dir=cache)
  import jax
  from train_helpers import saved_params

  jax.tree.map(np.testing.assert_array_equal, saved_params(str(tmp_path / "straight"), last + 4),
               saved_params(str(run), last + 4))
