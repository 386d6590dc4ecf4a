"""Tests of lowrank_jax.data against independent computations.

Real-data tests read the sample shipped in the package (``lowrank_jax.data.samples``:
C4 documents as JSON lines and as a TFDS directory, the T5 vocabulary, a GPT-2-format BPE).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import pickle
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from lowrank_jax import data as D
from lowrank_jax.data import samples, tfrecord

C4_TRAIN = samples.C4_TRAIN
C4_VALID = samples.C4_VALIDATION
TFDS_DIR = samples.TFDS_DIR
T5_MODEL = samples.T5_TOKENIZER


@pytest.fixture(scope="module")
def t5():
  return D.SentencePieceTokenizer(T5_MODEL)


@pytest.fixture(scope="module")
def c4_train_texts():
  with open(C4_TRAIN, encoding="utf-8") as f:
    return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def tfds_train():
  return D.TfdsSource("c4/en:3.1.0", "train", data_dir=TFDS_DIR)


def _id_tokenizer(vocab_size):
  """Ids-only tokenizer for array sources: eos 1, pad 0."""
  return types.SimpleNamespace(vocab_size=vocab_size, eos_id=1, pad_id=0,
                               name="ids", encode=None)


def _marker_docs(n):
  """Document i is the single token i + 2, so a stream reveals doc order."""
  return [np.array([i + 2], np.int32) for i in range(n)]


def _doc_order(iterator, num_batches):
  """Documents of a marker stream, in the order they were packed."""
  stream = np.concatenate([next(iterator)["tokens"].reshape(-1)
                           for _ in range(num_batches)])
  assert np.all(stream[1::2] == 1)  # doc, EOS, doc, EOS, ...
  return (stream[0::2] - 2).tolist()


def _byte_stream(texts):
  """Independent EOS-joined byte-token stream: byte b -> b + 3, EOS 1."""
  out = []
  for t in texts:
    out.extend(b + 3 for b in t.encode("utf-8"))
    out.append(1)
  return np.asarray(out)


# ---------------------------------------------------------------- tokenizers


def test_byte_tokenizer_ids_and_round_trip():
  tok = D.ByteTokenizer()
  assert (tok.vocab_size, tok.pad_id, tok.eos_id, tok.name) == (259, 0, 1,
                                                                "byte")
  ids = tok.encode("aé\n")
  assert ids.dtype == np.int32
  assert ids.tolist() == [0x61 + 3, 0xC3 + 3, 0xA9 + 3, 0x0A + 3]
  text = "Grüße, 世界! \t\x00"
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode([0, 1, 2] + tok.encode("ok").tolist() + [1]) == "ok"
  assert tok.encode("").shape == (0,)


def test_sentencepiece_tokenizer(t5):
  assert (t5.vocab_size, t5.eos_id, t5.pad_id) == (32101, 1, 0)
  text = "Hello world, this is a test."
  ids = t5.encode(text)
  assert ids.dtype == np.int32 and ids.ndim == 1 and len(ids) > 3
  assert t5.eos_id not in ids.tolist() and 2 not in ids.tolist()  # no EOS/BOS
  assert t5.decode(ids) == text
  clone = pickle.loads(pickle.dumps(t5))
  assert clone.encode(text).tolist() == ids.tolist()
  assert isinstance(D.make_tokenizer(str(T5_MODEL)), D.SentencePieceTokenizer)


def test_make_tokenizer_choices_and_errors(tmp_path):
  assert isinstance(D.make_tokenizer("byte"), D.ByteTokenizer)
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError) as e:
    D.make_tokenizer(str(missing))
  msg = str(e.value)
  assert str(missing) in msg and "'byte'" in msg and ".model" in msg


# GPT-2's pre-tokenizer pattern (its encoder.py), written out here rather than
# taken from the package.
_GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"""
                 r"""| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _gpt2_bytes_to_unicode():
  """GPT-2's printable stand-in character for each byte (its encoder.py)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs, n = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {b: chr(c) for b, c in zip(bs, cs)}


