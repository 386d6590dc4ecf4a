"""Data where users keep it: Parquet files in the file sources, and `data.source=hf` (local files
read at random, or a dataset streamed from its shards, a Hub id read from the local cache offline).

Nothing here touches the network: downloads are off and every Hugging Face cache is under tmp_path.
Each reader is checked against an independent one: pyarrow's own read of the files, the JSON-lines
pipeline on the same text, an uninterrupted stream.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil

import jax
import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")

from lowrank_jax import data as D  # noqa: E402
from lowrank_jax.data import hf_source  # noqa: E402
from lowrank_jax.train import ConfigError, resolve, train  # noqa: E402
from lowrank_jax.train import input as input_lib  # noqa: E402
from train_helpers import saved_params, tiny_config  # noqa: E402

WORDS = "the of a model data rank low memory train step grad loss token shard parquet stream".split()


def _documents(n: int, seed: int = 0) -> list[str]:
  """Distinct documents (each names its index) of 3 to 12 words."""
  rng = np.random.default_rng(seed)
  return [f"doc{i} " + " ".join(rng.choice(WORDS, size=rng.integers(3, 13))) for i in range(n)]


TRAIN, VALID = _documents(150), _documents(40, seed=1)
# Batches of 4 x 32 byte tokens per pass over TRAIN (each document and its EOS): about 54.
EPOCH = sum(len(d.encode()) + 1 for d in TRAIN) / (4 * 32)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  """Downloads off, and every Hugging Face cache in tmp_path (the libraries also read these at import)."""
  import datasets
  import huggingface_hub

  for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    monkeypatch.setenv(name, "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
  monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def _parquet(path, docs, row_group_size=16, **columns):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pq.write_table(pa.table({"text": docs, **columns}), path, row_group_size=row_group_size)
  return str(path)


def _jsonl(path, docs):
  with open(path, "w") as f:
    f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
  return str(path)


def _dataset_folder(root, train=TRAIN, valid=VALID, shards=3):
  """A folder laid out as a Hub dataset repository: data/{train,validation}-*.parquet."""
  parts = np.array_split(np.arange(len(train)), shards)
  for k, part in enumerate(parts):
    _parquet(root / "data" / f"train-{k:05d}-of-{shards:05d}.parquet", [train[i] for i in part])
  _parquet(root / "data" / "validation-00000-of-00001.parquet", valid)
  return str(root)


# --- (a) Parquet in the file sources -----------------------------------------------------------

def test_parquet_source_reads_what_pyarrow_reads(tmp_path):
  a = _parquet(tmp_path / "a.parquet", TRAIN[:70], row_group_size=9, id=list(range(70)))
  b = _parquet(tmp_path / "b.parquet", TRAIN[70:], row_group_size=25, id=list(range(70, 150)))
  expected = pq.read_table(a).column("text").to_pylist() + pq.read_table(b).column("text").to_pylist()
  source = D.ParquetSource(str(tmp_path / "*.parquet"), cache_bytes=1)  # a decode per group change
  assert len(source) == 150 and [source[i] for i in range(150)] == expected
  order = np.random.default_rng(0).permutation(150)  # random access across groups and files
  assert [source[int(i)] for i in order] == [expected[i] for i in order]
  assert source[-1] == expected[-1]
  copy = pickle.loads(pickle.dumps(source))  # no open file or cache travels
  assert [copy[i] for i in order[:20]] == [expected[i] for i in order[:20]]

  # Mixed with JSON lines (and text files) in one list, in the order given.
  c = _jsonl(tmp_path / "c.jsonl", VALID)
  assert [D.file_source([c, a], kind="jsonl")[i] for i in range(110)] == VALID + expected[:70]
  text = tmp_path / "d.txt"
  text.write_text("one line\n\nanother\n")
  both = D.file_source([str(text), b], kind="text")
  assert [both[i] for i in range(len(both))] == ["one line", "another"] + expected[70:]


def test_parquet_errors_name_the_column_file_and_row(tmp_path):
  path = _parquet(tmp_path / "p.parquet", ["fine", None, "also fine"], body=["x", "y", "z"])
  with pytest.raises(D.DataError) as info:
    D.ParquetSource(path, text_key="content")
  assert info.value.argument == "text_key" and "'text'" in str(info.value) and "'body'" in str(info.value)
  source = D.ParquetSource(path)
  assert source[0] == "fine"
  with pytest.raises(D.DataFileError, match=r"p\.parquet: row 1: 'text' is null"):
    source[1]
  numbers = tmp_path / "n.parquet"
  pq.write_table(pa.table({"text": [1, 2]}), numbers)
  with pytest.raises(D.DataFileError, match=r"n\.parquet: .*int64"):
    D.ParquetSource(str(numbers))
  # The trainer blames data.text_key, naming the columns found.
  config = tiny_config(**{"data.source": "jsonl", "data.path": path, "data.text_key": "content",
                          "data.tokenizer": "byte"})
  with pytest.raises(ConfigError, match=r"data\.text_key.*'body'"):
    input_lib.token_input(resolve(config), process_index=0, process_count=1)


def test_instructions_from_parquet_equal_those_from_json_lines(tmp_path):
  records = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 3 else f"{i}", "output": f"{2 * i + 1}"}
             for i in range(12)]
  jsonl = tmp_path / "a.jsonl"
  jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
  parquet = tmp_path / "a.parquet"
  pq.write_table(pa.Table.from_pylist(records), parquet, row_group_size=5)
  from_json = D.InstructionSource(str(jsonl))
  from_parquet = D.InstructionSource(str(parquet))
  assert len(from_parquet) == 12 and [from_parquet[i] for i in range(12)] == [from_json[i] for i in range(12)]
  bad = tmp_path / "b.parquet"
  pq.write_table(pa.Table.from_pylist([{"prompt": "x", "answer": "y"}]), bad)
  with pytest.raises(D.DataFileError, match=r"b\.parquet: row 0: the record has no field 'instruction'"):
    D.InstructionSource(str(bad))


# --- (b) data.source=hf, random access: the same batches as jsonl -------------------------------

def _run(**overrides):
  base = {"data.tokenizer": "byte", "data.seq_len": 32, "train.batch_size": 4, "train.eval_batches": 2}
  return resolve(tiny_config(**{**base, **overrides}))


def _batches(inputs, n):
  return [next(inputs.train_iter)["tokens"] for _ in range(n)]


def _jsonl_input(tmp_path, **overrides):
  run = _run(**{"data.source": "jsonl", "data.path": _jsonl(tmp_path / "train.jsonl", TRAIN),
                "data.eval_path": _jsonl(tmp_path / "valid.jsonl", VALID), **overrides})
  return input_lib.token_input(run, process_index=0, process_count=1)


def test_hf_local_parquet_gives_the_batches_of_jsonl(tmp_path):
  """Local files are read at random through the same grain pipeline: with the same text and
  seed, exactly the batches (shuffled, over several epochs) and validation batches of jsonl."""
  folder = _dataset_folder(tmp_path / "ds")
  hf = input_lib.token_input(_run(**{"data.source": "hf", "data.hf.path": folder}), process_index=0,
                             process_count=1)
  assert "next_index" in json.dumps(hf.train_iter.get_state())  # grain's index state, not a stream's
  reference = _jsonl_input(tmp_path)
  n = int(2.5 * EPOCH)  # reshuffled every epoch
  np.testing.assert_array_equal(np.stack(_batches(hf, n)), np.stack(_batches(reference, n)))
  np.testing.assert_array_equal(np.stack([b["tokens"] for b in hf.eval_batches]),
                                np.stack([b["tokens"] for b in reference.eval_batches]))
  # Slices of one split, as datasets spells them, with streaming off.
  sliced = input_lib.token_input(_run(**{"data.source": "hf", "data.hf.path": folder, "data.hf.split": "train[:80%]",
                                         "data.hf.eval_split": "train[80%:]"}), process_index=0, process_count=1)
  assert sliced.description.startswith("hf ")


@pytest.mark.parametrize("streaming", ["false", "true"])
def test_hf_on_json_lines_files_gives_the_batches_of_jsonl(tmp_path, streaming):
  """A list of files is one split, `train`; read at random or streamed (unshuffled: in order)."""
  files = ",".join(_jsonl(tmp_path / f"part{k}.jsonl", TRAIN[k * 50:(k + 1) * 50]) for k in range(3))
  shuffle = streaming == "false"
  hf = input_lib.token_input(_run(**{"data.source": "hf", "data.hf.path": files, "data.hf.eval_split": "train",
                                     "data.hf.streaming": streaming, "data.shuffle": shuffle}),
                             process_index=0, process_count=1)
  reference = _jsonl_input(tmp_path, **{"data.shuffle": shuffle})
  n = int(1.5 * EPOCH)
  np.testing.assert_array_equal(np.stack(_batches(hf, n)), np.stack(_batches(reference, n)))


def test_hf_missing_split_and_column_name_their_keys(tmp_path):
  folder = _dataset_folder(tmp_path / "ds")
  with pytest.raises(ConfigError) as info:
    input_lib.token_input(_run(**{"data.source": "hf", "data.hf.path": folder, "data.hf.eval_split": "test"}),
                          process_index=0, process_count=1)
  assert info.value.key == "data.hf.eval_split" and "'train', 'validation'" in str(info.value)
  for streaming in ("false", "true"):
    with pytest.raises(ConfigError) as info:
      input_lib.token_input(_run(**{"data.source": "hf", "data.hf.path": folder, "data.hf.text_field": "body",
                                    "data.hf.streaming": streaming}), process_index=0, process_count=1)
    assert info.value.key == "data.hf.text_field" and "'text'" in str(info.value), streaming
  with pytest.raises(ConfigError, match=r"data\.hf\.split.*streaming=false"):
    _run(**{"data.source": "hf", "data.hf.path": folder, "data.hf.split": "train[:5]", "data.hf.streaming": "true"})
  with pytest.raises(ConfigError, match=r"data\.hf\.streaming"):
    _run(**{"data.source": "hf", "data.hf.path": folder, "data.hf.streaming": "sometimes"})


# --- (c) streaming: exact resume ------------------------------------------------------------------

def _stream_run(folder, **overrides):
  return _run(**{"data.source": "hf", "data.hf.path": folder, "data.hf.streaming": "true",
                 "data.hf.shuffle_buffer": 7, **overrides})


def test_streamed_epoch_holds_every_document_once_in_a_new_order(tmp_path):
  stream = hf_source.TextStream(hf_source.open_stream(_dataset_folder(tmp_path / "ds")), seed=3, shuffle_buffer=7)
  docs = iter(stream)
  first, second = [next(docs) for _ in TRAIN], [next(docs) for _ in TRAIN]
  assert sorted(first) == sorted(TRAIN) == sorted(second)
  assert first != TRAIN and second != first  # shuffled, and differently every epoch


def test_streaming_resumes_exactly(tmp_path):
  """k batches, the state through JSON (as the checkpoint keeps it), a fresh iterator restored:
  the next batches are the uninterrupted run's, mid-block, at block ends and across epochs."""
  run = _stream_run(_dataset_folder(tmp_path / "ds"))
  fresh = lambda: input_lib.token_input(run, process_index=0, process_count=1).train_iter  # noqa: E731
  straight = fresh()
  total = int(2.5 * EPOCH)
  expected = [next(straight)["tokens"] for _ in range(total)]
  for k in (0, 1, 9, 26, 27, int(EPOCH), int(EPOCH) + 1, int(2 * EPOCH)):
    interrupted = fresh()
    for _ in range(k):
      next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))
    resumed = fresh()
    resumed.set_state(state)
    for j in range(k, min(k + 12, total)):
      np.testing.assert_array_equal(next(resumed)["tokens"], expected[j], err_msg=f"resumed after {k}, batch {j}")


