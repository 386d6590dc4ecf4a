"""What protects a user's run: divergence is stopped before it destroys a checkpoint, a damaged
checkpoint falls back to the one before, nothing restarts or is overwritten silently, and bad
input gets one line. Every test starts from one shared 4-step run (checkpoints at 2 and 4)."""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

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


@pytest.mark.parametrize("guard", ["step", "loss"])
def test_divergence_skips_steps_stops_with_exit_3_and_keeps_the_good_checkpoints(trained, tmp_path, guard):
  workdir = _copy(trained, tmp_path)
  before = {step: saved_params(str(workdir), step) for step in (2, 4)}
  # An absurd learning rate: the parameters overflow, the loss turns NaN. The "loss" guard (which
  # lets an accelerator free each gradient after its update) lets that first update through; the
  # checkpoint check still keeps the non-finite parameters out of every checkpoint.
  diverging = _config(**{"train.steps": 30, "optimizer.lr": 1e30, "train.max_nonfinite_steps": 3,
                         "train.nonfinite_guard": guard})
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
    pytest.param(["--config.model.attention=cudnn"], "config.model.attention",
                 marks=pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN runs on a GPU")),
], ids=["unknown key", "positional argument", "lr nan", "seed out of range", "linear kind", "workdir under a file",
        "cudnn without a GPU"])
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


# --- sizes: memory and ranks, checked before anything is allocated ----------------------------

def test_a_state_over_the_memory_is_refused_before_allocation_naming_figure_capacity_and_keys(trained, monkeypatch):
  from lowrank_jax.train import loop, memory_check, resolve
  from lowrank_jax.train.setup import build_setup, vocab_size_of

  run = resolve(_config())
  state = build_setup(run, vocab_size_of(run)).abstract_state
  # The floor counted independently: the saved parameters, and AdamW's two moments of each.
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(saved_params(str(trained), 4)))
  model, optimizer = memory_check.state_bytes(state)
  assert model == param_bytes and 2 * param_bytes <= optimizer <= 2 * param_bytes + 64
  need = model + optimizer
  at_limit = memory_check.Capacity(math.ceil(need / (1 - memory_check.MARGIN)), "a test host", 1, True)
  memory_check.check_memory(run, state, at_limit)  # exactly at the limit: fits
  short = memory_check.Capacity(at_limit.bytes - 16, "a test host", 1, True)
  with pytest.raises(ConfigError) as info:
    memory_check.check_memory(run, state, short)
  message = str(info.value)
  assert message.startswith("config.model.size: the run does not fit") and "\n" not in message
  assert f"{need / 2**30:,.2f} GiB" in message and f"{short.bytes / 2**30:,.2f} GiB of a test host" in message
  assert all(k in message for k in ("model.size='tiny'", "model.param_dtype", "optimizer.name='adamw'",
                                     "train.check_memory=False"))
  # Host devices share the host's memory: each one's copy counts.
  with pytest.raises(ConfigError, match="2 host devices"):
    memory_check.check_memory(run, state, memory_check.Capacity(at_limit.bytes + 16, "a test host", 2, True))
  memory_check.check_memory(resolve(_config(**{"train.check_memory": False})), state, short)  # the escape hatch

  # The trainer refuses before it allocates a parameter, and writes nothing into the workdir.
  monkeypatch.setattr(memory_check, "capacity", lambda: short)
  monkeypatch.setattr(loop, "init_state", lambda *a: pytest.fail("allocated before the memory check"))
  with pytest.raises(ConfigError, match="does not fit"):
    train(_config(), str(trained.parent / "refused"))
  assert not os.path.exists(trained.parent / "refused" / "config.json")


def _gqa_config(tmp_path, method, rank):
  from test_pretrained import llama_weights, write_checkpoint

  config, weights = llama_weights(vocab=300, layers=1, positions=64)  # d 32, k and v 32 -> 16 (2 of 4 heads)
  base = write_checkpoint(tmp_path / "gqa", config, weights)
  return _config(**{"model.init_from": base, "optimizer.name": method, f"optimizer.{method}.rank": rank})


