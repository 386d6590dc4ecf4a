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
"""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np

__all__ = ["ByteTokenizer", "SentencePieceTokenizer", "make_tokenizer"]


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


class SentencePieceTokenizer:
  """A SentencePiece model file.

  ``vocab_size`` is the model's piece count (32,101 for the T5 C4 model).
  A model without a pad piece (``pad_id() == -1``, the SentencePiece default)
  gets ``pad_id = eos_id``: the packer never pads, so the value only has to be
  a valid id.

  Pickling stores the serialized model, not the path, so a pickled tokenizer
  works in worker processes or hosts that do not have the file.
  """

  def __init__(self, path: str | os.PathLike):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(path):
      raise FileNotFoundError(_missing_model_message(path))
    self.path = path
    self._load(spm.SentencePieceProcessor(model_file=path))

  def _load(self, sp) -> None:
    self._sp = sp
    self.vocab_size = int(sp.get_piece_size())
    self.eos_id = int(sp.eos_id())
    if self.eos_id < 0:
      raise ValueError(
          f"SentencePiece model {self.path!r} has no EOS piece; the packer "
          "needs one to separate documents.")
    pad = int(sp.pad_id())
    self.pad_id = pad if pad >= 0 else self.eos_id
    self.name = "sentencepiece:" + os.path.basename(self.path)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._sp.decode(ids)

  def __getstate__(self):
    return {"path": self.path, "proto": self._sp.serialized_model_proto()}

  def __setstate__(self, state):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.path = state["path"]
    self._load(spm.SentencePieceProcessor(model_proto=state["proto"]))

  def __repr__(self) -> str:
    return f"SentencePieceTokenizer({self.path!r})"


def _missing_model_message(path: str) -> str:
  return (f"Tokenizer file not found: {path!r}. A tokenizer spec is either "
          "'byte' (UTF-8 bytes, no file needed) or the path to a "
          "SentencePiece .model file.")


def make_tokenizer(spec: str | os.PathLike):
  """``'byte'`` -> ``ByteTokenizer``; anything else is a SentencePiece path."""
  if isinstance(spec, str) and spec.strip().lower() == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(os.fspath(spec))
  if not os.path.isfile(path):
    raise FileNotFoundError(_missing_model_message(path))
  return SentencePieceTokenizer(path)
