"""Audit of bad inputs, run as a new user would: does each one get ONE line naming its key or file?

  python bench/bad_inputs.py                 # every case (about 10 minutes of CPU)
  python bench/bad_inputs.py -k lr -k jsonl  # only cases whose name holds one of these
  python bench/bad_inputs.py --list

Every case is a `python train.py ...` command run from the repository root in a
subprocess (a tiny config, a scratch workdir), sometimes after preparing files or a
trained workdir to damage. A case passes when the command
  - exits with the expected code (2 for a bad input, 3 for a run that diverged, 0 for a
    rerun that has nothing to do),
  - prints no Python traceback,
  - answers in at most two lines besides the trainer's own progress lines, and
  - that answer names what the case expects: the config key, or the file (and line).
Cases that need a trained workdir share one 4-step run, copied per case. Children run
with a 16 GiB address-space limit so a size that is not refused cannot take the machine
down. Writes bench/results/bad_inputs.json and prints a table.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from _common import RESULTS as RESULTS_DIR, ROOT, SHARED_DATA, meta, write_json

REPO = Path(ROOT)
SHARED = Path(SHARED_DATA)
C4_TRAIN = SHARED / "c4" / "train.jsonl"
T5_MODEL = SHARED / "tokenizers" / "c4_t5_32k.model"
TFDS_DIR = SHARED / "tfds"
RESULTS = Path(RESULTS_DIR) / "bad_inputs.json"

CONFIG = "configs/llama_tiny_adamw.py"
# Small enough that a bad input which is (wrongly) accepted trains for seconds, not minutes.
TINY = ["--config.data.seq_len=32", "--config.train.batch_size=4", "--config.train.eval_batches=1",
        "--config.train.steps=4", "--config.train.log_every=1", "--config.train.eval_every=0",
        "--config.train.progress_bar=False"]
# The trained workdir that damage cases start from: checkpoints at steps 2 and 4.
TRAINED = [*TINY, "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=3"]

TRACEBACK = "Traceback (most recent call last)"
# Lines the trainer prints on its way (not part of the answer).
_INFO = re.compile(r"^(model|method|data|devices)\s|^step \d+|^resumed from|^started from|^done:|^\s{2}\S"
                   r"|^W\d{4} |^I\d{4} |^WARNING: All log messages|^Pass --helpshort")


@dataclasses.dataclass
class Case:
  name: str
  args: list[str]  # after `python train.py`; {tmp} = the case's scratch folder, {work} = its workdir
  expect: tuple[str, ...]  # substrings the answer must hold (key, file, file:line); {tmp} expanded
  rc: int = 2
  setup: Callable[[Path], None] | None = None
  trained: bool = False  # start from a copy of the shared trained workdir
  config: str | None = CONFIG  # None: no --config flag at all
  tiny: bool = True
  env: dict | None = None
  needs: str = ""  # "mount": a tmpfs is mounted by setup (skipped when that is not allowed)


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
  def setup(tmp: Path) -> None:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
  return setup


def _both(*setups) -> Callable[[Path], None]:
  def setup(tmp: Path) -> None:
    for s in setups:
      s(tmp)
  return setup


def _jsonl(n: int = 60, text: str = "a small document of plain words " * 8) -> str:
  return "".join(json.dumps({"text": f"{text} {i}"}) + "\n" for i in range(n))


def _checkpoint_file(work: Path, step: int) -> Path:
  """The largest array file of a checkpoint step (what a truncated copy loses first)."""
  files = [Path(p) for p in glob.glob(str(work / "checkpoints" / str(step) / "**" / "*"), recursive=True)
           if os.path.isfile(p) and "params" in p]
  return max(files, key=lambda p: p.stat().st_size)


def _truncate_newest(tmp: Path) -> None:
  target = _checkpoint_file(tmp / "work", 4)
  with open(target, "r+b") as f:
    f.truncate(target.stat().st_size // 3)


def _zero_newest(tmp: Path) -> None:
  target = _checkpoint_file(tmp / "work", 4)
  target.write_bytes(b"\0" * target.stat().st_size)


def _drop_checkpoints(tmp: Path) -> None:
  shutil.rmtree(tmp / "work" / "checkpoints")


def _mount(tmp: Path, options: str) -> None:
  (tmp / "mnt").mkdir()
  subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(tmp / "mnt")], check=True,
                 capture_output=True)


def _gqa_checkpoint(tmp: Path) -> None:
  """A tiny Hugging Face LLaMA with grouped-query attention: q, o 32 x 32 but k, v 32 x 16."""
  import numpy as np
  from safetensors.numpy import save_file

  d, ff, kv, vocab = 32, 48, 16, 300
  rng = np.random.default_rng(0)
  w = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
  weights = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": np.ones(d, np.float32),
             "lm_head.weight": w(vocab, d), "model.layers.0.input_layernorm.weight": np.ones(d, np.float32),
             "model.layers.0.post_attention_layernorm.weight": np.ones(d, np.float32)}
  for name, shape in {"self_attn.q_proj": (d, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                      "self_attn.o_proj": (d, d), "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d),
                      "mlp.down_proj": (d, ff)}.items():
    weights[f"model.layers.0.{name}.weight"] = w(*shape)
  (tmp / "gqa").mkdir()
  save_file(weights, str(tmp / "gqa" / "model.safetensors"), metadata={"format": "pt"})
  (tmp / "gqa" / "config.json").write_text(json.dumps({
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
      "intermediate_size": ff, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1,
      "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}))


def _files_for_text_source(tmp: Path) -> None:
  (tmp / "ok.txt").write_text("".join(f"line {i} of some text\n" for i in range(50)))


EIGHT = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # 8 host devices
JSONL = ["--config.data.source=jsonl", "--config.data.path={tmp}/d.jsonl"]
# A bad record in the middle of a file is met when training reads it: short documents (an epoch
# in about 20 steps), enough steps to read them all, and a separate good validation file.
MID = [*JSONL, "--config.data.eval_path={tmp}/eval.jsonl", "--config.train.steps=60"]
TEXT = ["--config.data.source=text"]
TFDS = ["--config.data.source=tfds", f"--config.data.data_dir={TFDS_DIR}", "--config.data.tfds_name=c4/en:3.1.0"]


def cases() -> list[Case]:
  c = Case
  good_jsonl = _write("d.jsonl", _jsonl())
  return [
      # --- the command line -------------------------------------------------------------
      c("no --config", [], ("--config",), config=None),
      c("config file missing", ["--config=configs/nope.py"], ("configs/nope.py",), config=None),
      c("config is a folder", ["--config=configs"], ("configs",), config=None),
      c("config with a syntax error", ["--config={tmp}/broken.py"], ("broken.py",), config=None,
        setup=_write("broken.py", "def get_config(:\n  pass\n")),
      c("config without get_config", ["--config={tmp}/empty.py"], ("empty.py", "get_config"), config=None,
        setup=_write("empty.py", "X = 1\n")),
      c("positional argument", ["extra_word"], ("extra_word",)),
      c("unknown flag", ["--stepz=3"], ("stepz",)),
      c("unknown key", ["--config.train.stepz=3"], ("train.stepz", "steps")),
      c("unknown section", ["--config.trainer.steps=3"], ("trainer",)),
      c("value of the wrong type", ["--config.train.steps=abc"], ("train.steps",)),
      c("model.linear.q with an unknown kind", ["--config.model.linear.q=nope"], ("model.linear.q", "dense")),
      c("model.linear with an unknown layer", ["--config.model.linear.zz=lora"], ("model.linear.zz", "'q'")),
      c("workdir is a file", ["--workdir={tmp}/afile"], ("afile",), setup=_write("afile", "x")),
      c("workdir under a file", ["--workdir={tmp}/afile/run"], ("afile",), setup=_write("afile", "x")),
      c("workdir read-only", ["--workdir={tmp}/mnt/run"], ("mnt",), needs="mount",
        setup=lambda tmp: _mount(tmp, "ro,size=1M")),
      c("disk full at the first checkpoint", ["--workdir={tmp}/mnt/run", "--config.train.checkpoint_every=2"],
        ("mnt", "No space left"), rc=1, needs="mount", setup=lambda tmp: _mount(tmp, "size=600k")),
      c("memory_report with a bad key", ["--memory_report", "--config.model.size=3b"], ("model.size",)),
      # --- numbers ---------------------------------------------------------------------
      c("steps = 0", ["--config.train.steps=0"], ("train.steps",)),
      c("steps negative", ["--config.train.steps=-5"], ("train.steps",)),
      c("steps fractional", ["--config.train.steps=1.5"], ("train.steps",)),
      c("batch_size = 0", ["--config.train.batch_size=0"], ("train.batch_size",)),
      c("grad_accum = 0", ["--config.train.grad_accum=0"], ("train.grad_accum",)),
      c("grad_accum does not divide batch", ["--config.train.grad_accum=3"], ("train.grad_accum",)),
      c("log_every = 0", ["--config.train.log_every=0"], ("train.log_every",)),
      c("eval_every negative", ["--config.train.eval_every=-1"], ("train.eval_every",)),
      c("checkpoint_every negative", ["--config.train.checkpoint_every=-1"], ("train.checkpoint_every",)),
      c("keep_checkpoints = 0", ["--config.train.keep_checkpoints=0"], ("train.keep_checkpoints",)),
      c("eval_batches = 0", ["--config.train.eval_batches=0"], ("train.eval_batches",)),
      c("seq_len = 1", ["--config.data.seq_len=1"], ("data.seq_len",)),
      c("seq_len = 0", ["--config.data.seq_len=0"], ("data.seq_len",)),
      c("seed negative", ["--config.seed=-1"], ("seed",)),
      c("seed out of range", ["--config.seed=99999999999999999999"], ("seed",)),
      c("seed fractional", ["--config.seed=1.5"], ("seed",)),
      c("lr = 0", ["--config.optimizer.lr=0"], ("optimizer.lr",)),
      c("lr negative", ["--config.optimizer.lr=-1e-3"], ("optimizer.lr",)),
      c("lr nan", ["--config.optimizer.lr=nan"], ("optimizer.lr",)),
      c("lr inf", ["--config.optimizer.lr=inf"], ("optimizer.lr",)),
      c("warmup > 1", ["--config.optimizer.warmup=1.5"], ("optimizer.warmup",)),
      c("warmup nan", ["--config.optimizer.warmup=nan"], ("optimizer.warmup",)),
      c("min_lr_ratio > 1", ["--config.optimizer.min_lr_ratio=2.0"], ("optimizer.min_lr_ratio",)),
      c("b1 = 1", ["--config.optimizer.b1=1.0"], ("optimizer.b1",)),
      c("b2 negative", ["--config.optimizer.b2=-0.1"], ("optimizer.b2",)),
      c("eps negative", ["--config.optimizer.eps=-1.0"], ("optimizer.eps",)),
      c("eps inf", ["--config.optimizer.eps=inf"], ("optimizer.eps",)),
      c("weight_decay negative", ["--config.optimizer.weight_decay=-0.1"], ("optimizer.weight_decay",)),
      c("weight_decay nan", ["--config.optimizer.weight_decay=nan"], ("optimizer.weight_decay",)),
      c("grad_clip negative", ["--config.optimizer.grad_clip=-1.0"], ("optimizer.grad_clip",)),
      c("grad_clip inf", ["--config.optimizer.grad_clip=inf"], ("optimizer.grad_clip",)),
      # --- choices ---------------------------------------------------------------------
      c("model.family unknown", ["--config.model.family=bert"], ("model.family", "llama")),
      c("model.size unknown", ["--config.model.size=3b"], ("model.size", "tiny")),
      c("model.dtype unknown", ["--config.model.dtype=float16"], ("model.dtype", "bfloat16")),
      c("model.param_dtype unknown", ["--config.model.param_dtype=int8"], ("model.param_dtype",)),
      c("model.vocab_multiple = 0", ["--config.model.vocab_multiple=0"], ("model.vocab_multiple",)),
      c("optimizer.name unknown", ["--config.optimizer.name=adam"], ("optimizer.name", "adamw")),
      c("schedule unknown", ["--config.optimizer.schedule=linear"], ("optimizer.schedule", "cosine")),
      c("parallel.mode unknown", ["--config.parallel.mode=tpu"], ("parallel.mode", "pmap")),
      c("fsdp with pmap", ["--config.parallel.mode=pmap", "--config.parallel.fsdp=True"], ("parallel.fsdp",)),
      c("shard_heads with adamw", ["--config.parallel.shard_heads=True"], ("parallel.shard_heads",)),
      c("velora layer unknown", ["--config.model.velora.layers=zz:8"], ("model.velora.layers",)),
      c("velora size not dividing", ["--config.model.velora.layers=v:7"], ("model.velora.layers",)),
      c("velora v_init unknown", ["--config.model.velora.layers=v:8", "--config.model.velora.v_init=zero"],
        ("model.velora.v_init",)),
      c("velora scale nan", ["--config.model.velora.layers=v:8", "--config.model.velora.scale=nan"],
        ("model.velora.scale",)),
      # --- methods ---------------------------------------------------------------------
      c("galore rank 0", ["--config.optimizer.name=galore", "--config.optimizer.galore.rank=0"],
        ("optimizer.galore.rank",)),
      c("galore rank larger than every matrix", ["--config.optimizer.name=galore",
                                                 "--config.optimizer.galore.rank=100000"],
        ("optimizer.galore.rank",)),
      c("galore scale nan", ["--config.optimizer.name=galore", "--config.optimizer.galore.scale=nan"],
        ("optimizer.galore.scale",)),
      c("galore proj_type unknown", ["--config.optimizer.name=galore", "--config.optimizer.galore.proj_type=up"],
        ("optimizer.galore.proj_type",)),
      c("galore update_proj_gap 0", ["--config.optimizer.name=galore",
                                     "--config.optimizer.galore.update_proj_gap=0"],
        ("optimizer.galore.update_proj_gap",)),
      c("osd rank 0", ["--config.optimizer.name=osd", "--config.optimizer.osd.rank=0"], ("optimizer.osd.rank",)),
      c("osd scale inf", ["--config.optimizer.name=osd", "--config.optimizer.osd.scale=inf"],
        ("optimizer.osd.scale",)),
      c("lora rank 0", ["--config.optimizer.name=lora", "--config.optimizer.lora.rank=0"],
        ("optimizer.lora.rank",)),
      c("lora rank 100000 on tiny", ["--config.optimizer.name=lora", "--config.optimizer.lora.rank=100000"],
        ("optimizer.lora.rank",)),
      c("lora layer unknown", ["--config.optimizer.name=lora", "--config.optimizer.lora.layers=q,zz"],
        ("optimizer.lora.layers",)),
      c("lora alpha nan", ["--config.optimizer.name=lora", "--config.optimizer.lora.alpha=nan"],
        ("optimizer.lora.alpha",)),
      c("lora dropout 1.5", ["--config.optimizer.name=lora", "--config.optimizer.lora.dropout=1.5"],
        ("optimizer.lora.dropout",)),
      c("galore rank over some layers (warning)", ["--config.model.init_from={tmp}/gqa", "--config.optimizer.name=galore",
                                                   "--config.optimizer.galore.rank=20"],
        ("optimizer.galore.rank=20", "k (16), v (16)"), rc=0, setup=_gqa_checkpoint),
      c("lora rank over some layers (warning)", ["--config.model.init_from={tmp}/gqa", "--config.optimizer.name=lora",
                                                 "--config.optimizer.lora.rank=20"],
        ("optimizer.lora.rank=20", "k (16), v (16)"), rc=0, setup=_gqa_checkpoint),
      c("relora merge_every 0", ["--config.optimizer.name=relora", "--config.optimizer.relora.merge_every=0"],
        ("optimizer.relora.merge_every",)),
      c("relora prune unknown", ["--config.optimizer.name=relora", "--config.optimizer.relora.prune=all"],
        ("optimizer.relora.prune",)),
      c("relora prune_ratio 2", ["--config.optimizer.name=relora", "--config.optimizer.relora.prune_ratio=2.0"],
        ("optimizer.relora.prune_ratio",)),
      c("relora warm_start_from missing", ["--config.optimizer.name=relora",
                                           "--config.optimizer.relora.warm_start_from={tmp}/no_such_run"],
        ("optimizer.relora.warm_start_from",)),
      c("mhlora heads 0", ["--config.optimizer.name=mhlora", "--config.optimizer.mhlora.num_heads=0"],
        ("optimizer.mhlora.num_heads",)),
      c("mhlora mode unknown", ["--config.optimizer.name=mhlora", "--config.optimizer.mhlora.mode=serial"],
        ("optimizer.mhlora.mode",)),
      c("batch not divisible by 8 devices", ["--config.train.batch_size=12"], ("train.batch_size",), env=EIGHT),
      # --- memory: the state must fit where the run lives -----------------------------------
      c("7b adamw over the host memory", ["--config.model.size=7b"],
        ("model.size='7b'", "does not fit", "train.check_memory=False")),
      c("7b lora over 8 host devices", ["--config.model.size=7b", "--config.optimizer.name=lora",
                                        "--config.train.batch_size=8"], ("8 host devices", "optimizer.lora.rank"), env=EIGHT),
      c("1b galore bf16 over the host memory x 8 devices", ["--config.model.size=1b", "--config.optimizer.name=galore",
                                                            "--config.model.param_dtype=bfloat16",
                                                            "--config.train.batch_size=8"],
        ("model.size='1b'", "model.param_dtype='bfloat16'", "optimizer.galore.rank"), env=EIGHT),
      c("check_memory not a boolean", ["--config.train.check_memory=maybe"], ("train.check_memory",)),
      # --- data ------------------------------------------------------------------------
      c("data.source unknown", ["--config.data.source=csv"], ("data.source", "jsonl")),
      c("jsonl without a path", ["--config.data.source=jsonl"], ("data.path",)),
      c("data file missing", ["--config.data.source=jsonl", "--config.data.path={tmp}/missing.jsonl"],
        ("data.path", "missing.jsonl")),
      c("data glob matches nothing", ["--config.data.source=jsonl", "--config.data.path={tmp}/none*.jsonl"],
        ("data.path", "none*.jsonl")),
      c("jsonl malformed at line 40", MID, ("d.jsonl:40",),
        setup=_both(_write("eval.jsonl", _jsonl()), _write("d.jsonl", _jsonl(39, "w") + '{"text": "cut\n'
                                                             + _jsonl(30, "w")))),
      c("jsonl text not a string", MID, ("d.jsonl:25", "text"),
        setup=_both(_write("eval.jsonl", _jsonl()), _write("d.jsonl", _jsonl(24, "w") + '{"text": 17}\n'
                                                             + _jsonl(40, "w")))),
      c("jsonl record not an object", MID, ("d.jsonl:3",),
        setup=_both(_write("eval.jsonl", _jsonl()), _write("d.jsonl", _jsonl(2, "w") + '["a", "list"]\n'
                                                             + _jsonl(60, "w")))),
      c("jsonl text_key wrong", [*JSONL, "--config.data.text_key=body"], ("text_key", "body"), setup=good_jsonl),
      c("jsonl text_key missing later", MID, ("d.jsonl:31", "text"),
        setup=_both(_write("eval.jsonl", _jsonl()), _write("d.jsonl", _jsonl(30, "w") + '{"body": "x"}\n'
                                                             + _jsonl(40, "w")))),
      c("jsonl empty file", JSONL, ("data.path", "d.jsonl"), setup=_write("d.jsonl", "")),
      c("jsonl only blank lines", JSONL, ("data.path", "d.jsonl"), setup=_write("d.jsonl", "\n  \n\n")),
      c("jsonl compressed", ["--config.data.source=jsonl", "--config.data.path={tmp}/d.jsonl.gz"],
        ("d.jsonl.gz",), setup=_write("d.jsonl.gz", b"\x1f\x8b\x08\x00" + bytes(40))),
      c("jsonl is a binary file", JSONL, ("d.jsonl",), setup=_write("d.jsonl", bytes(range(256)) * 40)),
      c("text is a binary file", [*TEXT, "--config.data.path={tmp}/d.bin"], ("d.bin",),
        setup=_write("d.bin", b"\x7fELF\x02\x01\x01" + bytes(range(256)) * 40)),
      c("text not UTF-8 at line 30", [*TEXT, "--config.data.path={tmp}/d.txt", "--config.train.steps=60",
                                      "--config.data.eval_path={tmp}/eval.txt"], ("d.txt:30",),
        setup=_both(_write("eval.txt", "a longer line of plain text for validation\n" * 20),
                    _write("d.txt", b"".join(b"line %d\n" % i for i in range(29)) + b"caf\xe9 latin-1\n"
                           + b"".join(b"more %d\n" % i for i in range(40))))),
      c("text empty file", [*TEXT, "--config.data.path={tmp}/d.txt"], ("data.path", "d.txt"),
        setup=_write("d.txt", "")),
      c("text one line only", [*TEXT, "--config.data.path={tmp}/d.txt"], ("data.eval_path",),
        setup=_write("d.txt", "only one document\n")),
      c("too little data for one batch", [*TEXT, "--config.data.path={tmp}/d.txt",
                                          "--config.data.eval_path={tmp}/d.txt"], ("data.seq_len",),
        setup=_write("d.txt", "ab\ncd\n")),
      c("eval_path missing", [*JSONL, "--config.data.eval_path={tmp}/nope.jsonl"], ("data.eval_path",),
        setup=good_jsonl),
      c("eval_holdout 0", [*JSONL, "--config.data.eval_holdout=0.0"], ("data.eval_holdout",), setup=good_jsonl),
      c("eval_holdout 1.5", [*JSONL, "--config.data.eval_holdout=1.5"], ("data.eval_holdout",), setup=good_jsonl),
      c("tokenizer file missing", [*JSONL, "--config.data.tokenizer={tmp}/t.model"], ("data.tokenizer", "t.model"),
        setup=good_jsonl),
      c("tokenizer is not a tokenizer", [*JSONL, "--config.data.tokenizer={tmp}/d.jsonl"],
        ("data.tokenizer", "d.jsonl"), setup=good_jsonl),
      c("tokenizer is a folder", [*JSONL, "--config.data.tokenizer={tmp}"], ("data.tokenizer",), setup=good_jsonl),
      c("tokenizer is an empty file", [*JSONL, "--config.data.tokenizer={tmp}/t.model"], ("data.tokenizer",),
        setup=_both(good_jsonl, _write("t.model", ""))),
      c("tfds text_key wrong", [*TFDS, "--config.data.text_key=body", f"--config.data.tokenizer={T5_MODEL}"],
        ("data.text_key", "body")),
      c("tfds name unknown", [*TFDS, "--config.data.tfds_name=c5/en"], ("data.tfds_name", "c5/en")),
      c("tfds name malformed", [*TFDS, "--config.data.tfds_name=c4/en:3.1"], ("data.tfds_name",)),
      c("tfds split unknown", [*TFDS, "--config.data.eval_split=test"], ("data.eval_split", "test")),
      c("tfds train split unknown", [*TFDS, "--config.data.train_split=training"], ("data.train_split",)),
      c("synthetic branching > vocab", ["--config.data.synthetic.branching=300"], ("data.synthetic.branching",)),
      c("synthetic stop_prob 0", ["--config.data.synthetic.stop_prob=0.0"], ("data.synthetic.stop_prob",)),
      c("synthetic vocab 0", ["--config.data.synthetic.vocab_size=0"], ("data.synthetic.vocab_size",)),
      # --- an existing workdir ---------------------------------------------------------
      c("resume with another model size", ["--config.model.size=60m"], ("model",), trained=True),
      c("resume with another seed", ["--config.seed=7"], ("seed",), trained=True),
      c("resume with another method", ["--config.optimizer.name=galore"], ("optimizer.name",), trained=True),
      c("resume with another seq_len", ["--config.data.seq_len=64"], ("data.seq_len",), trained=True),
      c("metrics but no checkpoint", [], ("--restart",), trained=True, setup=_drop_checkpoints),
      c("finished run rerun", [], ("finished",), trained=True, rc=0),
      c("newest checkpoint truncated", ["--config.train.steps=6"], ("4.corrupt",), trained=True,
        setup=_truncate_newest, rc=0),
      c("newest checkpoint zeroed", ["--config.train.steps=6"], ("4.corrupt",), trained=True, setup=_zero_newest,
        rc=0),
      c("diverging (lr 1e30, no clipping)", ["--config.optimizer.lr=1e30", "--config.optimizer.grad_clip=0.0",
                                            "--config.train.steps=40", "--config.train.log_every=5"],
        ("diverged", "optimizer.lr"), rc=3),
      c("diverging on resume keeps the checkpoints", ["--config.optimizer.lr=1e30", "--config.train.steps=40"],
        ("diverged", "step 4"),
        trained=True, rc=3),
      c("relora warm_start_from without checkpoints", ["--config.optimizer.name=relora",
                                                       "--config.optimizer.relora.warm_start_from={tmp}"],
        ("optimizer.relora.warm_start_from",)),
  ]


def _limit_memory() -> None:
  limit = 16 * 2**30
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _answer(stderr: str) -> tuple[str, int]:
  """(the answer line, how many lines the answer takes) from a run's stderr."""
  lines = [line for line in stderr.splitlines() if line.strip() and not _INFO.search(line)]
  errors = [line for line in lines if line.startswith(("error:", "FATAL"))]
  warnings = [line for line in lines if line.startswith("warning:")]
  answer = (errors or warnings or lines or [""])[-1]
  return answer, len(lines)


