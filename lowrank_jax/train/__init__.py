"""The trainer: config -> model + optimizer (method registry) -> jit step -> loop.

The only package that reads configs: `resolve` turns the command line's ConfigDict into
a typed, checked `RunConfig` once, and everything else takes that. `train.py` at the
repository root is a thin CLI. Where a new method, config key or data source goes:
CONTRIBUTING.md.

`lowrank_jax.train.collectives` is a diagnostic: what a compiled step communicates,
read from its optimized HLO (used by the LTE device tests and bench/bench_mhlora.py).
"""

from lowrank_jax.train.config import RunConfig, default_config, resolve, validate
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.loop import evaluate, format_summary, train
from lowrank_jax.train.memory import REPORT_KEYS, format_report, memory_report
from lowrank_jax.train.methods import Method, get_method, method_names, register
from lowrank_jax.train.optimizer import build_optimizer, make_schedule

__all__ = [
    "ConfigError", "Method", "REPORT_KEYS", "RunConfig", "build_optimizer", "default_config", "evaluate",
    "format_report", "format_summary", "get_method", "make_schedule", "memory_report", "method_names", "register",
    "resolve", "train", "validate",
]
