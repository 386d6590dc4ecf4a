"""Two jax.distributed processes on one machine: a stop signal to one stops both at one
checkpoint, a dead peer is named in one line, and the run resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from train_helpers import REPO


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