def test_streaming_without_shuffle_is_jsonl_in_order(tmp_path):
  """An independent check of the stream's reading and packing: unshuffled, it is the jsonl
  pipeline unshuffled (files in order, epoch after epoch), batch for batch."""
  run = _stream_run(_dataset_folder(tmp_path / "ds"), **{"data.shuffle": False})
  streamed = input_lib.token_input(run, process_index=0, process_count=1)
  reference = _jsonl_input(tmp_path, **{"data.shuffle": False})
  n = int(2.5 * EPOCH)
  np.testing.assert_array_equal(np.stack(_batches(streamed, n)), np.stack(_batches(reference, n)))
  np.testing.assert_array_equal(np.stack([b["tokens"] for b in streamed.eval_batches]),
                                np.stack([b["tokens"] for b in reference.eval_batches]))


# --- (d) a Hub id, offline, from the huggingface_hub cache ---------------------------------------

README = """---
configs:
- config_name: en
  data_files:
  - split: train
    path: en/train-*.parquet
  - split: validation
    path: en/validation-*.parquet
---
A fake dataset repository for tests.
"""


def _hub_cache(tmp_path, repo_id: str) -> str:
  """`repo_id` as huggingface_hub keeps a downloaded dataset: blobs named by content hash,
  refs/main naming the commit, snapshots/<commit>/<path> linking to the blobs."""
  source = tmp_path / "repo"
  (source / "en").mkdir(parents=True)
  (source / "README.md").write_text(README)
  for k, part in enumerate(np.array_split(np.arange(len(TRAIN)), 2)):
    _parquet(source / "en" / f"train-{k:05d}-of-00002.parquet", [TRAIN[i] for i in part])
  _parquet(source / "en" / "validation-00000-of-00001.parquet", VALID)
  storage = tmp_path / "hf_home" / "hub" / ("datasets--" + repo_id.replace("/", "--"))
  commit = hashlib.sha1(repo_id.encode()).hexdigest()
  (storage / "refs").mkdir(parents=True)
  (storage / "refs" / "main").write_text(commit)
  (storage / "blobs").mkdir()
  for path in sorted(p for p in source.rglob("*") if p.is_file()):
    blob = storage / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
    shutil.copyfile(path, blob)
    link = storage / "snapshots" / commit / path.relative_to(source)
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(blob, link.parent), link)
  shutil.rmtree(source)
  return commit


