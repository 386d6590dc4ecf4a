"""Tokenizers: text -> int32 token ids, with the special ids the packer needs.

The pipeline only needs four things from a tokenizer: ``encode`` (no BOS/EOS:
the packer appends ``eos_id`` itself, so a tokenizer that added its own would
double it), ``vocab_size`` (to size the embedding and to range-check ids),
``eos_id`` (the document separator in the packed stream) and ``pad_id``
(never emitted by the packer, which does not pad, but models and losses may
want to know it). ``decode`` and ``name`` are for logging and sampling.

Two kinds are provided:

* ``ByteTokenizer``: UTF-8 bytes shifted by 3. Needs no file, so tests, smoke
  runs and toy corpora work anywhere.
* ``SentencePieceTokenizer``: wraps a SentencePiece ``.model`` (e.g. the T5
  C4 vocabulary GaLore trained with).
* ``HFTokenizer``: a Hugging Face ``tokenizer.json`` (LLaMA 3, GPT-2, ...).
* ``TiktokenTokenizer``: a tiktoken BPE file in GPT-2's ``r50k_base`` format.

Every tokenizer also has ``bos_id`` (None when it has no BOS token), which the
instruction data puts before each example.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import os
from typing import Iterable

import numpy as np

__all__ = ["ByteTokenizer", "HFTokenizer", "SentencePieceTokenizer", "TiktokenTokenizer",
           "make_tokenizer"]


class ByteTokenizer:
  """UTF-8 byte-level tokenizer: pad 0, eos 1, bos 2, byte ``b`` -> ``b + 3``.

  The three reserved ids come first so that the layout matches the usual
  SentencePiece convention (pad 0, eos 1) and any byte value fits.
  """

  name = "byte"
  pad_id = 0
  eos_id = 1
  bos_id = 2
  offset = 3
  vocab_size = 256 + offset  # 259

  def encode(self, text: str) -> np.ndarray:
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return raw.astype(np.int32) + self.offset

  def decode(self, ids: Iterable[int]) -> str:
    """Bytes back to text; special ids are dropped, invalid UTF-8 replaced."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= self.offset) & (ids < self.vocab_size)]
    return (ids - self.offset).astype(np.uint8).tobytes().decode(
        "utf-8", errors="replace")

  def __repr__(self) -> str:
    return "ByteTokenizer()"


class _FileTokenizer:
  """A tokenizer built from the bytes of one file (``_load(contents)`` in each subclass).

  The file is read once. Pickling stores its contents, not the path, so a pickled
  tokenizer works in worker processes or hosts that do not have the file.
  """

  def __init__(self, path: str | os.PathLike):
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
      raise FileNotFoundError(_missing_model_message(path))
    self.path = path
    with open(path, "rb") as f:
      self._contents = f.read()
    self._load(self._contents)

  def _load(self, contents: bytes) -> None:
    raise NotImplementedError

  def __getstate__(self):
    return {"path": self.path, "contents": self._contents}

  def __setstate__(self, state):
    self.path, self._contents = state["path"], state["contents"]
    self._load(self._contents)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.path!r})"


class SentencePieceTokenizer(_FileTokenizer):
  """A SentencePiece model file.

  ``vocab_size`` is the model's piece count (32,101 for the T5 C4 model).
  A model without a pad piece (``pad_id() == -1``, the SentencePiece default)
  gets ``pad_id = eos_id``: the packer never pads, so the value only has to be
  a valid id.
  """

  def _load(self, contents: bytes) -> None:
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    try:
      sp = spm.SentencePieceProcessor(model_proto=contents)
    except (RuntimeError, OSError) as e:  # any other file: ModelProto does not parse
      raise ValueError(f"{self.path!r} is not a SentencePiece model ({e}).") from None
    self._sp = sp
    self.vocab_size = int(sp.get_piece_size())
    self.eos_id = int(sp.eos_id())
    if self.eos_id < 0:
      raise ValueError(
          f"SentencePiece model {self.path!r} has no EOS piece; the packer "
          "needs one to separate documents.")
    pad = int(sp.pad_id())
    self.pad_id = pad if pad >= 0 else self.eos_id
    self.bos_id = int(sp.bos_id()) if sp.bos_id() >= 0 else None
    self.name = "sentencepiece:" + os.path.basename(self.path)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._sp.decode(ids)


