"""The memory report: compile the real train step on abstract shapes and read its memory.

Nothing is allocated: the model and optimizer state are `jax.ShapeDtypeStruct`s,
so a 7B configuration can be measured on a laptop CPU. The numbers are XLA's
own accounting of the compiled program for one device: its arguments (params,
optimizer state, batch), outputs, the bytes aliased between the two by buffer
donation, and the temporaries (activations saved for backward, gradients, ...).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections

from lowrank_jax.train import parallel
from lowrank_jax.train.config import validate
from lowrank_jax.train.setup import build_setup, model_summary, vocab_size_of

REPORT_KEYS = ("params_bytes", "opt_state_bytes", "argument_bytes", "temp_bytes", "output_bytes",
               "alias_bytes", "peak_bytes")


def memory_report(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Per-device bytes of the compiled train step for `config` (keys: REPORT_KEYS, and more)."""
  validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
  setup = build_setup(config, vocab_size_of(config))
  state = setup.abstract_state
  compiled = setup.compiled_step.lower(state, setup.abstract_tokens()).compile()
  stats = compiled.memory_analysis()
  argument, output = stats.argument_size_in_bytes, stats.output_size_in_bytes
  alias, temp = stats.alias_size_in_bytes, stats.temp_size_in_bytes
  # Live arguments + temporaries + the outputs that do not reuse donated argument
  # buffers. GPU backends report their own heap-simulated peak, which is tighter;
  # XLA:CPU's `peak_memory_in_bytes` leaves temporaries out, so it is not used there.
  peak = argument + temp + output - alias
  reported = getattr(stats, "peak_memory_in_bytes", 0)
  if reported and jax.devices()[0].platform != "cpu":
    peak = reported
  return {
      "model": model_summary(setup),
      "method": config.optimizer.name,
      "devices": jax.device_count(),
      "parallel": parallel.describe(config.parallel),
      "batch_tokens": list(setup.tokens_shape),
      "params_bytes": parallel.bytes_per_device(state.params),
      "opt_state_bytes": parallel.bytes_per_device(state.opt_state),
      "argument_bytes": argument,
      "temp_bytes": temp,
      "output_bytes": output,
      "alias_bytes": alias,
      "peak_bytes": peak,
  }


def format_report(report: dict[str, Any]) -> str:
  rows = [
      ("parameters", report["params_bytes"]),
      ("optimizer state", report["opt_state_bytes"]),
      ("step arguments", report["argument_bytes"]),
      ("step temporaries", report["temp_bytes"]),
      ("step outputs", report["output_bytes"]),
      ("aliased (donated)", report["alias_bytes"]),
      ("peak", report["peak_bytes"]),
  ]
  a, m, t = report["batch_tokens"]
  lines = [
      f"memory report: {report['model']}",
      f"  method {report['method']}; per-step batch {a} x {m} x {t} tokens",
      f"  per device of {report['devices']} ({report['parallel']})",
  ]
  for name, value in rows:
    lines.append(f"  {name:<18} {value / 2**20:>12,.1f} MiB  {value:>16,d} B")
  lines.append(json.dumps({k: report[k] for k in REPORT_KEYS}))
  return "\n".join(lines)
