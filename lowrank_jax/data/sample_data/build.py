"""Rebuild this folder from the team's larger sample (`../shared/data` beside the repository).

  python lowrank_jax/data/sample_data/build.py [--shared ../shared/data]

Everything is cut from that sample or trained on the cut, deterministically, so running it again
writes the same bytes (README.md lists their sha256). Not needed to use the sample; kept so that
where each file came from can be checked. Needs `tokenizers` (the `hf` extra).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Lines of the shared c4/train.jsonl kept: its documents 1000..1999 are the ones the shared TFDS
# train split holds (in that order), so the TFDS records cut below are the first jsonl documents here.
TRAIN_LINES = range(1000, 1300)
VALIDATION_LINES = range(0, 100)
TFDS_NAME = "__local_c4_builder"  # the builder name the shard file names carry
# New shard -> (old shard, first record, end record): unequal lengths, so a reader that assumed
# equal shards would be caught.
TFDS_TRAIN = [("train.tfrecord-00000-of-00008", 0, 70), ("train.tfrecord-00000-of-00008", 70, 125)]
TFDS_VALIDATION = [("validation.tfrecord-00000-of-00002", 0, 50)]
BPE_MERGED = 4095  # byte-level BPE vocabulary before <|endoftext|>, which comes last as in GPT-2


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), bitwise: independent of any library the reader uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frames(path: Path) -> list[bytes]:
  """The whole frames (length, its CRC, data, data CRC) of a TFRecord file, every CRC checked."""
  raw, frames, pos = path.read_bytes(), [], 0
  while pos < len(raw):
    (length,) = struct.unpack("<Q", raw[pos:pos + 8])
    (length_crc,) = struct.unpack("<I", raw[pos + 8:pos + 12])
    data = raw[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", raw[pos + 12 + length:pos + 16 + length])
    assert length_crc == _masked(_crc32c(raw[pos:pos + 8])) and data_crc == _masked(_crc32c(data)), (path, pos)
    frames.append(raw[pos:pos + 16 + length])
    pos += 16 + length
  assert pos == len(raw), path
  return frames


def _tfds(shared: Path, out: Path) -> None:
  src, dst = shared / "tfds/c4/en/3.1.0", out / "tfds/c4/en/3.1.0"
  dst.mkdir(parents=True, exist_ok=True)
  info = json.loads((src / "dataset_info.json").read_text())
  for split, plan in (("train", TFDS_TRAIN), ("validation", TFDS_VALIDATION)):
    for k, (old, start, end) in enumerate(plan):
      # Frames are copied whole: their CRCs cover only their own bytes, so they stay valid.
      frames = _frames(src / f"{TFDS_NAME}-{old}")[start:end]
      (dst / f"{TFDS_NAME}-{split}.tfrecord-{k:05d}-of-{len(plan):05d}").write_bytes(b"".join(frames))
    entry = next(s for s in info["splits"] if s["name"] == split)
    entry["shardLengths"] = [str(end - start) for _, start, end in plan]
    entry.pop("numBytes", None)
  info["description"] = "C4 English: a few documents, cut from a TFDS-prepared c4/en 3.1.0 (lowrank-jax's sample)."
  (dst / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
  shutil.copy(src / "features.json", dst / "features.json")


def _bpe(texts: list[str], path: Path) -> None:
  """A byte-level BPE in GPT-2's tokenizer.json layout, trained on `texts`."""
  os.environ["RAYON_NUM_THREADS"] = "1"  # one thread: the merge order must not depend on scheduling
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2: the r50k pattern, no prefix space
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=BPE_MERGED, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  tok.add_special_tokens(["<|endoftext|>"])  # id BPE_MERGED: the last id, as GPT-2's 50256
  path.parent.mkdir(parents=True, exist_ok=True)
  tok.save(str(path), pretty=False)


def build(shared: Path, out: Path = HERE) -> None:
  train = open(shared / "c4/train.jsonl", "rb").readlines()
  validation = open(shared / "c4/validation.jsonl", "rb").readlines()
  (out / "c4").mkdir(parents=True, exist_ok=True)
  (out / "c4/train.jsonl").write_bytes(b"".join(train[i] for i in TRAIN_LINES))
  (out / "c4/validation.jsonl").write_bytes(b"".join(validation[i] for i in VALIDATION_LINES))
  (out / "tokenizers").mkdir(exist_ok=True)
  shutil.copy(shared / "tokenizers/c4_t5_32k.model", out / "tokenizers/c4_t5_32k.model")
  _tfds(shared, out)
  _bpe([json.loads(line)["text"] for line in train[TRAIN_LINES.start:TRAIN_LINES.stop]],
       out / "tokenizers/gpt2_format_bpe/tokenizer.json")
  for path in sorted(p for p in out.rglob("*") if p.is_file() and p.suffix not in (".py", ".md", ".pyc")):
    print(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.stat().st_size:>8}  {path.relative_to(out)}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shared", type=Path, default=HERE.parents[3] / "shared" / "data")
  build(parser.parse_args().shared)