def _gpt2_bpe(text, vocab, merges):
  """GPT-2's byte-pair encoding in plain Python: split with its pattern, map
  bytes to stand-ins, merge the adjacent pair of lowest merge rank until none
  is a merge."""
  import regex
  ranks = {pair: r for r, pair in enumerate(merges)}
  to_char = _gpt2_bytes_to_unicode()
  ids = []
  for piece in regex.findall(_GPT2_PATTERN, text):
    parts = [to_char[b] for b in piece.encode("utf-8")]
    while len(parts) > 1:
      pair_rank = [ranks.get((a, b), math.inf) for a, b in zip(parts, parts[1:])]
      best = int(np.argmin(pair_rank))
      if pair_rank[best] == math.inf:
        break
      parts[best:best + 2] = [parts[best] + parts[best + 1]]
    ids.extend(vocab[p] for p in parts)
  return ids


def test_shipped_gpt2_format_bpe_encodes_as_gpt2s_algorithm():
  spec = json.loads(samples.GPT2_TOKENIZER.read_text(encoding="utf-8"))
  model = spec["model"]
  assert model["type"] == "BPE" and spec["pre_tokenizer"]["type"] == "ByteLevel"
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
            for m in model["merges"]]
  tok = D.make_tokenizer(str(samples.GPT2_TOKENIZER))
  assert isinstance(tok, D.HFTokenizer)
  # GPT-2's layout: 256 byte stand-ins, the merges, <|endoftext|> last (EOS).
  assert len(model["vocab"]) == 256 + len(merges) == 4095
  assert (tok.vocab_size, tok.eos_id, tok.pad_id) == (4096, 4095, 4095)
  assert sorted(model["vocab"].values()) == list(range(4095))
  with open(C4_VALID, encoding="utf-8") as f:  # documents it was not trained on
    texts = [json.loads(line)["text"] for line in f][:4]
  texts.append("Grüße, 世界!\t 42 times  \n\n it's  ok\r\n")
  for text in texts:
    ids = tok.encode(text)
    assert ids.tolist() == _gpt2_bpe(text, model["vocab"], merges)
    assert tok.decode(ids) == text
  assert len(tok.encode(texts[0])) < 0.5 * len(texts[0].encode())  # it merges


def test_shipped_sample_matches_its_readme():
  # The README's sha256 list names every data file, and the files are unchanged.
  readme = (samples.SAMPLE_DIR / "README.md").read_text(encoding="utf-8")
  block = readme.split("## sha256")[1].split("```")[1]
  listed = dict(line.split()[::-1] for line in block.strip().splitlines())
  files = {p.relative_to(samples.SAMPLE_DIR).as_posix(): p
           for p in samples.SAMPLE_DIR.rglob("*")
           if p.is_file() and p.suffix not in (".md", ".py", ".pyc")}
  assert sorted(listed) == sorted(files)
  for name, path in files.items():
    assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[name], name
  assert sum(p.stat().st_size for p in files.values()) < 4e6  # the size budget
  for path in (samples.C4_TRAIN, samples.C4_VALIDATION, samples.T5_TOKENIZER,
               samples.GPT2_TOKENIZER, samples.TFDS_DIR / "c4/en/3.1.0"):
    assert path.exists()


# ------------------------------------------------------------- line sources


