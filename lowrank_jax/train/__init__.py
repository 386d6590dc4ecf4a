"""The trainer: config -> model + optimizer (method registry) -> jit step -> loop.

The only package that reads configs. `train.py` at the repository root is a thin CLI.
"""

from lowrank_jax.train.config import validate
from lowrank_jax.train.errors import ConfigError
from lowrank_jax.train.loop import evaluate, format_summary, train
from lowrank_jax.train.memory import REPORT_KEYS, format_report, memory_report
from lowrank_jax.train.methods import Method, get_method, method_names, register_method
from lowrank_jax.train.optimizer import build_optimizer, make_schedule

__all__ = [
    "ConfigError", "Method", "REPORT_KEYS", "build_optimizer", "evaluate", "format_report", "format_summary",
    "get_method", "make_schedule", "memory_report", "method_names", "register_method", "train", "validate",
]
