"""Bad data files get a message naming the file and line (or the argument at fault)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from lowrank_jax import data as D
from lowrank_jax.data import samples, text_files
from lowrank_jax.data.errors import DataError, DataFileError


def _records(n: int) -> str:
  return "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(n))


def _error(source, index: int) -> DataFileError:
  with pytest.raises(DataFileError) as info:
    source[index]
  return info.value


def test_malformed_jsonl_record_names_file_and_line(tmp_path):
  path = tmp_path / "d.jsonl"
  # Blank lines are skipped by the index but still count as lines in an editor.
  path.write_text(_records(3) + "\n\n" + '{"text": "cut\n' + _records(2) + '{"text": 17}\n[1, 2]\n{"body": "x"}\n')
  source = D.JsonlSource(str(path))
  assert source[2] == "document 2"
  bad_json, not_string, not_object, no_key = (_error(source, i) for i in (3, 6, 7, 8))
  assert str(bad_json).startswith(f"{path}:6: not valid JSON") and bad_json.line == 6
  assert str(not_string).startswith(f"{path}:9: 'text' is 17, not a string")
  assert str(not_object).startswith(f"{path}:10: a JSON list")
  assert str(no_key).startswith(f"{path}:11: the record has no key 'text'") and "'body'" in str(no_key)
  assert isinstance(bad_json, ValueError)  # callers catching ValueError keep working


def test_text_not_utf8_names_file_and_line(tmp_path):
  path = tmp_path / "d.txt"
  path.write_bytes(b"first\n\nsecond\ncaf\xe9\n")
  source = D.TextSource(str(path))
  assert str(_error(source, 2)).startswith(f"{path}:4: not UTF-8 text")


@pytest.mark.parametrize("kind", ["text", "jsonl"])
def test_binary_file_is_refused_when_the_source_is_built(tmp_path, kind):
  path = tmp_path / "model.bin"
  path.write_bytes(b"header line\n" + bytes(range(256)) * 8)
  with pytest.raises(DataFileError, match="binary") as info:
    (D.TextSource if kind == "text" else D.JsonlSource)(str(path))
  assert str(info.value).startswith(f"{path}:2:")


def test_first_text_line_is_read_when_the_source_is_built(tmp_path):
  path = tmp_path / "latin1.txt"
  path.write_bytes("café\n".encode("latin-1"))
  with pytest.raises(DataFileError, match=f"{path}:1: not UTF-8"):
    D.TextSource(str(path))


def test_line_number_counts_across_scan_chunks(tmp_path, monkeypatch):
  monkeypatch.setattr(text_files, "_CHUNK", 7)
  rng = np.random.default_rng(0)
  lines = ["x" * int(n) for n in rng.integers(0, 12, size=200)]
  path = tmp_path / "d.txt"
  path.write_text("\n".join(lines))
  offset = 0
  for number, line in enumerate(lines, start=1):
    assert text_files.line_number(str(path), offset) == number
    offset += len(line) + 1


def test_a_file_that_is_not_a_tokenizer_is_named(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(_records(2))
  with pytest.raises(ValueError, match="is not a SentencePiece model") as info:
    D.make_tokenizer(str(path))
  assert str(path) in str(info.value)


def test_errors_keep_their_fields_through_pickle():
  # grain may hand errors over from worker processes.
  e = pickle.loads(pickle.dumps(DataFileError("a.jsonl", 3, "bad")))
  assert (str(e), e.path, e.line) == ("a.jsonl:3: bad", "a.jsonl", 3)
  e = pickle.loads(pickle.dumps(DataError("no such feature", argument="text_key")))
  assert (str(e), e.argument) == ("no such feature", "text_key")


def test_tfds_names_the_argument_at_fault():
  directory = samples.TFDS_DIR
  with pytest.raises(DataError) as info:
    D.TfdsSource("c4/en:3.1.0", split="train", data_dir=directory, text_key="body")
  assert info.value.argument == "text_key" and "'body'" in str(info.value)
  with pytest.raises(DataError) as info:
    D.TfdsSource("c4/en:3.1.0", split="test", data_dir=directory)
  assert info.value.argument == "split" and "'test'" in str(info.value)
