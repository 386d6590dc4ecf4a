"""Train a language model with one of lowrank-jax's methods.

  python train.py --config configs/llama_tiny_adamw.py
  python train.py --config configs/llama_60m_adamw.py --config.optimizer.lr=3e-3 --workdir runs/60m
  python train.py --config configs/llama_130m_adamw.py --memory_report

Re-running the same command on a workdir that holds a checkpoint resumes it.
"""

from __future__ import annotations

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file; override keys with --config.KEY=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and summary.json go here "
                               "(default: runs/<config file name>).")
_MEMORY_REPORT = flags.DEFINE_bool("memory_report", False, "Compile the train step on abstract shapes, print "
                                   "its per-device memory and exit; trains nothing, allocates nothing.")
_MEMORY_TARGET = flags.DEFINE_string("memory_target", "cpu", "With --memory_report: the accelerator to compile for: "
                                     "cpu, tpu-v5e, tpu-v5p, tpu-v6e (compiled ahead of time on this host; needs "
                                     "pip install -e '.[aot]') or gpu (also runs one real step).")
_MEMORY_DEVICES = flags.DEFINE_integer("memory_devices", 0, "With --memory_report: devices the run is spread "
                                       "over (default: this host's device count).")
_RESTART = flags.DEFINE_bool("restart", False, "Start over (from step 0) in a workdir that has metrics but no "
                             "readable checkpoint; the old metrics.jsonl is kept beside the new one.")
_MEMORY_PROGRAMS = flags.DEFINE_list("memory_programs", None, "With --memory_report: which programs to compile "
                                     "(step, refresh; default: every program the run executes).")
_FIT = flags.DEFINE_string("fit", None, "Find the cheapest settings under which the run fits TARGET and check "
                           "them with the compiler: a memory target (cpu, tpu-v5e, tpu-v5p, tpu-v6e, gpu) or a "
                           "capacity such as 24GiB (predicted only). Settings given as --config.KEY=VALUE stay "
                           "as given; the tokens per step always do. Trains nothing.")
_FIT_HEADROOM = flags.DEFINE_float("fit_headroom", 0.05, "With --fit: the fraction of the capacity left free.")
_FIT_WRITE = flags.DEFINE_string("fit_write", None, "With --fit: write a config file that loads --config and sets "
                                 "the chosen settings (a new file; an existing one is never replaced).")
_FIT_COMPILES = flags.DEFINE_integer("fit_compiles", 4, "With --fit: at most this many compiles (calibrations at a "
                                     "small depth and full-depth verifications).")
flags.mark_flag_as_required("config")