def _can_mount() -> bool:
  with tempfile.TemporaryDirectory() as d:
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True).returncode == 0
    if ok:
      subprocess.run(["umount", d], check=True)
  return ok


def run_case(case: Case, scratch: Path, trained_dir: Path | None) -> dict:
  tmp = scratch / re.sub(r"\W+", "_", case.name)
  tmp.mkdir()
  work = tmp / "work"
  if case.trained:
    shutil.copytree(trained_dir, work)
  if case.setup:
    case.setup(tmp)
  sub = lambda s: s.replace("{tmp}", str(tmp)).replace("{work}", str(work))  # noqa: E731
  args = [sys.executable, "train.py"]
  if case.config:
    args.append(f"--config={case.config}")
  if not any(a.startswith("--workdir") for a in case.args):
    args.append(f"--workdir={work}")
  args += [sub(a) for a in (*(TINY if case.tiny and case.config else []), *case.args)]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(case.env or {})
  start = time.perf_counter()
  out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, preexec_fn=_limit_memory)
  seconds = time.perf_counter() - start
  if case.needs == "mount":
    subprocess.run(["umount", str(tmp / "mnt")], capture_output=True)
  both = out.stdout + out.stderr
  answer, lines = _answer(out.stderr)
  expect = [sub(e) for e in case.expect]
  named = all(e in answer for e in expect)
  traceback = TRACEBACK in both
  ok = out.returncode == case.rc and not traceback and lines <= 2 and named
  return {"case": case.name, "command": " ".join(args[1:]), "rc": out.returncode, "expected_rc": case.rc,
          "traceback": traceback, "answer_lines": lines, "answer": answer, "expect": expect, "names_it": named,
          "ok": ok, "seconds": round(seconds, 1), "stderr_tail": out.stderr[-1500:] if not ok else ""}