class HFTokenizer(_FileTokenizer):
  """A Hugging Face ``tokenizer.json`` (through the ``tokenizers`` library).

  ``encode`` adds no special tokens (the packer appends EOS itself). The special ids
  come from ``tokenizer_config.json`` beside the file (``eos_token``, ``bos_token``,
  ``pad_token``), else from ``config.json`` beside it (``eos_token_id``, ...), else from
  the usual EOS spellings in the vocabulary (``</s>``, ``<|endoftext|>``,
  ``<|end_of_text|>``, ``<eos>``). ``vocab_size`` counts added tokens.
  """

  _EOS_SPELLINGS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")

  def _load(self, contents: bytes) -> None:
    tokenizers = _import_optional("tokenizers", "a tokenizer.json")
    try:
      self._tok = tokenizers.Tokenizer.from_str(contents.decode("utf-8"))
    except Exception as e:  # pylint: disable=broad-except  (the library raises Exception)
      raise ValueError(f"{self.path!r} is not a Hugging Face tokenizer.json ({e}).") from None
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    special = _special_tokens_beside(self.path)
    ids = {key: self._id_of(value) for key, value in special.items()}
    if ids.get("eos") is None:
      ids["eos"] = next((self._tok.token_to_id(t) for t in self._EOS_SPELLINGS
                         if self._tok.token_to_id(t) is not None), None)
    if ids["eos"] is None:
      raise ValueError(
          f"{self.path!r}: no EOS token found (no tokenizer_config.json eos_token or config.json "
          f"eos_token_id beside it, and none of {list(self._EOS_SPELLINGS)} in the vocabulary); "
          "the packer needs one to separate documents.")
    self.eos_id = int(ids["eos"])
    self.bos_id = None if ids.get("bos") is None else int(ids["bos"])
    self.pad_id = self.eos_id if ids.get("pad") is None else int(ids["pad"])
    self.name = "hf:" + os.path.basename(os.path.dirname(self.path) or self.path)

  def _id_of(self, value) -> int | None:
    if isinstance(value, int) or value is None:
      return value
    return self._tok.token_to_id(value)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])


# GPT-2's pre-tokenizer (tiktoken's r50k_base pattern) and its one special token.
R50K_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
R50K_EOS = "<|endoftext|>"


class TiktokenTokenizer(_FileTokenizer):
  """A tiktoken BPE file in GPT-2's ``r50k_base`` format, read from a local path.

  The file has one ``<base64 token> <rank>`` line per token (OpenAI's
  ``r50k_base.tiktoken``); encoding uses GPT-2's pre-tokenizer pattern, and
  ``<|endoftext|>`` (id = number of ranks, 50256 for GPT-2) is EOS and pad.
  Nothing is downloaded.
  """

  def _load(self, contents: bytes) -> None:
    tiktoken = _import_optional("tiktoken", "a tiktoken BPE file")
    ranks = _parse_tiktoken(contents, self.path)
    self.eos_id = len(ranks)
    self.pad_id = self.eos_id
    self.bos_id = None
    self.vocab_size = len(ranks) + 1
    self._enc = tiktoken.Encoding(name=os.path.basename(self.path), pat_str=R50K_PATTERN,
                                  mergeable_ranks=ranks, special_tokens={R50K_EOS: self.eos_id})
    self.name = "tiktoken:" + os.path.basename(self.path)

  def encode(self, text: str) -> np.ndarray:
    # Special-token text in a document is encoded as ordinary text, never as EOS.
    return np.asarray(self._enc.encode_ordinary(text), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) != self.eos_id]
    return self._enc.decode(ids)


