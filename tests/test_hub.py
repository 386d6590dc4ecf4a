"""Hub ids for model.init_from and data.tokenizer, read from a Hugging Face cache built by hand (no network)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from lowrank_jax import data as data_lib
from lowrank_jax.train import ConfigError, default_config, hub, resolve, train
from lowrank_jax.train.input import make_tokenizer
from lowrank_jax.train.loop import _leaves
from test_pretrained import llama_weights, write_checkpoint
from train_helpers import saved_params, tiny_config

pytest.importorskip("huggingface_hub")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty Hugging Face cache, offline: every id below is read from it or is an error."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
  return tmp_path / "hf" / "hub"


def cache_repo(cache, repo: str, folder, commit: str = COMMIT, *, uncached: tuple[str, ...] = ()):
  """`folder`'s files as the snapshot `commit` of `repo` (branch main) in huggingface_hub's cache
  layout: models--owner--name/{blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/main}, and the
  repository's file listing (trees/<commit>.json), which also names the `uncached` files: offline,
  the library refuses a snapshot missing a listed file that the download's patterns ask for."""
  root = cache / ("models--" + repo.replace("/", "--"))
  listing = {name: {"size": 1, "blob_id": "0" * 40} for name in (*os.listdir(folder), *uncached)}
  (root / "trees").mkdir(parents=True)
  (root / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
  for name in os.listdir(folder):
    contents = (folder / name).read_bytes()
    blob = root / "blobs" / hashlib.sha256(contents).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(contents)
    link = root / "snapshots" / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
  (root / "refs").mkdir(exist_ok=True)
  (root / "refs" / "main").write_text(commit)
  return str(root / "snapshots" / commit)


def _run_config(**overrides):
  return tiny_config(**{"train.steps": 2, "train.batch_size": 4, "data.seq_len": 32, "train.eval_every": 0,
                        "train.eval_batches": 1, "train.log_every": 1, **overrides})


def test_a_hub_checkpoint_trains_exactly_as_its_local_directory(cache, tmp_path):
  config, weights = llama_weights(vocab=300, layers=1, positions=256)
  local = write_checkpoint(tmp_path / "local", config, weights)
  # The repository also holds files no run reads (PyTorch weights, ONNX, Meta's originals): not fetched.
  snapshot = cache_repo(cache, "tiny-org/tiny-llama", tmp_path / "local", uncached=(
      "pytorch_model.bin", "onnx/model.onnx", "original/consolidated.00.pth", "original/tokenizer.model"))
  local_run = train(_run_config(**{"model.init_from": local}), str(tmp_path / "from_local"))
  hub_run = train(_run_config(**{"model.init_from": "tiny-org/tiny-llama"}), str(tmp_path / "from_hub"))
  # The same weights loaded: the same training, bit for bit.
  assert hub_run["train_loss"] == local_run["train_loss"] and hub_run["eval_loss"] == local_run["eval_loss"]
  got, want = saved_params(str(tmp_path / "from_hub")), saved_params(str(tmp_path / "from_local"))
  assert _leaves(got).keys() == _leaves(want).keys()
  for key, value in _leaves(want).items():
    np.testing.assert_array_equal(_leaves(got)[key], value, err_msg=key)
  # The run says where its weights came from: the id and the commit; that spelling resolves back.
  assert hub_run["model"] == "tiny-org/tiny-llama"
  written = json.loads((tmp_path / "from_hub" / "config.json").read_text())
  assert written["model"]["init_from"] == f"tiny-org/tiny-llama@{COMMIT}"
  again = default_config()
  again.update_from_flattened_dict(_leaves(written))
  assert os.path.realpath(resolve(again).model.init_from) == os.path.realpath(snapshot)


def test_a_hub_tokenizer_gives_the_ids_of_its_local_file(cache, tmp_path):
  import sentencepiece as spm

  text = "the quick brown fox jumps over the lazy dog. " * 40
  (tmp_path / "corpus.txt").write_text(text)
  os.mkdir(tmp_path / "t5")  # a T5-style repository: its SentencePiece model is spiece.model
  spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "t5" / "spiece"),
                                 vocab_size=40, hard_vocab_limit=False, minloglevel=2)
  os.remove(tmp_path / "t5" / "spiece.vocab")
  cache_repo(cache, "tiny-org/t5-tok", tmp_path / "t5")
  run = resolve(_run_config(**{"data.source": "text", "data.path": str(tmp_path / "corpus.txt"),
                               "data.tokenizer": "tiny-org/t5-tok"}))
  sample = "a lazy fox, the brown dog"
  ids = make_tokenizer(run).encode(sample).tolist()
  assert ids == data_lib.make_tokenizer(str(tmp_path / "t5" / "spiece.model")).encode(sample).tolist()
  assert ids == spm.SentencePieceProcessor(model_file=str(tmp_path / "t5" / "spiece.model")).encode(sample)
  assert run.to_dict()["data"]["tokenizer"] == f"tiny-org/t5-tok@{COMMIT}"


@pytest.mark.parametrize("key", ["model.init_from", "data.tokenizer"])
def test_an_uncached_id_offline_is_one_line(cache, tmp_path, capfd, key):
  (tmp_path / "corpus.txt").write_text("some text\n")
  with pytest.raises(ConfigError) as info:
    resolve(_run_config(**{"data.source": "text", "data.path": str(tmp_path / "corpus.txt"), key: "nobody/missing"}))
  message = str(info.value)
  assert info.value.key == key and "\n" not in message
  assert "'nobody/missing'" in message and "HF_HUB_OFFLINE" in message and str(cache) in message
  assert capfd.readouterr().err == ""  # nothing else said (the Hub library's warnings)


def test_a_path_that_is_no_id_is_a_missing_file(cache, tmp_path):
  (tmp_path / "corpus.txt").write_text("some text\n")
  with pytest.raises(ConfigError, match="data.tokenizer: file not found: '/no/such/t5.model'"):
    resolve(_run_config(**{"data.source": "text", "data.path": str(tmp_path / "corpus.txt"),
                           "data.tokenizer": "/no/such/t5.model"}))


def _http_error(kind, status):
  import httpx2

  url = "https://huggingface.co/api/models/owner/name/revision/main"
  return kind("refused", response=httpx2.Response(status, request=httpx2.Request("GET", url)))


@pytest.mark.parametrize("error,words", [
    ("GatedRepoError", ["gated", "https://huggingface.co/owner/name", "hf auth login", "HF_TOKEN"]),
    ("RepositoryNotFoundError", ["no repository", "HF_TOKEN"]),
    ("HfHubHTTPError", ["answered", "HF_TOKEN"]),  # a 401 outside the two above
])
def test_hub_refusals_are_one_line_naming_key_and_id(cache, monkeypatch, error, words):
  import huggingface_hub
  from huggingface_hub import errors

  def refuse(*args, **kwargs):
    raise _http_error(getattr(errors, error), {"GatedRepoError": 403, "RepositoryNotFoundError": 404}.get(error, 401))

  monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
  with pytest.raises(ConfigError) as info:
    hub.resolve("model.init_from", "owner/name", "checkpoint")
  message = str(info.value)
  assert message.startswith("config.model.init_from: ") and "'owner/name'" in message and "\n" not in message
  assert all(word in message for word in words), message
