"""train.log_to: TensorBoard and Weights & Biases get exactly metrics.jsonl's numbers, read back from their files."""

from __future__ import annotations

import glob
import json
import os
import struct

import numpy as np
import pytest

from lowrank_jax.train import ConfigError, metrics, resolve, train
from train_helpers import tiny_config


def _config(**overrides):
  return tiny_config(**{"train.steps": 4, "train.batch_size": 4, "data.seq_len": 32, "train.log_every": 2,
                        "train.eval_every": 2, "train.eval_batches": 1, "train.checkpoint_every": 2, **overrides})


def jsonl_scalars(workdir) -> list[tuple[int, str, float]]:
  """(step, key, value) of every number in metrics.jsonl, in order."""
  out = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    out += [(record["step"], k, v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
  return out


def _tfrecords(path: str):
  """The payloads of a TFRecord file: u64 length, u32 CRC, payload, u32 CRC each."""
  with open(path, "rb") as f:
    contents = f.read()
  pos = 0
  while pos < len(contents):
    (length,) = struct.unpack("<Q", contents[pos:pos + 8])
    yield contents[pos + 12:pos + 12 + length]
    pos += 12 + length + 4


def tensorboard_scalars(logdir) -> list[tuple[int, str, float]]:
  from tensorboardX.proto import event_pb2

  out = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    for payload in _tfrecords(path):
      event = event_pb2.Event.FromString(payload)
      out += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
  return out


def _wandb_records(path: str):
  """The protobuf records of an offline run's .wandb file: a 7-byte header (':W&B', magic, version),
  then LevelDB-log blocks of 32 KiB holding records (u32 CRC, u16 length, u8 type: full, first,
  middle, last), as wandb's own (former) datastore reader reads them."""
  from wandb.proto import wandb_internal_pb2

  with open(path, "rb") as f:
    contents = f.read()
  assert contents[:4] == b":W&B"
  pos, pieces = 7, b""
  while pos + 7 <= len(contents):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", contents[pos:pos + 7])
    piece, pos = contents[pos + 7:pos + 7 + length], pos + 7 + length
    pieces = piece if kind in (1, 2) else pieces + piece
    if kind in (1, 4):
      yield wandb_internal_pb2.Record.FromString(pieces)


def wandb_run(run_dir: str) -> tuple[str, dict, dict[tuple[int, str], float]]:
  """(run id, config, {(step, key): value} of the logged history) of one offline run directory."""
  run_id, config, history = None, {}, {}
  for record in _wandb_records(glob.glob(os.path.join(run_dir, "run-*.wandb"))[0]):
    kind = record.WhichOneof("record_type")
    if kind == "run":
      run_id = record.run.run_id
      config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
    elif kind == "history":
      items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
      history.update({(record.history.step.num, k): v for k, v in items.items() if not k.startswith("_")})
  return run_id, config, history


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
  pytest.importorskip("tensorboardX")
  train(_config(**{"train.log_to": "jsonl,tensorboard"}), str(tmp_path))
  want = jsonl_scalars(tmp_path)
  assert {k for _, k, _ in want} >= {"loss", "eval_loss", "tokens_per_s"}
  # TensorBoard keeps float32 (simple_value): the same numbers, rounded once.
  assert tensorboard_scalars(tmp_path / "tensorboard") == [(s, k, np.float32(v)) for s, k, v in want]


def test_wandb_offline_history_equals_metrics_jsonl_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
  pytest.importorskip("wandb")
  for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
    monkeypatch.setenv(name, str(tmp_path / "wandb_files"))
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_SILENT", "true")
  workdir = tmp_path / "run"
  train(_config(**{"train.log_to": "wandb"}), str(workdir))
  train(_config(**{"train.log_to": "wandb", "train.steps": 6}), str(workdir))  # resumes at step 4
  runs = [wandb_run(d) for d in sorted(glob.glob(str(tmp_path / "wandb_files" / "wandb" / "offline-run-*")))]
  assert len(runs) == 2
  kept = (workdir / metrics.WANDB_ID_FILE).read_text().strip()
  assert [run_id for run_id, _, _ in runs] == [kept, kept]  # one wandb run, continued
  assert runs[0][1]["train"]["log_to"] == "wandb" and runs[1][1]["train"]["steps"] == 6  # the run's config
  history = {**runs[0][2], **runs[1][2]}
  assert history == {(s, k): v for s, k, v in jsonl_scalars(workdir)}
  assert max(s for s, _ in history) == 6
  assert not (workdir / "tensorboard").exists()  # only what train.log_to names


def test_a_tracker_without_its_package_is_one_error_before_compiling(monkeypatch):
  with pytest.raises(ConfigError) as info:
    resolve(tiny_config(**{"train.log_to": "jsonl,mlflow"}))
  assert info.value.key == "train.log_to" and "'mlflow'" in str(info.value)
  monkeypatch.setitem(metrics.TRACKERS, "wandb", "wandb_is_not_installed")
  with pytest.raises(ConfigError) as info:
    resolve(tiny_config(**{"train.log_to": "jsonl, wandb"}))
  assert info.value.key == "train.log_to" and "pip install 'lowrank-jax[tracking]'" in str(info.value)
