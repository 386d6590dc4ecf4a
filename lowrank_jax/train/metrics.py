"""Metrics as JSON lines in `<workdir>/metrics.jsonl` (and TensorBoard when installed)."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _tensorboard_writer(logdir: str):
  """A TensorBoard writer if one is importable; metrics.jsonl is always written."""
  try:
    from tensorboardX import SummaryWriter  # type: ignore

    return SummaryWriter(logdir)
  except ImportError:
    pass
  try:
    from torch.utils.tensorboard import SummaryWriter  # type: ignore

    return SummaryWriter(logdir)
  except ImportError:
    return None


class MetricsWriter:
  """Appends one JSON object per record.

  On resume from step s, records after s (written by the interrupted run after
  its last checkpoint) are dropped first, so the file reads as one clean run.
  """

  def __init__(self, workdir: str, *, resume_step: int | None, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    kept: list[str] = []
    if resume_step is not None and os.path.exists(self.path):
      with open(self.path) as f:
        for line in f:
          try:
            if json.loads(line).get("step", 0) <= resume_step:
              kept.append(line if line.endswith("\n") else line + "\n")
          except json.JSONDecodeError:  # a line cut by a kill
            continue
    with open(self.path, "w") as f:
      f.writelines(kept)
    self._file = open(self.path, "a")
    self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in record.items()}}
    # Strict JSON: a NaN or infinity is written as null, and the keys it hit are listed.
    nonfinite = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if nonfinite:
      record = {**{k: None if k in nonfinite else v for k, v in record.items()}, "nonfinite": nonfinite}
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _plain(value: Any) -> Any:
  try:
    return float(value)
  except (TypeError, ValueError):
    return value