def test_hub_id_streams_offline_from_the_cache(tmp_path):
  _hub_cache(tmp_path, "fake-org/tiny-c4")
  run = _run(**{"data.source": "hf", "data.hf.path": "fake-org/tiny-c4", "data.hf.name": "en",
                "data.shuffle": False})
  assert run.data.hf.streams  # a Hub id streams by default
  hub = input_lib.token_input(run, process_index=0, process_count=1)
  reference = _jsonl_input(tmp_path, **{"data.shuffle": False})
  n = int(2.5 * EPOCH)
  np.testing.assert_array_equal(np.stack(_batches(hub, n)), np.stack(_batches(reference, n)))
  np.testing.assert_array_equal(np.stack([b["tokens"] for b in hub.eval_batches]),
                                np.stack([b["tokens"] for b in reference.eval_batches]))


def test_hub_id_not_cached_is_one_error_naming_the_key_id_and_offline(tmp_path):
  run = _run(**{"data.source": "hf", "data.hf.path": "fake-org/never-downloaded"})
  with pytest.raises(ConfigError) as info:
    input_lib.token_input(run, process_index=0, process_count=1)
  message = str(info.value)
  assert info.value.key == "data.hf.path" and "\n" not in message
  assert "'fake-org/never-downloaded'" in message and "HF_HUB_OFFLINE=1" in message


