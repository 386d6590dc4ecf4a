"""Train a language model with one of lowrank-jax's methods.

  python train.py --config configs/llama_tiny_adamw.py
  python train.py --config configs/llama_60m_adamw.py --config.optimizer.lr=3e-3 --workdir runs/60m
  python train.py --config configs/llama_130m_adamw.py --memory_report

Re-running the same command on a workdir that holds a checkpoint resumes it.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file; override keys with --config.KEY=VALUE.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics.jsonl and summary.json go here "
                               "(default: runs/<config file name>).")
_MEMORY_REPORT = flags.DEFINE_bool("memory_report", False, "Compile the train step on abstract shapes, print "
                                   "its per-device memory and exit; trains nothing, allocates nothing.")
flags.mark_flag_as_required("config")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:  # orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  from lowrank_jax.train import ConfigError, format_report, memory_report, train
  from lowrank_jax.train.parallel import initialize_distributed

  initialize_distributed()  # a no-op unless launched as a multi-host job

  config = _CONFIG.value
  try:
    if _MEMORY_REPORT.value:
      print(format_report(memory_report(config)), flush=True)
      return 0
    name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
    train(config, _WORKDIR.value or os.path.join("runs", name))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