def test_a_rank_over_some_layers_names_the_layers_that_run_full_rank(tmp_path):
  from lowrank_jax.optim._subspace import is_placeholder
  from lowrank_jax.train import resolve
  from lowrank_jax.train.config import full_rank_layers
  from lowrank_jax.train.setup import build_setup

  run = resolve(_gqa_config(tmp_path, "galore", 20))
  warning = full_rank_layers(run)
  assert "optimizer.galore.rank=20" in warning and "k (16), v (16)" in warning and "not projected" in warning
  assert "q (" not in warning and "\n" not in warning
  # The layers named are exactly those the optimizer leaves unprojected (its state says so).
  projectors = next(s.projector for s in jax.tree.leaves(
      build_setup(run, 300).abstract_state.opt_state, is_leaf=lambda s: hasattr(s, "projector")) if hasattr(s, "projector"))
  unprojected = {path[-2].key for path, p in jax.tree_util.tree_flatten_with_path(projectors, is_leaf=is_placeholder)[0]
                 if path[-1].key == "kernel" and "layers" in str(path) and is_placeholder(p)}
  assert unprojected == {"k", "v"}
  assert "k (16), v (16)" in full_rank_layers(resolve(_gqa_config(tmp_path, "lora", 20)))
  assert full_rank_layers(resolve(_gqa_config(tmp_path, "galore", 16))) is None
  with pytest.raises(ConfigError, match="optimizer.galore.rank: 40 is larger than every matrix"):
    resolve(_gqa_config(tmp_path, "galore", 40))


# --- Ctrl-C --------------------------------------------------------------------------------------

def test_completed_steps_count_only_what_the_device_finished():
  from lowrank_jax.train.loop import _completed

  class Metric:
    def __init__(self, ready):
      self.ready = ready

    def is_ready(self):
      return self.ready

  pending = [{"loss": Metric(r)} for r in (True, True, False, True)]  # in order: the 4th waits on the 3rd
  assert _completed(10, pending) == 8


def _launch(workdir, log, *flags, cache=None):
  """train.py on the tiny config in a subprocess, its stderr to `log` (a file, not a pipe: nobody
  reads a pipe while the run trains)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if cache is not None:  # a second launch of the same program does not compile again
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
  with open(log, "w") as err:
    return subprocess.Popen([sys.executable, "train.py", "--config=configs/llama_tiny_adamw.py",
                             f"--workdir={workdir}", *flags], cwd=REPO, env=env, stderr=err)


def _when_training(proc, workdir, steps=3):
  """Wait until the run has logged `steps` steps (no time limit: a slow machine only waits longer)."""
  metrics = workdir / "metrics.jsonl"
  while proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= steps):
    time.sleep(0.05)


def _errors(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("compilation_cache")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_exits_with_its_code_a_fresh_eval_and_resumes_bit_exactly(tmp_path, signum,
                                                                                      compile_cache):
  constant = {"optimizer.schedule": "constant"}  # the lr does not depend on train.steps: resume with fewer
  workdir, log = tmp_path / "interrupted", tmp_path / "stderr.txt"
  flags = [f"--config.{k}={v}" for k, v in {**SMALL, **constant, "train.steps": 10000}.items()]
  proc = _launch(workdir, log, *flags, cache=compile_cache)
  _when_training(proc, workdir)
  proc.send_signal(signum)
  proc.wait()
  stderr = log.read_text()
  assert proc.returncode == 128 + signum, stderr[-3000:]  # Ctrl-C 130, SIGTERM 143: the shell's codes
  summary = json.loads((workdir / "summary.json").read_text())
  stopped = summary["steps"]
  assert summary["stopped_early"] and summary["stop_signal"] == signal.Signals(signum).name
  assert 3 <= stopped < 10000
  name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
  assert f"{name}: saving a checkpoint after this step" in stderr
  assert f"stopped at step {stopped} by {name}; checkpoint saved" in stderr
  assert not _errors(stderr) and "Traceback" not in stderr, stderr[-3000:]
  assert f"{stopped}/10000" in stderr.split("stopped at step")[-1]  # the bar's last count: the steps done
  assert max(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()) == stopped
  last = _strict_records(workdir)[-1]  # train.eval_every=0: the only evaluation is the one after the stop
  assert last["step"] == stopped and last["eval_loss"] == summary["eval_loss"]

  resumed = train(_config(**constant, **{"train.steps": stopped + 2}), str(workdir))
  assert resumed["resumed_from"] == stopped and not resumed["stopped_early"]
  train(_config(**constant, **{"train.steps": stopped + 2}), str(tmp_path / "straight"))
  jax.tree.map(np.testing.assert_array_equal, saved_params(str(workdir), stopped + 2),
               saved_params(str(tmp_path / "straight"), stopped + 2))


def test_sigusr1_saves_and_exits_138(tmp_path, compile_cache):
  """SLURM's --signal=USR1@SECONDS: warned ahead of the time limit, the run saves and stops."""
  workdir, log = tmp_path / "run", tmp_path / "stderr.txt"
  proc = _launch(workdir, log, *[f"--config.{k}={v}" for k, v in {**SMALL, "train.steps": 10000}.items()],
                 cache=compile_cache)
  _when_training(proc, workdir)
  proc.send_signal(signal.SIGUSR1)
  proc.wait()
  stderr = log.read_text()
  assert proc.returncode == 138, stderr[-3000:]
  stopped = json.loads((workdir / "summary.json").read_text())["steps"]
  assert f"stopped at step {stopped} by SIGUSR1; checkpoint saved" in stderr
  assert max(int(p) for p in os.listdir(workdir / "checkpoints") if p.isdigit()) == stopped


