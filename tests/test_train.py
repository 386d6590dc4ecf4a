"""The trainer end to end: convergence, resume, accumulation, memory report, bad input."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lowrank_jax.data import samples
from lowrank_jax.train import ConfigError, memory_report, resolve, train
from lowrank_jax.train import loop as loop_lib
from lowrank_jax.train.model import build_model
from lowrank_jax.train.setup import build_setup, init_state
from train_helpers import REPO, saved_params, tiny_config


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_loss_falls_to_the_synthetic_entropy_floor(tmp_path):
  config = tiny_config(**{"train.steps": 150, "train.eval_every": 0, "train.checkpoint_every": 0})
  summary = train(config, str(tmp_path))
  floor = summary["entropy_floor"]
  first = _records(tmp_path)[0]["loss"]
  vocab = config.data.synthetic.vocab_size + 2
  # An untrained model is near-uniform over the vocabulary...
  assert abs(first - np.log(vocab)) < 0.5
  # ...and training must bring the held-out loss close to the language's entropy rate,
  # never meaningfully below it (that would mean the eval leaks or the floor is wrong).
  assert summary["eval_loss"] < floor + 0.15, summary
  assert summary["eval_loss"] > floor - 0.03, summary
  assert summary["steps"] == 150


def test_grad_accumulation_equals_one_big_batch():
  """Four micro-batches of 2 rows take the step of one batch of 8: the same mean loss, gradient norm
  and parameter change. Plain SGD at a constant learning rate of 1 with no clipping, so the change is
  minus the accumulated gradient itself (Adam's first step, about lr * sign(g), would hide a wrong
  scale, and the default warm-up's lr at step 0 is 0, which moves nothing)."""
  tokens = np.random.default_rng(0).integers(2, 258, size=(8, 32), dtype=np.int32)
  results = []
  for accum in (1, 4):
    config = tiny_config(**{"train.batch_size": 8, "train.grad_accum": accum, "data.seq_len": 32,
                            "optimizer.name": "sgd", "optimizer.sgd.momentum": 0.0, "optimizer.lr": 1.0,
                            "optimizer.schedule": "constant", "optimizer.grad_clip": 0.0})
    setup = build_setup(resolve(config), 258)
    state = init_state(setup, 258)
    before = jax.tree.map(lambda x: np.array(x, copy=True), state.params)
    state, metrics = setup.train_step(state, tokens.reshape(accum, 8 // accum, 32))
    assert float(metrics["lr"]) == 1.0 and int(state.step) == 1
    change = jax.tree.map(lambda after, b: np.asarray(after) - b, state.params, before)
    results.append((before, change, float(metrics["loss"]), float(metrics["grad_norm"])))
  (p1, d1, l1, n1), (p4, d4, l4, n4) = results
  jax.tree.map(np.testing.assert_array_equal, p1, p4)  # the same initial parameters
  for name, leaf in jax.tree_util.tree_flatten_with_path(d1)[0]:
    assert np.abs(leaf).max() > 1e-6, f"{jax.tree_util.keystr(name)} did not move"  # the step did something
  assert abs(l1 - l4) < 1e-5
  assert abs(n1 - n4) <= 1e-5 * n1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(a).max()), d1, d4)


def _cli(workdir, *overrides):
  return [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/llama_tiny_adamw.py"),
          "--workdir", str(workdir), "--config.train.progress_bar=False", *overrides]


@pytest.mark.parametrize("method", ["adamw", "qlora"])
def test_resume_after_kill_9_equals_the_uninterrupted_run(tmp_path, method):
  """The real kill -9 (every method resumes bit for bit in tests/test_resume_every_method.py, int8
  weights in tests/test_int8_train.py); QLoRA: LoRA over an NF4 base."""
  # A constant lr: the schedule does not depend on train.steps, so the killed run can be asked for
  # far more steps than it will reach (no race with a slow test process) and resumed to a shorter end.
  common = {"optimizer.schedule": "constant", "train.checkpoint_every": 10, "train.eval_every": 20,
            "train.log_every": 5}
  if method == "qlora":
    common.update({"optimizer.name": "lora", "optimizer.lora.rank": 8, "model.base_bits": 4})
  killed = tmp_path / "killed"
  args = [f"--config.{k}={v}" for k, v in {**common, "train.steps": 100000}.items()]
  log = tmp_path / "stderr.txt"
  with open(log, "w") as err:  # a file, not a pipe: nobody reads a pipe while the run trains
    proc = subprocess.Popen(_cli(killed, *args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    while not (killed / "checkpoints" / "20").exists():  # no wall-clock limit: a loaded machine is slow
      assert proc.poll() is None, log.read_text()[-2000:]
      time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  interrupted_at = max(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  end = interrupted_at + 20

  summary = train(tiny_config(**common, **{"train.steps": end}), str(killed))
  assert summary["resumed_from"] == interrupted_at
  straight = tmp_path / "straight"
  train(tiny_config(**common, **{"train.steps": end}), str(straight))
  a, b = saved_params(str(straight), end), saved_params(str(killed), end)
  jax.tree.map(np.testing.assert_array_equal, a, b)  # exactly, not approximately
  if method == "qlora":  # (the checkpoints hold the NF4 codes of the base)
    assert any(x.dtype == np.uint8 for x in jax.tree.leaves(a))
  # The metrics file reads as one clean run: the same records as the uninterrupted one.
  strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s")} for r in rs]  # noqa: E731
  assert strip(_records(killed)) == strip(_records(straight))


def test_rerunning_a_finished_run_trains_nothing_more(tmp_path):
  config = tiny_config(**{"train.steps": 6, "train.log_every": 3})
  train(config, str(tmp_path))
  before = saved_params(str(tmp_path))
  summary = train(config, str(tmp_path))
  assert summary["resumed_from"] == 6 and summary["steps"] == 6
  jax.tree.map(np.testing.assert_array_equal, before, saved_params(str(tmp_path)))


def test_resuming_with_another_model_is_refused(tmp_path):
  train(tiny_config(**{"train.steps": 2, "train.log_every": 1}), str(tmp_path))
  with pytest.raises(ConfigError, match=r"config\.model.*another --workdir"):
    train(tiny_config(**{"train.steps": 2, "model.tie_embeddings": True}), str(tmp_path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_report_counts_the_real_parameters(dtype):
  config = tiny_config(**{"model.param_dtype": dtype, "model.dtype": dtype})
  report = memory_report(config)
  import flax.nnx as nnx

  model = build_model(resolve(config), 258, seed=0)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert report["params_bytes"] == sum(p.size * p.dtype.itemsize for p in params)
  # AdamW keeps two moments shaped like the parameters (plus scalar counters).
  assert 2 * report["params_bytes"] <= report["opt_state_bytes"] < 2 * report["params_bytes"] + 64
  # Donation: the new state reuses the old state's buffers.
  assert report["alias_bytes"] >= report["params_bytes"] + report["opt_state_bytes"]
  assert report["peak_bytes"] >= report["argument_bytes"]


def test_memory_report_cli_prints_json_last_line():
  out = subprocess.run(_cli("/nonexistent-unused", "--memory_report"), cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  last = json.loads(out.stdout.strip().splitlines()[-1])
  sizes = {"params_bytes", "opt_state_bytes", "argument_bytes", "temp_bytes", "output_bytes", "alias_bytes",
           "peak_bytes", "capacity_bytes"}
  assert set(last) == sizes | {"target", "fits"}
  assert all(isinstance(last[k], int) and last[k] > 0 for k in sizes)
  assert last["target"] == "cpu" and last["fits"] is True  # the default target: this host


C4_METHODS = {
    "adamw": ("llama_tiny_adamw", {}),
    "galore": ("llama_tiny_galore", {"optimizer.galore.update_proj_gap": 10}),
    "osd": ("llama_tiny_osd", {}),
    "lora": ("llama_tiny_lora", {}),
    "relora": ("llama_tiny_relora", {"optimizer.relora.warm_start_steps": 10, "optimizer.relora.merge_every": 10,
                                     "optimizer.relora.restart_warmup_steps": 2}),
    "velora": ("llama_tiny_velora", {}),
    "mhlora": ("llama_tiny_mhlora", {}),
}
# A short run on the shipped C4 sample: 30 steps of 8 x 64 tokens.
C4_RUN = {"data.seq_len": 64, "train.batch_size": 8, "train.steps": 30, "train.log_every": 1,
          "train.eval_batches": 2, "train.eval_every": 0, "train.checkpoint_every": 0}


def _trained_on_c4(workdir, summary, vocab: int, drop: float) -> None:
  """The loss starts near uniform over the padded vocabulary and falls by `drop` in the run."""
  losses = [r["loss"] for r in _records(workdir) if "loss" in r]
  assert abs(losses[0] - np.log(vocab)) < 0.5
  assert np.mean(losses[-5:]) < losses[0] - drop, losses
  assert np.isfinite(summary["eval_loss"])


# jsonl + adamw + the T5 vocabulary: test_data_preset_sample_trains_on_the_shipped_c4.
@pytest.mark.parametrize("source,method", [("tfds", "adamw")] + [("jsonl", m) for m in C4_METHODS if m != "adamw"])
def test_tiny_configs_train_on_the_c4_sample(tmp_path, source, method):
  import importlib

  name, extra = C4_METHODS[method]
  config = importlib.import_module(f"configs.{name}").get_config()
  config.train.progress_bar = False
  # The per-method runs use the byte tokenizer on the C4 text (a 32k-word head would make the
  # tiny model ten times slower), GaLore the shipped 4k GPT-2-format BPE (the Hugging Face
  # tokenizer.json path); TFDS runs the T5 vocabulary.
  tokenizer = {"adamw": samples.T5_TOKENIZER, "galore": samples.GPT2_TOKENIZER}.get(method, "byte")
  settings = {
      "data.source": source,
      "data.path": str(samples.C4_TRAIN),
      "data.eval_path": str(samples.C4_VALIDATION),
      "data.data_dir": str(samples.TFDS_DIR),
      "data.tokenizer": str(tokenizer),
      **C4_RUN, **extra,
  }
  for key, value in settings.items():
    section, *rest = key.split(".")
    node = config[section]
    for part in rest[:-1]:
      node = node[part]
    node[rest[-1]] = value
  summary = train(config, str(tmp_path))
  # (padded vocabulary, the fall asked for). The BPE's tokens carry more each: in 30 steps the loss
  # gets from log(4096) = 8.3 to about the sample's unigram entropy in those tokens, 7.0 nats.
  vocab, drop = {"adamw": (32128, 2.0), "galore": (4096, 0.8)}.get(method, (384, 1.5))
  _trained_on_c4(tmp_path, summary, vocab, drop)


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # ml_collections loading the file
def test_data_preset_sample_trains_on_the_shipped_c4(tmp_path, capfd):
  """`--config.data.preset=sample` on a config file: the shipped C4 sample as jsonl with the T5
  vocabulary, whatever the file and the command line set for the keys the preset gives."""
  from absl import flags
  from ml_collections import config_flags

  argv = ["train.py", f"--config={REPO / 'configs' / 'llama_tiny_adamw.py'}", "--config.data.preset=sample",
          "--config.data.source=text", "--config.data.path=/no/such/file.txt", "--config.data.tokenizer=byte",
          "--config.data.text_key=body", "--config.train.progress_bar=False",
          *(f"--config.{k}={v}" for k, v in C4_RUN.items())]
  flag_values = flags.FlagValues()  # train.py's own flag, parsed as it parses it
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  data = resolve(config).data
  assert (data.preset, data.source, data.text_key) == ("sample", "jsonl", "text")
  assert (data.path, data.eval_path, data.tokenizer) == (
      str(samples.C4_TRAIN), str(samples.C4_VALIDATION), str(samples.T5_TOKENIZER))
  assert all(os.path.isfile(p) for p in (data.path, data.eval_path, data.tokenizer))
  # The run's own smaller sizes are kept (C4_RUN asks for less than SAMPLE_RUN_CAPS)...
  assert (resolve(config).train.batch_size, resolve(config).train.steps) == (8, 30)
  # ...and a paper recipe's (512 x 256 tokens a step, 20k steps) lowered to what the sample feeds.
  paper = importlib.import_module("configs.llama_130m_osd").get_config()
  paper.data.preset = "sample"
  lowered = resolve(paper).train
  assert (lowered.batch_size, lowered.grad_accum, lowered.steps, lowered.eval_batches) == (8, 1, 50, 4)
  summary = train(config, str(tmp_path))
  _trained_on_c4(tmp_path, summary, 32128, 2.0)
  data_line = next(line for line in capfd.readouterr().err.splitlines() if line.startswith("data "))
  assert "jsonl" in data_line and str(samples.C4_TRAIN) in data_line  # the run says what it trains on
  with open(tmp_path / "config.json") as f:
    recorded = json.load(f)["data"]
  assert recorded["preset"] == "sample" and recorded["path"] == str(samples.C4_TRAIN)


# --- bad input: one ConfigError naming the key, raised before anything is compiled ----------

@pytest.fixture
def no_compile(monkeypatch):
  def refuse(*a, **k):
    raise AssertionError("the train step was built before the config was validated")
  monkeypatch.setattr(loop_lib, "build_setup", refuse)


def _jsonl(tmp_path, docs):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  return str(path)


BAD = [
    ({"optimizer.name": "sgdx"}, "optimizer.name", "adamw"),
    ({"model.size": "3b"}, "model.size", "7b"),
    ({"model.dtype": "float16"}, "model.dtype", "bfloat16"),
    ({"data.source": "csv"}, "data.source", "tfds"),
    ({"data.preset": "c4"}, "data.preset", "'sample'"),
    ({"data.source": "jsonl", "data.path": "/no/such/file.jsonl"}, "data.path", "no file matches"),
    ({"data.seq_len": 0}, "data.seq_len", "> 0"),
    ({"train.batch_size": -4}, "train.batch_size", "> 0"),
    ({"train.steps": 0}, "train.steps", "> 0"),
    ({"train.grad_accum": 3}, "train.grad_accum", "must divide"),
    ({"optimizer.lr": 0.0}, "optimizer.lr", "> 0"),
    ({"optimizer.schedule": "linear"}, "optimizer.schedule", "cosine"),
    ({"model.linear.qq": "dense"}, "model.linear.qq", "'gate'"),
    ({"model.linear.q": "fancy"}, "model.linear.q", "'dense'"),
    ({"data.synthetic.vocab_size": 0}, "data.synthetic.vocab_size", "> 0"),
]


@pytest.mark.parametrize("overrides,key,hint", BAD, ids=[b[1] for b in BAD])
def test_bad_config_values_name_the_key(tmp_path, no_compile, overrides, key, hint):
  with pytest.raises(ConfigError) as info:
    train(tiny_config(**overrides), str(tmp_path))
  assert info.value.key == key
  assert str(info.value).startswith(f"config.{key}:")
  assert hint in str(info.value)


def test_missing_tokenizer(tmp_path, no_compile):
  config = tiny_config(**{"data.source": "jsonl", "data.path": _jsonl(tmp_path, ["a b c"] * 10),
                          "data.tokenizer": str(tmp_path / "missing.model")})
  with pytest.raises(ConfigError, match=r"^config\.data\.tokenizer: file not found.*'byte'"):
    train(config, str(tmp_path / "run"))


def test_missing_tfds_dataset_says_how_to_prepare_it(tmp_path, no_compile):
  config = tiny_config(**{"data.source": "tfds", "data.data_dir": str(tmp_path / "nothing_here")})
  with pytest.raises(ConfigError) as info:
    train(config, str(tmp_path / "run"))
  assert info.value.key == "data.tfds_name"
  assert "c4/en" in str(info.value) and "data_dir" in str(info.value)


def test_corpus_too_small_for_one_batch(tmp_path, no_compile):
  config = tiny_config(**{"data.source": "jsonl", "data.path": _jsonl(tmp_path, ["tiny doc"] * 4),
                          "data.eval_path": _jsonl(tmp_path, ["tiny doc"]), "data.seq_len": 512})
  with pytest.raises(ConfigError) as info:
    train(config, str(tmp_path / "run"))
  assert info.value.key == "data.seq_len"
  assert "cannot form one batch" in str(info.value)


def test_cli_bad_value_is_one_line_not_a_traceback(tmp_path):
  out = subprocess.run(_cli(tmp_path, "--config.model.size=3b"), cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("error: config.model.size: unknown value '3b'")