def _parse_tiktoken(contents: bytes, path: str) -> dict[bytes, int]:
  ranks = {}
  for number, line in enumerate(contents.splitlines(), 1):
    if not line.strip():
      continue
    try:
      token, rank = line.split()
      ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, binascii.Error):
      raise ValueError(f"{path!r} line {number}: not a tiktoken BPE line (<base64 token> <rank>)") from None
  if sorted(ranks.values()) != list(range(len(ranks))):
    raise ValueError(f"{path!r}: the ranks are not 0 .. {len(ranks) - 1} without gaps")
  return ranks


def _is_tiktoken_file(path: str) -> bool:
  with open(path, "rb") as f:
    first = f.readline(1024).split()
  if len(first) != 2 or not first[1].isdigit():
    return False
  try:
    base64.b64decode(first[0], validate=True)
  except (ValueError, binascii.Error):
    return False
  return True


def _special_tokens_beside(path: str) -> dict:
  """{"eos"/"bos"/"pad": token text or id} from tokenizer_config.json or config.json beside `path`.

  A token named in tokenizer_config.json wins over config.json's id for it.
  """
  out = {}
  for name, field, value_of in (("tokenizer_config.json", "{}_token", _token_text),
                                ("config.json", "{}_token_id", _token_id)):
    config = os.path.join(os.path.dirname(path), name)
    if not os.path.isfile(config):
      continue
    with open(config, encoding="utf-8") as f:
      settings = json.load(f)
    for key in ("eos", "bos", "pad"):
      value = value_of(settings.get(field.format(key)))
      if value is not None and key not in out:
        out[key] = value
  return out


def _token_text(value) -> str | None:
  """A tokenizer_config.json token: its text, or a dict holding it under "content"."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _token_id(value) -> int | None:
  """A config.json token id: an int, or a list of ids of which the first is used."""
  if isinstance(value, list) and value:
    value = value[0]
  return value if isinstance(value, int) else None


def _import_optional(module: str, what: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportError(f"Reading {what} needs the {module!r} package: pip install "
                      "'lowrank-jax[hf]'") from None


def _missing_model_message(path: str) -> str:
  return (f"Tokenizer file not found: {path!r}. A tokenizer spec is "
          "'byte' (UTF-8 bytes, no file needed), the path to a "
          "SentencePiece .model file, a Hugging Face tokenizer.json, a tiktoken "
          "BPE file (GPT-2's r50k_base format) or a model directory holding "
          "tokenizer.json or tokenizer.model.")


def make_tokenizer(spec: str | os.PathLike):
  """The tokenizer a spec names.

  ``'byte'`` -> ``ByteTokenizer``; a directory -> its ``tokenizer.json``
  (``HFTokenizer``), else its ``tokenizer.model`` or ``spiece.model`` (SentencePiece); a ``.json``
  file -> ``HFTokenizer``; a file of ``<base64> <rank>`` lines ->
  ``TiktokenTokenizer``; any other file -> ``SentencePieceTokenizer``.
  """
  if isinstance(spec, str) and spec.strip().lower() == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(os.fspath(spec))
  if os.path.isdir(path):
    # (spiece.model: T5's name for its SentencePiece model)
    for name, kind in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer),
                       ("spiece.model", SentencePieceTokenizer)):
      if os.path.isfile(os.path.join(path, name)):
        return kind(os.path.join(path, name))
    raise FileNotFoundError(f"{path!r} is a directory without tokenizer.json or tokenizer.model (or spiece.model). "
                            + _missing_model_message(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_model_message(path))
  if path.endswith(".json"):
    return HFTokenizer(path)
  if _is_tiktoken_file(path):
    return TiktokenTokenizer(path)
  return SentencePieceTokenizer(path)