def _catches(pid, signum) -> bool:
  """Whether process `pid` has a handler installed for `signum` (/proc's SigCgt mask)."""
  with open(f"/proc/{pid}/status") as f:
    caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
  return bool(caught >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc to know the handler is in place")
def test_a_signal_before_training_or_a_second_one_stops_at_once_in_one_line(tmp_path, compile_cache):
  flags = [f"--config.{k}={v}" for k, v in {**SMALL, "train.steps": 10000}.items()]
  # Before training: while JAX is imported and the run is set up, SIGTERM stops at once.
  early = tmp_path / "early"
  proc = _launch(early, tmp_path / "early.txt", *flags, cache=compile_cache)
  while proc.poll() is None and not _catches(proc.pid, signal.SIGTERM):
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  proc.wait()
  stderr = (tmp_path / "early.txt").read_text()
  assert proc.returncode == 143, stderr[-3000:]
  assert _errors(stderr) == ["error: stopped at once by SIGTERM; checkpoints already written are intact: run the "
                             "same command to resume from the newest"], stderr[-3000:]
  # (The handler runs when Python next gets control, which may be after the run has made its workdir.)
  assert "Traceback" not in stderr and not glob.glob(str(early / "checkpoints" / "[0-9]*"))

  # While training: the first of two signals asks for a save after the step, the second stops at once.
  workdir = tmp_path / "twice"
  proc = _launch(workdir, tmp_path / "twice.txt", *flags, cache=compile_cache)
  _when_training(proc, workdir)
  proc.send_signal(signal.SIGUSR1)
  proc.send_signal(signal.SIGTERM)
  proc.wait()
  stderr = (tmp_path / "twice.txt").read_text()
  assert proc.returncode in (138, 143), stderr[-3000:]  # the code of whichever was handled second
  (line,) = _errors(stderr)
  assert line.startswith("error: stopped at once by SIG") and "Traceback" not in stderr, stderr[-3000:]


GC_SIGNAL = """
import importlib.util, os, signal, sys, time
spec = importlib.util.spec_from_file_location("train_cli", sys.argv[1])
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
signal.signal(signal.SIGTERM, cli._stop_at_once)

class Dies:
  def __del__(self):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.5)  # the handler runs here, inside __del__

Dies()
print("went on", flush=True)
"""


def test_a_stop_signal_handled_inside_a_finalizer_still_stops_at_once(tmp_path):
  """Python ignores an exception a signal handler raises while it runs inside a finalizer or a
  garbage-collection callback ("Exception ignored in"): train.py's handler stops the run itself.
  (Seen: a SIGTERM during JAX's start-up landed in jax's _xla_gc_callback, and the run trained on.)"""
  script = tmp_path / "gc_signal.py"
  script.write_text(GC_SIGNAL)
  proc = subprocess.run([sys.executable, str(script), str(REPO / "train.py")], capture_output=True, text=True,
                        cwd=REPO)
  assert proc.returncode == 143 and "went on" not in proc.stdout, proc.stderr[-3000:]
  assert _errors(proc.stderr) == ["error: stopped at once by SIGTERM; checkpoints already written are intact: run "
                                  "the same command to resume from the newest"], proc.stderr[-3000:]
  assert "Exception ignored" not in proc.stderr


def _mount_namespace_works() -> bool:
  unshare = shutil.which("unshare")
  return bool(unshare) and subprocess.run([unshare, "--user", "--map-root-user", "--mount", "true"],
                                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _mount_namespace_works(), reason="needs `unshare --user --mount` for a small tmpfs")
@pytest.mark.parametrize("background", [False, True], ids=["foreground", "async"])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(trained, tmp_path, background):
  """The run resumes at step 4 on a disk with 64 KiB left (a tmpfs in a private mount namespace);
  its step-6 checkpoint cannot be written. (Written in the background, the failure is said when
  the next save waits for it, after orbax's writer threads print their tracebacks.)"""
  disk, out = tmp_path / "disk", tmp_path / "out"
  disk.mkdir()
  flags = " ".join(f"--config.{k}={v}" for k, v in
                   {**SMALL, "train.steps": 8, "train.async_checkpoints": background}.items())
  script = f"""
    mount -t tmpfs -o size=16m tmpfs {disk}
    cp -r {trained} {disk}/run
    head -c $(( $(df --output=avail -B1 {disk} | tail -1) - 65536 )) /dev/zero > {disk}/filler 2>/dev/null
    {sys.executable} train.py --config=configs/llama_tiny_adamw.py --workdir={disk}/run {flags} 2> {out}.stderr
    echo $? > {out}.rc
    cp -r {disk}/run {out}
  """
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=REPO, env=env,
                 check=True)
  stderr = (tmp_path / "out.stderr").read_text()
  assert (tmp_path / "out.rc").read_text().strip() == "1", stderr[-3000:]
  line = (f"error: cannot write the checkpoint of step 6 in {disk}/run/checkpoints (No space left on device); "
          "nothing partial left, step 4 is intact")
  assert line in stderr, stderr[-3000:]
  if not background:  # (in the background, the storage library's tracebacks may come first, on the same line)
    assert _errors(stderr) == [line] and "Traceback" not in stderr, stderr[-3000:]
  # Nothing partial that a rerun would trip on, and the rerun resumes from step 4, unchanged.
  assert sorted(os.listdir(out / "checkpoints")) == ["2", "4"]
  jax.tree.map(np.testing.assert_array_equal, saved_params(str(out), 4), saved_params(str(trained), 4))
  resumed = train(_config(**{"train.steps": 6}), str(out))
  assert resumed["resumed_from"] == 4 and resumed["steps"] == 6