def test_jsonl_source_on_c4(c4_train_texts):
  src = D.JsonlSource(str(C4_TRAIN))
  with open(C4_TRAIN, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  assert len(src) == len(lines) == len(c4_train_texts) == 300
  rng = np.random.default_rng(0)
  for i in [0, 1, 123, len(lines) - 1, *rng.integers(len(lines), size=20)]:
    assert src[int(i)] == json.loads(lines[i])["text"]
  assert src[-1] == c4_train_texts[-1]
  with pytest.raises(IndexError):
    src[len(src)]
  clone = pickle.loads(pickle.dumps(src))
  assert clone[17] == c4_train_texts[17]


def test_jsonl_source_tricky_files(tmp_path):
  a = tmp_path / "a.jsonl"
  a.write_bytes(
      b'{"text": "first"}\n\n   \n{"text": "caf\\u00e9 \xe4\xb8\x96", "x": 1}'
      b'\r\n\t\n{"body": "no text key, only read when asked", "text": "t"}\n'
      b'{"text": ""}')  # no trailing newline, empty document
  b = tmp_path / "b.jsonl"
  b.write_text('{"text": "from b"}\n', encoding="utf-8")
  src = D.JsonlSource(str(tmp_path / "*.jsonl"))
  assert [src[i] for i in range(len(src))] == [
      "first", "café 世", "t", "", "from b"]
  two = D.JsonlSource([b, a])  # explicit order wins over glob order
  assert two[0] == "from b" and len(two) == 5


def test_jsonl_source_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    D.JsonlSource(str(tmp_path / "missing.jsonl"))
  with pytest.raises(FileNotFoundError, match=r"nothing\*"):
    D.JsonlSource(str(tmp_path / "nothing*.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"content": "x"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match="bad.jsonl") as e:
    D.JsonlSource(str(bad))
  assert "'text'" in str(e.value) and "content" in str(e.value)
  assert D.JsonlSource(str(bad), text_key="content")[0] == "x"
  late = tmp_path / "late.jsonl"
  late.write_text('{"text": "ok"}\n{"other": 1}\nnot json\n', encoding="utf-8")
  src = D.JsonlSource(str(late))
  with pytest.raises(ValueError, match="late.jsonl"):
    src[1]
  with pytest.raises(ValueError, match="not valid JSON"):
    src[2]
  gz = tmp_path / "c.jsonl.gz"
  with gzip.open(gz, "wt") as f:
    f.write('{"text": "x"}\n')
  with pytest.raises(ValueError, match="c.jsonl.gz"):
    D.JsonlSource(str(gz))


def test_line_index_across_scan_chunks(tmp_path, monkeypatch):
  # Tiny scan chunks put line breaks and blank runs on chunk boundaries.
  from lowrank_jax.data import text_files
  rng = np.random.default_rng(0)
  pieces = ["", " ", "\t \r", "a", "b c", "é世", "  x  "]
  lines = [pieces[i] for i in rng.integers(len(pieces), size=200)]
  p = tmp_path / "t.txt"
  p.write_text("\n".join(lines), encoding="utf-8")
  expected = [l.rstrip("\r") for l in lines if l.strip()]
  for chunk in (1, 2, 3, 7, 64):
    monkeypatch.setattr(text_files, "_CHUNK", chunk)
    src = D.TextSource(p)
    assert [src[i] for i in range(len(src))] == expected


def test_text_source(tmp_path):
  p = tmp_path / "doc.txt"
  p.write_bytes("line one\n\n  \nline two ü\r\nlast".encode("utf-8"))
  src = D.TextSource(p)
  assert len(src) == 3
  assert [src[i] for i in range(3)] == ["line one", "line two ü", "last"]
  empty = tmp_path / "empty.txt"
  empty.write_text("", encoding="utf-8")
  assert len(D.TextSource(empty)) == 0


# ------------------------------------------------------------------- TFDS


def test_tfds_source_matches_jsonl(tfds_train, c4_train_texts):
  # The prepared train split holds the first 125 documents of c4/train.jsonl,
  # in order, in shards of 70 and 55; validation the first 50 of
  # c4/validation.jsonl.
  assert tfds_train._records.shard_lengths == [70, 55]
  assert len(tfds_train) == 125
  assert [tfds_train[i] for i in range(125)] == c4_train_texts[:125]
  valid = D.TfdsSource("c4/en", "validation", data_dir=str(TFDS_DIR))
  assert valid.directory.endswith("3.1.0")  # newest version when omitted
  with open(C4_VALID, encoding="utf-8") as f:
    valid_texts = [json.loads(line)["text"] for line in f]
  assert len(valid) == 50
  assert [valid[i] for i in (49, 0, 25, 24)] == [
      valid_texts[i] for i in (49, 0, 25, 24)]
  clone = pickle.loads(pickle.dumps(valid))
  assert clone[37] == valid_texts[37]


def test_tfds_source_errors(tmp_path, tfds_train):
  with pytest.raises(ValueError, match="validation"):
    D.TfdsSource("c4/en:3.1.0", "test", data_dir=str(TFDS_DIR))
  with pytest.raises(FileNotFoundError) as e:
    D.TfdsSource("c4/en:3.1.0", "train", data_dir=str(tmp_path))
  msg = str(e.value)
  assert str(tmp_path / "c4" / "en" / "3.1.0") in msg
  assert "tfds build c4/en:3.1.0" in msg and "download_and_prepare" in msg
  assert "data_dir" in msg


def test_tfds_source_array_record_dir(tmp_path, tfds_train):
  # The same records rewritten as array_record shards take the TFDS
  # random-access path (builder.as_data_source) and must read the same.
  ar = pytest.importorskip("array_record.python.array_record_module")
  src_dir = Path(tfds_train.directory)
  dst = tmp_path / "c4" / "en" / "3.1.0"
  dst.mkdir(parents=True)
  for f in src_dir.iterdir():
    if ".tfrecord-" not in f.name:
      shutil.copy(f, dst)
      continue
    raw = f.read_bytes()
    writer = ar.ArrayRecordWriter(
        str(dst / f.name.replace(".tfrecord-", ".array_record-")),
        "group_size:1")
    for o, n in zip(*tfrecord.index_records(str(f))):
      writer.write(raw[o:o + n])
    writer.close()
  info = json.loads((dst / "dataset_info.json").read_text())
  info["fileFormat"] = "array_record"
  (dst / "dataset_info.json").write_text(json.dumps(info))
  src = D.TfdsSource("c4/en:3.1.0", "train", data_dir=str(tmp_path))
  assert src._records is None and len(src) == 125
  for i in (0, 69, 70, 124, 97):
    assert src[i] == tfds_train[i]


def test_tfds_missing_package_message(monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"pip install 'lowrank-jax\[tfds\]'"):
    D.TfdsSource("c4/en:3.1.0", "train", data_dir=str(TFDS_DIR))


def test_tfrecord_reader_rejects_truncated_shard(tmp_path, tfds_train):
  shard = tfds_train._records.paths[0]
  offsets, lengths = tfrecord.index_records(shard)
  assert len(offsets) == 70
  cut = tmp_path / "cut.tfrecord"
  cut.write_bytes(Path(shard).read_bytes()[:int(offsets[-1]) + 5])
  with pytest.raises(ValueError, match="truncated|past the end"):
    tfrecord.index_records(str(cut))


def test_jsonl_and_tfds_give_same_packed_tokens(tmp_path, tfds_train, t5):
  # A jsonl of the same documents, copied from the raw c4 lines (not from
  # TfdsSource), in TFDS order.
  with open(C4_TRAIN, encoding="utf-8") as f:
    lines = f.readlines()[:125]
  same = tmp_path / "same.jsonl"
  same.write_text("".join(lines), encoding="utf-8")
  jsonl = D.JsonlSource(same)
  kw = dict(seq_len=128, batch_size=4)
  for shuffle in (False, True):
    a = D.make_train_iterator(jsonl, t5, shuffle=shuffle, seed=3, **kw)
    b = D.make_train_iterator(tfds_train, t5, shuffle=shuffle, seed=3, **kw)
    for _ in range(3):
      np.testing.assert_array_equal(next(a)["tokens"], next(b)["tokens"])
  ea = D.make_eval_batches(jsonl, t5, num_batches=2, **kw)
  eb = D.make_eval_batches(tfds_train, t5, num_batches=2, **kw)
  for x, y in zip(ea, eb, strict=True):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  expected = np.concatenate(
      [np.append(t5.encode(json.loads(l)["text"]), 1) for l in lines[:20]])
  got = np.concatenate([x["tokens"].reshape(-1) for x in ea])
  np.testing.assert_array_equal(got, expected[:got.size])


# ---------------------------------------------------------------- packing


TEXTS = ["hello", "", "a longer document that spans rows", "é", "x" * 40,
         "end"]


def test_packing_matches_independent_concatenation():
  tok = D.ByteTokenizer()
  it = D.make_train_iterator(TEXTS, tok, seq_len=7, batch_size=3,
                             shuffle=False)
  batches = [next(it)["tokens"] for _ in range(10)]
  for b in batches:
    assert b.shape == (3, 7) and b.dtype == np.int32
  got = np.concatenate([b.reshape(-1) for b in batches])
  one_epoch = _byte_stream(TEXTS)
  expected = np.tile(one_epoch, got.size // one_epoch.size + 1)[:got.size]
  assert got.size > 2 * one_epoch.size  # crossed two epoch boundaries
  np.testing.assert_array_equal(got, expected)


def test_packed_iter_dataset_drops_only_the_unfilled_tail():
  import grain
  docs = [np.arange(n, dtype=np.int32) + 5 for n in (3, 0, 9, 4)]
  ds = D.PackedIterDataset(grain.MapDataset.source(docs).to_iter_dataset(),
                           seq_len=4, eos_id=1)
  rows = list(ds)
  stream = np.concatenate([np.append(d, 1) for d in docs])  # 20 tokens
  np.testing.assert_array_equal(np.stack(rows),
                                stream[:len(stream) // 4 * 4].reshape(-1, 4))


@pytest.mark.parametrize("num_threads", [0, 2])
def test_exact_resume_across_epochs(num_threads):
  rng = np.random.default_rng(1)
  texts = ["".join(chr(97 + c) for c in rng.integers(26, size=n))
           for n in rng.integers(0, 40, size=30)]
  tok = D.ByteTokenizer()
  make = lambda: D.make_train_iterator(texts, tok, seq_len=16, batch_size=3,
                                       seed=5, num_threads=num_threads)
  it = make()
  states, batches = [], []
  for _ in range(40):
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it)["tokens"])
  epoch_tokens = sum(len(t) + 1 for t in texts)
  assert 40 * 3 * 16 > 2 * epoch_tokens  # the run crosses epoch boundaries
  assert any(s["consumed"] > 0 for s in states)  # mid-document states
  for k in [0, 1, 7, 13, 22, 31, 39]:
    fresh = make()
    fresh.set_state(states[k])
    for j in range(k, min(k + 5, 40)):
      np.testing.assert_array_equal(next(fresh)["tokens"], batches[j])
  # set_state on a running iterator (not only a fresh one) also works.
  it.set_state(states[9])
  np.testing.assert_array_equal(next(it)["tokens"], batches[9])
  # The default (no threads) and threaded readers give the same stream.
  plain = D.make_train_iterator(texts, tok, seq_len=16, batch_size=3, seed=5)
  for j in range(6):
    np.testing.assert_array_equal(next(plain)["tokens"], batches[j])


def test_resume_synthetic_and_real(t5):
  lang = D.SyntheticLanguage(vocab_size=32, seed=2)
  src = D.JsonlSource(C4_VALID)
  for source, tok in [(lang, lang.tokenizer), (src, t5)]:
    make = lambda: D.make_train_iterator(source, tok, seq_len=64,
                                         batch_size=2, seed=7)
    it = make()
    for _ in range(3):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it)["tokens"] for _ in range(3)]
    fresh = make()
    fresh.set_state(state)
    for w in want:
      np.testing.assert_array_equal(next(fresh)["tokens"], w)


# ------------------------------------------------------ shuffle and shares


def test_shuffle_orders():
  n, tok = 20, _id_tokenizer(30)
  docs = _marker_docs(n)
  make = lambda **kw: D.make_train_iterator(docs, tok, seq_len=4,
                                            batch_size=1, **kw)
  per_epoch = n * 2 // 4  # batches per epoch: n docs x (token + EOS)
  order = _doc_order(make(seed=0), 2 * per_epoch)
  first, second = order[:n], order[n:]
  assert sorted(first) == sorted(second) == list(range(n))
  assert first != list(range(n)) and second != first  # epochs reshuffle
  assert _doc_order(make(seed=0), 2 * per_epoch) == order
  assert _doc_order(make(seed=1), per_epoch) != first
  assert _doc_order(make(shuffle=False), 2 * per_epoch) == list(range(n)) * 2


@pytest.mark.parametrize("shuffle", [False, True])
def test_process_shares_are_disjoint_and_cover(shuffle):
  n, count, tok = 31, 3, _id_tokenizer(40)
  docs = _marker_docs(n)
  shares = []
  for index in range(count):
    share_len = len(range(index, n, count))
    it = D.make_train_iterator(docs, tok, seq_len=2, batch_size=1,
                               shuffle=shuffle, process_index=index,
                               process_count=count)
    got = _doc_order(it, share_len)  # one epoch of this share
    assert len(set(got)) == share_len
    shares.append(set(got))
  assert set().union(*shares) == set(range(n))
  assert sum(map(len, shares)) == n
  with pytest.raises(D.DataError):
    D.make_train_iterator(docs[:2], tok, seq_len=2, batch_size=1,
                          process_index=2, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    D.make_train_iterator(docs, tok, seq_len=2, batch_size=1,
                          process_index=3, process_count=3)


def test_argument_validation():
  tok = D.ByteTokenizer()
  for kw, name in [(dict(seq_len=0, batch_size=2), "seq_len"),
                   (dict(seq_len=8, batch_size=-1), "batch_size")]:
    with pytest.raises(ValueError, match=name):
      D.make_train_iterator(TEXTS, tok, **kw)
    with pytest.raises(ValueError, match=name):
      D.make_eval_batches(TEXTS, tok, num_batches=1, **kw)
  lang = D.SyntheticLanguage(vocab_size=300)
  with pytest.raises(ValueError, match="out of range"):  # ids >= 259
    next(D.make_train_iterator(lang, tok, seq_len=8, batch_size=1))


# ------------------------------------------------------------- evaluation


def test_eval_batches_deterministic_and_short_data():
  tok = D.ByteTokenizer()
  kw = dict(seq_len=5, batch_size=2)
  a = D.make_eval_batches(TEXTS, tok, num_batches=3, **kw)
  b = D.make_eval_batches(TEXTS, tok, num_batches=3, **kw)
  assert len(a) == 3
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  stream = _byte_stream(TEXTS)
  got = np.concatenate([x["tokens"].reshape(-1) for x in a])
  np.testing.assert_array_equal(got, stream[:30])
  # Fewer full batches than requested: all that fit, no wrap-around.
  many = D.make_eval_batches(TEXTS, tok, num_batches=100, **kw)
  assert len(many) == len(stream) // 10
  np.testing.assert_array_equal(
      np.concatenate([x["tokens"].reshape(-1) for x in many]),
      stream[:len(many) * 10])
  with pytest.raises(D.DataError) as e:  # 3 + 2 + 1 = 6 tokens < 2 * 4
    D.make_eval_batches(["ab", "c", ""], tok, seq_len=4, batch_size=2,
                        num_batches=1)
  assert "6 tokens" in str(e.value) and "8" in str(e.value)


def test_split_holdout():
  docs = [f"d{i}" for i in range(10)]
  train, held = D.split_holdout(docs, 0.2)
  assert [train[i] for i in range(len(train))] == docs[:8]
  assert [held[i] for i in range(len(held))] == docs[8:]


# ------------------------------------------------------- synthetic language


def _independent_matrix(lang):
  """(V+1)-state packed-stream chain from the language's parameters."""
  V, K, q = lang.vocab_size, lang.branching, lang.stop_prob
  p = 1.0 / np.arange(1, K + 1)
  p /= p.sum()
  np.testing.assert_allclose(lang.probs, p)
  m = np.zeros((V + 1, V + 1))  # state 0 = EOS, state s + 1 = word s
  m[0, 1:] = 1 / V
  for s in range(V):
    m[s + 1, 0] += q
    for j in range(K):
      m[s + 1, (lang.perm[s] + lang.offsets[j]) % V + 1] += (1 - q) * p[j]
  return m


@pytest.mark.parametrize("params", [
    dict(vocab_size=256, branching=4, stop_prob=1 / 64),
    dict(vocab_size=16, branching=3, stop_prob=0.2, seed=3),
    dict(vocab_size=5, branching=5, stop_prob=1.0, seed=1),
])
def test_synthetic_closed_form_matches_matrix(params):
  lang = D.SyntheticLanguage(**params)
  V = lang.vocab_size
  assert lang.tokenizer.vocab_size == V + 2
  assert sorted(lang.perm.tolist()) == list(range(V))
  succ = (lang.perm[:, None] + lang.offsets[None, :]) % V
  assert all(len(set(row)) == lang.branching for row in succ.tolist())
  words = np.zeros((V, V))  # word-to-word step, given no stop
  for s in range(V):
    words[s, succ[s]] += lang.probs
  np.testing.assert_allclose(words.sum(0), 1)  # doubly stochastic
  np.testing.assert_allclose(words.sum(1), 1)
  m = _independent_matrix(lang)
  np.testing.assert_allclose(lang.transition_matrix(), m, atol=1e-15)
  evals, evecs = np.linalg.eig(m.T)
  pi = np.real(evecs[:, np.argmin(np.abs(evals - 1))])
  pi /= pi.sum()
  np.testing.assert_allclose(pi @ m, pi, atol=1e-12)
  with np.errstate(divide="ignore", invalid="ignore"):
    row_h = -np.sum(np.where(m > 0, m * np.log(m), 0.0), axis=1)
  assert lang.entropy_rate() == pytest.approx(float(pi @ row_h), abs=1e-10)


def test_synthetic_entropy_rate_matches_sampled_stream():
  lang = D.SyntheticLanguage()  # V = 256, K = 4, q = 1/64
  it = D.make_train_iterator(lang, lang.tokenizer, seq_len=512, batch_size=64,
                             seed=0)
  rows = np.concatenate([next(it)["tokens"] for _ in range(8)])  # 262k
  assert rows.min() >= 1 and rows.max() <= lang.vocab_size + 1  # no pad
  with np.errstate(divide="ignore"):
    logp = np.log(_independent_matrix(lang))
  nll = -logp[rows[:, :-1] - 1, rows[:, 1:] - 1]  # [rows, seq_len - 1]
  assert np.all(np.isfinite(nll))  # every transition is possible in the model
  # Standard error by batch means over the 512 rows: the per-token terms are
  # not independent (a stop, which costs log(1/q), is followed by EOS, whose
  # row costs log V), which inflates the error ~1.25x over the i.i.d.
  # formula; correlations die out within a few tokens, so 511-token row
  # means are nearly independent. 5 standard errors: false failure < 1e-6.
  est = nll.mean()
  se = nll.mean(axis=1).std(ddof=1) / math.sqrt(len(nll))
  tol = 5 * se
  h = lang.entropy_rate()
  assert tol < 0.01 * h  # the check is sharp enough to mean something
  assert abs(est - h) < tol, (est, h, tol)
  q, V = lang.stop_prob, lang.vocab_size
  h_p = -np.sum(lang.probs * np.log(lang.probs))
  h_b = -(q * np.log(q) + (1 - q) * np.log(1 - q))
  unnormalised = h_b + (1 - q) * h_p + q * np.log(V)  # forgetting the 1 + q
  assert abs(est - unnormalised) > tol


def test_synthetic_documents_reproducible():
  lang = D.SyntheticLanguage(vocab_size=64, seed=4)
  idx = [5, 0, 999_999, 5, 12345]
  docs = [lang[i] for i in idx]
  again = D.SyntheticLanguage(vocab_size=64, seed=4)
  for i, d in zip(idx, docs):
    np.testing.assert_array_equal(again[i], d)
    assert d.dtype == np.int32 and d.min() >= 2 and d.max() <= 65
  np.testing.assert_array_equal(docs[0], docs[3])
  valid = D.SyntheticLanguage(vocab_size=64, seed=4, doc_seed=1)
  np.testing.assert_array_equal(valid.perm, lang.perm)  # same language
  np.testing.assert_array_equal(valid.offsets, lang.offsets)
  assert not np.array_equal(valid[5], lang[5])  # new documents
  other = D.SyntheticLanguage(vocab_size=64, seed=5)
  assert not np.array_equal(other.perm, lang.perm)
  lengths = np.array([len(lang[i]) for i in range(2000)])
  # Geometric(q): mean 1/q = 64, std sqrt(1-q)/q ~ 63.5.
  assert abs(lengths.mean() - 64) < 6 * 63.5 / math.sqrt(2000)
  assert lengths.min() >= 1
  with pytest.raises(TypeError, match="token ids"):
    lang.tokenizer.encode("text")
  assert pickle.loads(pickle.dumps(lang))[7].tolist() == lang[7].tolist()
