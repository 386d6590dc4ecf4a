"""Hugging Face tokenizer.json and tiktoken BPE files, written tiny by the tests.

tiktoken: our tokenizer's ids equal a plain-Python byte-pair encoder over the same ranks
(GPT-2's algorithm: pre-tokenize with the r50k pattern, then merge the adjacent pair of
lowest rank until none is in the vocabulary). tokenizer.json: a hand-written WordLevel
vocabulary whose ids are known, and the `tokenizers` library's own output.
"""

import base64
import json
import math
import pickle

import numpy as np
import pytest

from lowrank_jax import data as D
from lowrank_jax.data import tokenizers as T

regex = pytest.importorskip("regex")
pytest.importorskip("tiktoken")
hf_tokenizers = pytest.importorskip("tokenizers")

MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"ing", b" s", b"at", b" c"]
TEXT = "the cat sat in the singing hat, 42 times!\n  the end <|endoftext|> ünïcode"


def write_tiktoken(path):
  ranks = {bytes([b]): b for b in range(256)}
  ranks.update({m: 256 + i for i, m in enumerate(MERGES)})
  with open(path, "wb") as f:
    for token, rank in ranks.items():
      f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
  return ranks


def reference_bpe(text, ranks):
  ids = []
  for piece in regex.findall(T.R50K_PATTERN, text):
    parts = [bytes([b]) for b in piece.encode("utf-8")]
    while len(parts) > 1:
      pair_rank = [ranks.get(parts[i] + parts[i + 1], math.inf) for i in range(len(parts) - 1)]
      best = int(np.argmin(pair_rank))
      if pair_rank[best] == math.inf:
        break
      parts[best:best + 2] = [parts[best] + parts[best + 1]]
    ids.extend(ranks[p] for p in parts)
  return ids


def test_tiktoken_file_encodes_as_byte_pair_reference(tmp_path):
  path = tmp_path / "tiny.tiktoken"
  ranks = write_tiktoken(path)
  tok = D.make_tokenizer(str(path))
  assert isinstance(tok, D.TiktokenTokenizer)
  ids = tok.encode(TEXT)
  assert ids.dtype == np.int32
  assert ids.tolist() == reference_bpe(TEXT, ranks)
  assert 256 + MERGES.index(b" the") in ids.tolist()  # merges are used
  assert tok.eos_id == tok.pad_id == len(ranks) and tok.vocab_size == len(ranks) + 1
  assert tok.eos_id not in ids.tolist()  # "<|endoftext|>" in a document is plain text
  assert tok.decode(ids) == TEXT
  assert pickle.loads(pickle.dumps(tok)).encode(TEXT).tolist() == ids.tolist()


def write_word_level(folder, *, with_config=True):
  vocab = {"<unk>": 0, "</s>": 1, "<s>": 2, "hello": 3, "world": 4, "!": 5}
  spec = {
      "version": "1.0", "truncation": None, "padding": None,
      "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                        "normalized": False, "special": True} for t, i in vocab.items() if t.startswith("<")],
      "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
      "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
  }
  folder.mkdir(exist_ok=True)
  (folder / "tokenizer.json").write_text(json.dumps(spec))
  if with_config:
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": {"content": "<s>"}}))
  return folder


def test_tokenizer_json_encodes_as_its_library(tmp_path):
  folder = write_word_level(tmp_path / "model")
  tok = D.make_tokenizer(str(folder))  # a model directory's own tokenizer
  assert isinstance(tok, D.HFTokenizer)
  assert tok.encode("hello world! hello foo").tolist() == [3, 4, 5, 3, 0]
  reference = hf_tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  assert tok.encode("world hello !").tolist() == reference.encode("world hello !", add_special_tokens=False).ids
  assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size) == (1, 2, 1, 6)
  assert pickle.loads(pickle.dumps(tok)).encode("hello").tolist() == [3]
  assert isinstance(D.make_tokenizer(str(folder / "tokenizer.json")), D.HFTokenizer)


def test_tokenizer_errors(tmp_path):
  folder = tmp_path / "noeos"
  write_word_level(folder, with_config=False)
  spec = json.loads((folder / "tokenizer.json").read_text())
  del spec["model"]["vocab"]["</s>"]
  spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "</s>"]
  (folder / "tokenizer.json").write_text(json.dumps(spec))
  with pytest.raises(ValueError, match="no EOS token"):
    D.make_tokenizer(str(folder / "tokenizer.json"))
  bad = tmp_path / "bad.tiktoken"
  bad.write_bytes(b"YQ== 0\nnot-base64!! 1\n")
  with pytest.raises(ValueError, match="line 2: not a tiktoken BPE line"):
    D.TiktokenTokenizer(str(bad))
  empty = tmp_path / "empty_dir"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="without tokenizer.json or tokenizer.model"):
    D.make_tokenizer(str(empty))