# Per-layer linear kinds are a dict the config starts empty, which --config.KEY overrides cannot
# add to; these flags are taken out before parsing and set afterwards.
_LINEAR_FLAG = "--config.model.linear."


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, every failure said in one line (exit 2) instead of a traceback."""
  linear = [a for a in argv[1:] if a.startswith(_LINEAR_FLAG)]
  argv = [a for a in argv if a not in linear]
  sys.argv = [a for a in sys.argv if a not in linear]  # config_flags reads its overrides from sys.argv
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:  # unknown flag, bad value, no --config, a config file that does not load
    _fail(" ".join(str(e).split()))
  except Exception as e:  # noqa: BLE001 -- the config file or an override: unknown key, missing file
    _fail(_config_flag_error(e))
  try:
    _CONFIG.value.keys()  # a config file that failed to load raises only when first read
  except Exception as e:  # noqa: BLE001
    reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    _fail(f"--config {flags.FLAGS['config'].config_filename}: cannot load it ({reason})")
  for arg in linear:
    name, _, kind = arg[len(_LINEAR_FLAG):].partition("=")
    if not name or "." in name or not kind:
      _fail(f"config.model.linear: expected --config.model.linear.LAYER=KIND, got {arg!r}")
    with _CONFIG.value.unlocked():  # (the key is checked with the rest when the config is resolved)
      _CONFIG.value.model.linear[name] = kind
  return rest


def _config_flag_error(e: Exception) -> str:
  """The config file's loading or an override's failure, in one line naming the key or file."""
  raw = str(e).replace("\\n", " ").replace("\\", "")
  text = " ".join(raw.split()).strip("'\" ")
  if "get_config" in raw:
    return f"--config {_config_path()}: the file defines no get_config() returning the config"
  if isinstance(e, (AttributeError, KeyError)):
    keys = [a.split("=")[0][2:] for a in sys.argv[1:] if a.startswith("--config.")]
    named = [k for k in keys if any(f"'{part}'" in raw for part in k.split(".")[1:])]
    hint = raw[raw.find("Did you mean"):].strip("'\" ") if "Did you mean" in raw else ""
    return f"{', '.join(named or keys) or 'config'}: no such key{f' ({hint})' if hint else ''}; see configs/base.py"
  if isinstance(e, (OSError, ImportError, SyntaxError)):
    return f"--config {_config_path()}: cannot load it ({type(e).__name__}: {text})"
  return f"--config: {type(e).__name__}: {text}"


def _one_line(error: Exception) -> str:
  """A message that spans lines (a how-to with commands) joined into the one line a user gets."""
  return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _config_path() -> str:
  """The --config file named on the command line (for messages about it)."""
  for i, arg in enumerate(sys.argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(sys.argv):
      return sys.argv[i + 1]
  return "?"


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected argument(s) {' '.join(argv[1:])!r}: every setting is a flag (--config.KEY=VALUE)")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  from lowrank_jax.train import ConfigError, format_report, memory_report, resolve, train
  from lowrank_jax.train.errors import TrainingStopped
  from lowrank_jax.train.parallel import initialize_distributed
  from lowrank_jax.train.targets import TargetError

  if _MEMORY_REPORT.value:
    try:
      report = memory_report(_CONFIG.value, _MEMORY_TARGET.value, _MEMORY_DEVICES.value or None,
                             only=tuple(_MEMORY_PROGRAMS.value) if _MEMORY_PROGRAMS.value else None,
                             log=lambda line: print(line, file=sys.stderr, flush=True))
    except (ConfigError, TargetError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    print(format_report(report), flush=True)
    return 0

  if _FIT.value:
    return _fit()

  initialize_distributed()  # a no-op unless launched as a multi-host job

  try:
    run = resolve(_CONFIG.value)  # the one place the ConfigDict is read: typed and checked from here on
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    summary = train(run, _WORKDIR.value or os.path.join("runs", name), restart=_RESTART.value)
  except ConfigError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  except TrainingStopped as e:  # diverged, unwritable workdir, no checkpoint to resume: one line each
    print(f"error: {_one_line(e)}", file=sys.stderr, flush=True)
    if e.exit_code == 1:  # a failed checkpoint write: orbax's writer threads would report it again at exit
      os._exit(1)
    return e.exit_code
  except Exception as e:  # noqa: BLE001
    import jax

    if jax.process_count() == 1:
      raise
    _exit_multiprocess(e)
  if summary.get("stopped_early"):  # by a stop signal, after saving: the shell's code for it (Ctrl-C 130, SIGTERM 143)
    return 128 + signal.Signals[summary["stop_signal"]]
  return 0


def _command_overrides() -> dict[str, object]:
  """The --config.KEY=VALUE settings of the command line, as the loaded config holds them."""
  config, out = _CONFIG.value, {}
  for arg in sys.argv[1:]:
    if arg.startswith("--config.") and "=" in arg:
      key = arg[len("--config."):].split("=", 1)[0]
      node = config
      for part in key.split("."):
        node = node[part]
      out[key] = node
  return out


def _fit() -> int:
  """--fit: the planner's table, the command to run its choice, and --fit_write's config file."""
  from lowrank_jax.train import ConfigError
  from lowrank_jax.train.fit import FitError, Planner, format_plan, write_config
  from lowrank_jax.train.targets import TargetError

  pinned = _command_overrides()
  if _FIT_WRITE.value and os.path.exists(_FIT_WRITE.value):
    _fail(f"--fit_write: {_FIT_WRITE.value} exists; choose a new file")
  try:
    planner = Planner(_CONFIG.value, _FIT.value, devices=_MEMORY_DEVICES.value or 1, pinned=set(pinned),
                      headroom=_FIT_HEADROOM.value, max_compiles=_FIT_COMPILES.value,
                      programs=tuple(_MEMORY_PROGRAMS.value) if _MEMORY_PROGRAMS.value else None,
                      log=lambda line: print(line, flush=True))
    answer = planner.plan()
  except (ConfigError, TargetError, FitError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  command = " ".join(["python train.py --config", _config_path(), *(a for a in sys.argv[1:] if a.startswith("--config."))])
  print(format_plan(answer, command), flush=True)
  if _FIT_WRITE.value and answer["fits"]:
    write_config(_FIT_WRITE.value, _config_path(), answer["overrides"], pinned)
    print(f"wrote {_FIT_WRITE.value}: python train.py --config {_FIT_WRITE.value}", flush=True)
  return 0 if answer["fits"] else 1


def _exit_multiprocess(error: Exception) -> None:
  """One process of several failed: most often a collective whose peer is gone. Name the lost
  process in one line (or show the traceback when no peer is lost), and exit now: the normal exit
  waits at the coordination service's shutdown barrier for the dead peer, then aborts with pages
  of logs."""
  import traceback

  from lowrank_jax.train.liveness import exit_lost, lost_processes

  if lost := lost_processes():
    exit_lost(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__, lost)
  traceback.print_exc()
  sys.stderr.flush()
  os._exit(1)


def _stopped_at_once(name: str, code: int):
  print(f"\nerror: stopped at once by {name}; checkpoints already written are intact: run the same command to "
        "resume from the newest", file=sys.stderr, flush=True)
  _leaving()
  os._exit(code)  # at once: not waiting on orbax's writer threads (a half-written step is never read back)


def _stop_at_once(signum, frame):
  # Said and done in the handler itself: an exception raised here is lost when the handler runs
  # inside a garbage-collection callback ("Exception ignored in"), and the run went on.
  from lowrank_jax.train.errors import signal_name

  _stopped_at_once(signal_name(signum), 128 + signum)


def _main_or_interrupted(argv):
  # Until training starts (and again after it), a stop signal stops at once; the trainer's loop
  # takes them over meanwhile: the first saves and stops after the step in flight.
  for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
    signal.signal(signum, _stop_at_once)
  try:
    code = main(argv)
  except KeyboardInterrupt as e:  # the loop's StopSignal (a second signal while training)
    _stopped_at_once(getattr(e, "name", "Ctrl-C"), getattr(e, "exit_code", 130))
  if code == 0 or code >= 128:  # finished, or stopped by a signal after saving
    _leaving()
  sys.exit(code)


def _leaving() -> None:
  """Tell the other processes of a multi-process run that this one leaves on purpose: its silence
  is not a loss (`lowrank_jax.train.liveness`, loaded only when the run joined others)."""
  liveness = sys.modules.get("lowrank_jax.train.liveness")
  if liveness is not None:
    liveness.mark_done()


if __name__ == "__main__":
  app.run(_main_or_interrupted, flags_parser=_parse_flags)
