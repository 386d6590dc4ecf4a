"""Metrics: JSON lines in `<workdir>/metrics.jsonl`, always; TensorBoard and Weights & Biases on request.

`train.log_to` names the trackers (`trackers` checks it while the settings are read, so a missing
package is one error before anything compiles). Every tracker gets the same numbers as
metrics.jsonl at the same steps; only process 0 writes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import secrets
from typing import Any

from lowrank_jax.train.errors import ConfigError

# train.log_to's names and the package each needs (metrics.jsonl needs none and is always written).
TRACKERS = {"jsonl": None, "tensorboard": "tensorboardX", "wandb": "wandb"}
WANDB_ID_FILE = "wandb_run_id"  # in the workdir: a resumed run continues the same wandb run


def trackers(key: str, spec: Any) -> str:
  """A settings check: a comma list of `TRACKERS`, each one's package importable."""
  for name in _names(spec) if isinstance(spec, str) else [spec]:
    if name not in TRACKERS:
      raise ConfigError(key, f"unknown tracker {name!r} in {spec!r} (a comma list)", list(TRACKERS))
    package = TRACKERS[name]
    if package and importlib.util.find_spec(package) is None:
      raise ConfigError(key, f"{name!r} needs the {package} package: pip install 'lowrank-jax[tracking]'")
  return spec


def _names(spec: str) -> list[str]:
  return [name.strip() for name in spec.split(",") if name.strip()]


class MetricsWriter:
  """Appends one JSON object per record, and hands its numbers to the trackers `run.train.log_to` names.

  On resume from step s, records after s (written by the interrupted run after its last
  checkpoint) are dropped first, so the file reads as one clean run. `run` None: metrics.jsonl only.
  """

  def __init__(self, workdir: str, *, resume_step: int | None, enabled: bool = True, run: Any = None):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = self._wandb = None
    self._wandb_from = 0  # the first step wandb takes (a resumed wandb run goes on from its last)
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
    names = _names(trackers("train.log_to", run.train.log_to)) if run is not None else []
    if "tensorboard" in names:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if "wandb" in names:
      self._wandb = _start_wandb(workdir, run, resumed=resume_step is not None)
      self._wandb_from = self._wandb.step

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
    scalars = {k: v for k, v in record.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, step)
      self._tb.flush()  # as metrics.jsonl: a killed run keeps what it logged
    # A resumed run logs again the steps its interrupted run logged after the last checkpoint
    # (the same numbers: resuming is exact); wandb keeps the first and takes steps from its last on.
    if self._wandb is not None and step >= self._wandb_from:
      self._wandb.log(scalars, step=step)

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def _start_wandb(workdir: str, run: Any, *, resumed: bool):
  """A wandb run, the same one (its id kept in the workdir) when this run resumes.

  WANDB_MODE=offline works without an account (`wandb sync` uploads later); the run's files go to
  WANDB_DIR, else the workdir.
  """
  import wandb

  id_file = os.path.join(workdir, WANDB_ID_FILE)
  run_id = None
  if resumed and os.path.exists(id_file):
    with open(id_file) as f:
      run_id = f.read().strip() or None
  if run_id is None:
    run_id = secrets.token_hex(8)
    with open(id_file, "w") as f:
      f.write(run_id + "\n")
  name = run.train.run_name or os.path.basename(os.path.normpath(workdir))
  try:
    return wandb.init(project=run.train.wandb_project, name=name, id=run_id, resume="allow",
                      config=run.to_dict(), dir=os.environ.get("WANDB_DIR") or workdir)
  except wandb.Error as e:  # most often: no account logged in
    raise ConfigError("train.log_to", f"wandb could not start a run ({str(e).strip().splitlines()[0]}); log in "
                      "with `wandb login` or set WANDB_API_KEY, or run with WANDB_MODE=offline") from None


def _plain(value: Any) -> Any:
  try:
    return float(value)
  except (TypeError, ValueError):
    return value
