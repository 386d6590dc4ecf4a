"""The small real data shipped inside the package, so tests and quick runs need nothing beside it.

All under ``sample_data/`` (its README.md gives sizes, sources, licences and sha256s):

* ``C4_TRAIN``: 300 documents of the C4 English train split, JSON lines with the fields
  ``text``, ``url``, ``timestamp``, ``source`` (C4 is ODC-BY).
* ``C4_VALIDATION``: 100 documents of C4's validation split, the same fields.
* ``T5_TOKENIZER``: the T5 C4 SentencePiece vocabulary GaLore trained with (32,101 pieces:
  pad 0, eos 1; Apache-2.0).
* ``GPT2_TOKENIZER``: a byte-level BPE in GPT-2's ``tokenizer.json`` layout (GPT-2's
  pre-tokenizer, ``<|endoftext|>`` last, 4,096 ids), trained on ``C4_TRAIN``: the Hugging
  Face tokenizer path without downloading GPT-2's.
* ``TFDS_DIR``: a TFDS ``data_dir`` holding a prepared ``c4/en:3.1.0`` whose train split is
  the first 125 documents of ``C4_TRAIN`` (two shards, 70 + 55) and whose validation split is
  the first 50 of ``C4_VALIDATION``.

The trainer's ``data.preset='sample'`` trains on ``C4_TRAIN`` / ``C4_VALIDATION`` with
``T5_TOKENIZER``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["C4_TRAIN", "C4_VALIDATION", "GPT2_TOKENIZER", "SAMPLE_DIR", "T5_TOKENIZER", "TFDS_DIR"]

SAMPLE_DIR = Path(__file__).resolve().parent / "sample_data"
C4_TRAIN = SAMPLE_DIR / "c4" / "train.jsonl"
C4_VALIDATION = SAMPLE_DIR / "c4" / "validation.jsonl"
T5_TOKENIZER = SAMPLE_DIR / "tokenizers" / "c4_t5_32k.model"
GPT2_TOKENIZER = SAMPLE_DIR / "tokenizers" / "gpt2_format_bpe" / "tokenizer.json"
TFDS_DIR = SAMPLE_DIR / "tfds"