def _corpus(path, *, bad_line=None, drop_line=None):
  """400 JSON-lines documents; line `bad_line` malformed, or line `drop_line` left out."""
  lines = [json.dumps({"text": f"document {i}: " + "lorem ipsum " * (i % 7 + 3)}) for i in range(400)]
  if bad_line:
    lines[bad_line - 1] = '{"text": "a record cut off mid-write'
  if drop_line:
    del lines[drop_line - 1]
  path.write_text("\n".join(lines) + "\n")
  return path


def _jsonl_config(tmp_path, path, **overrides):
  evals = tmp_path / "eval.jsonl"
  if not evals.exists():
    _corpus(evals)
  return _config(**{"data.source": "jsonl", "data.path": str(path), "data.eval_path": str(evals),
                    "data.tokenizer": "byte", "data.shuffle": False, "optimizer.schedule": "constant",
                    "train.steps": 40, "train.checkpoint_every": 0, **overrides})


def test_a_bad_record_stops_with_a_checkpoint_naming_file_and_line_and_the_fixed_file_resumes_exactly(tmp_path):
  data = _corpus(tmp_path / "train.jsonl", bad_line=41)
  with pytest.raises(ConfigError) as info:
    train(_jsonl_config(tmp_path, data), str(tmp_path / "run"))
  message = str(info.value)
  assert message.startswith(f"config.data.path: {data}:41: ") and "data.on_bad_record=skip" in message, message
  saved = int(message.split("checkpoint saved at step ")[1].split(":")[0])
  assert 0 < saved < 40 and os.listdir(tmp_path / "run" / "checkpoints") == [str(saved)]
  # Fixed, the same command resumes from the batch the record was in, as if it had never been bad.
  _corpus(data)
  resumed = train(_jsonl_config(tmp_path, data), str(tmp_path / "run"))
  assert resumed["resumed_from"] == saved and resumed["steps"] == 40
  train(_jsonl_config(tmp_path, data), str(tmp_path / "straight"))
  jax.tree.map(np.testing.assert_array_equal, saved_params(str(tmp_path / "run")),
               saved_params(str(tmp_path / "straight")))


def test_skipped_bad_records_are_counted_and_the_rest_trains_as_without_them(tmp_path, caplog):
  bad = _corpus(tmp_path / "bad.jsonl", bad_line=41)
  summary = train(_jsonl_config(tmp_path, bad, **{"data.on_bad_record": "skip"}), str(tmp_path / "skip"))
  assert summary["steps"] == 40 and summary["skipped_records"] == 1
  assert sum(r.get("skipped_records", 0) for r in _strict_records(tmp_path / "skip")) == 1
  assert f"skipped a bad record: {bad}:41: " in caplog.text
  train(_jsonl_config(tmp_path, _corpus(tmp_path / "without.jsonl", drop_line=41)), str(tmp_path / "without"))
  jax.tree.map(np.testing.assert_array_equal, saved_params(str(tmp_path / "skip")),
               saved_params(str(tmp_path / "without")))