# --- (e) per-process shares ------------------------------------------------------------------------

@pytest.mark.parametrize("processes", [2, 4])  # 3 shards: by shard for 2, by example for 4
def test_streamed_shares_are_disjoint_and_cover_the_data(tmp_path, processes):
  dataset = hf_source.open_stream(_dataset_folder(tmp_path / "ds"))
  shares = []
  for p in range(processes):
    stream = hf_source.TextStream(dataset, seed=1, shuffle_buffer=4, process_index=p, process_count=processes,
                                  epochs=1)
    shares.append(list(stream))
  assert all(shares) and sorted(d for share in shares for d in share) == sorted(TRAIN)


# --- the trainer --------------------------------------------------------------------------------

def test_trainer_on_hf_streams_and_resumes_bit_for_bit(tmp_path):
  """A tiny model on streamed local Parquet: killed after the step-2 checkpoint (its step-4 one
  deleted) and resumed, it ends with the parameters and metrics of the run that went straight on."""
  config = tiny_config(**{"data.source": "hf", "data.hf.path": _dataset_folder(tmp_path / "ds"),
                          "data.hf.streaming": "true", "data.hf.shuffle_buffer": 5, "data.tokenizer": "byte",
                          "data.seq_len": 32, "train.batch_size": 4, "train.steps": 4, "train.checkpoint_every": 2,
                          "train.log_every": 1, "train.eval_every": 0, "train.eval_batches": 1})
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  train(config, str(straight))
  shutil.copytree(straight, resumed)
  shutil.rmtree(resumed / "checkpoints" / "4")
  assert train(config, str(resumed))["resumed_from"] == 2
  jax.tree.map(np.testing.assert_array_equal, saved_params(str(straight)), saved_params(str(resumed)))
  records = lambda w: [{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "step_time_s")}  # noqa: E731
                       for line in open(w / "metrics.jsonl")]
  assert records(resumed) == records(straight)
  with open(straight / "checkpoints" / "4" / "data" / "metadata") as f:
    assert "shard" in f.read()  # the stream's position is what the checkpoint holds