def train_workdir(scratch: Path) -> Path:
  work = scratch / "trained"
  args = [sys.executable, "train.py", f"--config={CONFIG}", f"--workdir={work}", *TRAINED]
  out = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
  if out.returncode != 0:
    sys.exit(f"the 4-step run that damage cases start from failed:\n{out.stderr[-3000:]}")
  return work


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("-k", action="append", default=[], help="run cases whose name holds this (repeatable)")
  parser.add_argument("--list", action="store_true")
  parser.add_argument("--out", default=str(RESULTS))
  parser.add_argument("--jobs", type=int, default=1, help="cases run at once (each is one process)")
  opts = parser.parse_args()
  selected = [c for c in cases() if not opts.k or any(k.lower() in c.name.lower() for k in opts.k)]
  if opts.list:
    print("\n".join(c.name for c in selected))
    return
  info = meta(opts)
  mountable = _can_mount()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix="bad_inputs_") as d:
    scratch = Path(d)
    trained = train_workdir(scratch) if any(c.trained for c in selected) else None

    def one(case: Case) -> dict:
      if case.needs == "mount" and not mountable:
        return {"case": case.name, "skipped": "cannot mount a tmpfs here (needs root)"}
      result = run_case(case, scratch, trained)
      mark = "ok " if result["ok"] else "BAD"
      print(f"{mark} {result['rc']:>3} {'TB' if result['traceback'] else '  '} {result['answer_lines']:>2} "
            f"{result['seconds']:>5.1f}s  {case.name:<38} {result['answer'][:110]}", flush=True)
      return result

    with concurrent.futures.ThreadPoolExecutor(max(1, opts.jobs)) as pool:
      results = list(pool.map(one, selected))

  ran = [r for r in results if "skipped" not in r]
  summary = {"cases": len(ran), "ok": sum(r["ok"] for r in ran), "tracebacks": sum(r["traceback"] for r in ran),
             "wrong_exit_code": sum(r["rc"] != r["expected_rc"] for r in ran),
             "not_one_line": sum(r["answer_lines"] > 2 for r in ran),
             "not_naming_key_or_file": sum(not r["names_it"] for r in ran),
             "skipped": len(results) - len(ran), "jobs": opts.jobs, "wall_s": round(time.perf_counter() - start, 1),
             "load_average_1min_at_end": round(os.getloadavg()[0], 1), "cpus": os.cpu_count()}
  print("\n" + "  ".join(f"{k} {v}" for k, v in summary.items()))
  for r in ran:
    if not r["ok"]:
      print(f"  BAD {r['case']}: rc {r['rc']} (want {r['expected_rc']}), traceback {r['traceback']}, "
            f"{r['answer_lines']} lines, expected {r['expect']} in: {r['answer'][:200]}")
  write_json(opts.out, {"summary": summary, "results": results}, meta=info)
  print(f"wrote {opts.out}")


if __name__ == "__main__":
  main()
