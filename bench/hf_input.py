"""The input pipeline alone (no model): tokens/s of data.source=hf on local Parquet against jsonl.

The same text, the C4 sample's training documents, is written twice into a scratch folder: as a
JSON-lines file, and as a dataset folder of Parquet shards (data/train-*.parquet, as on the Hub).
Each case builds the trainer's own input (`lowrank_jax.train.input.token_input`: the same
tokenizer, sequence length, batch and seed) and pulls batches from it:

  jsonl         data.source=jsonl on the JSON-lines file
  hf            data.source=hf on the Parquet folder (random access, the default for local files)
  hf_streamed   data.source=hf on the Parquet folder with data.hf.streaming=true

Setup (indexing, Arrow preparation, the validation batches) is timed apart. After a few warm-up
batches, each repeat times --batches batches per case, the cases taking turns so that a change of
the machine's load falls on all of them. The goal of issue #29: hf / jsonl >= 0.9.

  python bench/hf_input.py                      # writes bench/results/hf_input.json
  python bench/hf_input.py --batches 2 --repeats 1 --out /tmp/hf_input.json   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from _common import SHARED_DATA, config_module, meta, result_path, set_dotted, write_json

CASES = ("jsonl", "hf", "hf_streamed")


def write_data(folder: str, shards: int, row_group_size: int) -> tuple[str, str, str, int]:
  """(train.jsonl, valid.jsonl, Parquet dataset folder, documents) from the C4 sample."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  def texts(name):
    with open(os.path.join(SHARED_DATA, "c4", name)) as f:
      return [json.loads(line)["text"] for line in f if line.strip()]

  train, valid = texts("train.jsonl"), texts("validation.jsonl")
  paths = {}
  for name, docs in (("train", train), ("valid", valid)):
    paths[name] = os.path.join(folder, f"{name}.jsonl")
    with open(paths[name], "w") as f:
      f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
  dataset = os.path.join(folder, "parquet")
  os.makedirs(os.path.join(dataset, "data"))
  step = -(-len(train) // shards)
  for k in range(shards):
    pq.write_table(pa.table({"text": train[k * step:(k + 1) * step]}),
                   os.path.join(dataset, "data", f"train-{k:05d}-of-{shards:05d}.parquet"),
                   row_group_size=row_group_size)
  pq.write_table(pa.table({"text": valid}), os.path.join(dataset, "data", "validation-00000-of-00001.parquet"))
  return paths["train"], paths["valid"], dataset, len(train)


def build(case: str, args, files):
  from lowrank_jax.train import input as input_lib
  from lowrank_jax.train import resolve

  train, valid, dataset, _ = files
  config = config_module("llama_tiny_adamw").get_config()
  settings = {"data.tokenizer": args.tokenizer, "data.seq_len": args.seq_len, "train.batch_size": args.batch_size,
              "train.eval_batches": 1}
  if case == "jsonl":
    settings.update({"data.source": "jsonl", "data.path": train, "data.eval_path": valid})
  else:
    settings.update({"data.source": "hf", "data.hf.path": dataset,
                     "data.hf.streaming": "true" if case == "hf_streamed" else "auto"})
  for key, value in settings.items():
    set_dotted(config, key, value)
  return input_lib.token_input(resolve(config), process_index=0, process_count=1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=100, help="timed batches per case and repeat")
  parser.add_argument("--warmup", type=int, default=2, help="untimed batches per case first")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--shards", type=int, default=4, help="Parquet files of the training split")
  parser.add_argument("--row_group_size", type=int, default=1000)
  parser.add_argument("--tokenizer", default=os.path.join(SHARED_DATA, "tokenizers", "c4_t5_32k.model"))
  parser.add_argument("--out", default=result_path("hf_input.json"))
  args = parser.parse_args()

  scratch = tempfile.TemporaryDirectory(prefix="hf_input_")
  # Nothing from the network, and datasets' Arrow cache in the scratch folder (read when imported).
  os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=os.path.join(scratch.name, "hf_home"),
                    HF_DATASETS_CACHE=os.path.join(scratch.name, "hf_home", "datasets"), JAX_PLATFORMS="cpu")
  info = meta(args)
  files = write_data(scratch.name, args.shards, args.row_group_size)
  tokens = args.batches * args.batch_size * args.seq_len

  inputs, setup_s = {}, {}
  for case in CASES:
    start = time.perf_counter()
    inputs[case] = build(case, args, files)
    setup_s[case] = time.perf_counter() - start
    for _ in range(args.warmup):
      next(inputs[case].train_iter)
  rates = {case: [] for case in CASES}
  for _ in range(args.repeats):
    for case in CASES:
      iterator = inputs[case].train_iter
      start = time.perf_counter()
      for _ in range(args.batches):
        next(iterator)
      rates[case].append(tokens / (time.perf_counter() - start))

  median = {case: statistics.median(r) for case, r in rates.items()}
  print(f"{files[3]} C4 documents, batches of {args.batch_size} x {args.seq_len} tokens, "
        f"{args.repeats} repeats of {args.batches} batches")
  print(f"{'source':<12} {'setup s':>8} {'tokens/s (median)':>18} {'min':>10} {'max':>10} {'/ jsonl':>8}")
  for case in CASES:
    print(f"{case:<12} {setup_s[case]:>8.2f} {median[case]:>18,.0f} {min(rates[case]):>10,.0f} "
          f"{max(rates[case]):>10,.0f} {median[case] / median['jsonl']:>8.3f}")
  write_json(args.out, {
      "settings": {"seq_len": args.seq_len, "batch_size": args.batch_size, "batches": args.batches,
                   "warmup": args.warmup, "repeats": args.repeats, "shards": args.shards,
                   "row_group_size": args.row_group_size, "tokenizer": os.path.basename(args.tokenizer),
                   "documents": files[3]},
      "cases": {case: {"setup_s": setup_s[case], "tokens_per_s": rates[case], "median_tokens_per_s": median[case]}
                for case in CASES},
      "ratio_hf_to_jsonl": median["hf"] / median["jsonl"],
      "ratio_hf_streamed_to_jsonl": median["hf_streamed"] / median["jsonl"],
      "goal": "ratio_hf_to_jsonl >= 0.9 (issue #29)",
  }, meta=info)
  print(f"wrote {args.out}")
  scratch.cleanup()


if __name__ == "__main__":
  main()
