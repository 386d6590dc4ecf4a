"""`train.py --fit`: the memory model against compiled programs, the search, its output and errors.

The figures against the TPU compiler at 1b / 7b are bench/fit_check.py's (not tests); here the
model's parts are checked against independent counts at tiny sizes, and its whole prediction
against XLA:CPU's compiled peak (and tpu-v5e's with the `aot` extra).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lowrank_jax.train import fit, targets
from lowrank_jax.train.config import resolve, with_overrides
from lowrank_jax.train.memory import memory_report
from tests.train_helpers import REPO, needs_libtpu, tiny_config


def _config(**overrides):
  base = {"train.batch_size": 8, "data.seq_len": 64}
  return tiny_config(**{**base, **overrides})


def test_saved_bytes_per_block_is_the_remat_policys_residuals():
  """remat=block keeps each block's input alone: [rows, T, d] float32 per block (the positions are
  shared); without remat a block keeps many times that."""
  run = resolve(_config(), num_devices=1, process_count=1)
  vocab = 512
  rows, seq, d = 3, 64, 128  # (tiny: d_model 128)
  per_block = {remat: fit.saved_bytes(run, vocab, 2, rows, remat=remat) - fit.saved_bytes(run, vocab, 1, rows, remat=remat)
               for remat in ("block", "matmul_inputs", "none")}
  assert per_block["block"] == rows * seq * d * 4
  # the linears' inputs, each value once (q, k, v name one input; gate and up another), and the block's
  # input: 4 x d + d_ff (344) floats a position
  assert per_block["matmul_inputs"] == rows * seq * (4 * d + 344) * 4
  assert per_block["none"] > per_block["matmul_inputs"] > per_block["block"]
  # linear in the rows: what the planner assumes when it traces 1 and 2 rows only
  two, four = (fit.saved_bytes(run, vocab, 2, r, remat="none") for r in (2, 4))
  one = fit.saved_bytes(run, vocab, 2, 1, remat="none")
  assert four - two == 2 * (two - one)


def test_splash_attention_is_searched_on_a_tpu_and_keeps_no_scores():
  """On a TPU target the search tries model.attention=splash; its residuals per block lack the [T, T]
  scores XLA's attention keeps (at least one float32 softmax per head and row)."""
  config = _config(**{"data.seq_len": 128})
  run = resolve(config, num_devices=1, process_count=1)
  assert fit.search_space(run, set(), 1, "tpu")["model.attention"] == ["auto", "splash"]
  assert fit.search_space(run, set(), 1, "gpu")["model.attention"] == ["auto"]
  assert fit.search_space(run, {"model.attention"}, 1, "tpu")["model.attention"] == ["auto"]
  splash = resolve(with_overrides(config, {"model.attention": "splash"}), num_devices=1, process_count=1,
                   platform="tpu")
  rows, heads, seq = 3, 4, 128  # (tiny: 4 heads)
  per_block = {r.attention: fit.saved_bytes(r, 512, 2, rows, remat="none") - fit.saved_bytes(r, 512, 1, rows, remat="none")
               for r in (run, splash)}
  softmax = rows * heads * seq * seq * 4
  assert softmax <= per_block["xla"] - per_block["splash"] < 4 * softmax


def test_capacity_target_answers_without_compiling(monkeypatch):
  def no_compile(*args, **kwargs):
    raise AssertionError("a capacity target must not compile")
  monkeypatch.setattr(targets, "compile_memory", no_compile)
  answer = fit.Planner(_config(), "64MiB", log=lambda _: None).plan()
  assert answer["fits"] and not answer["verified"] and answer["compiles"] == 0
  assert answer["rows"][0]["predicted_bytes"] <= 0.95 * 64 * 2**20


def test_search_keeps_tokens_per_step_and_pinned_settings():
  config = _config(**{"model.remat": "none", "optimizer.clip_mode": "global"})
  planner = fit.Planner(config, "8MiB", pinned={"model.remat"}, log=lambda _: None)
  space = fit.search_space(planner.run, planner.pinned, 1)
  assert space["model.remat"] == ["none"]
  assert space["optimizer.clip_mode"] == ["global", "previous"]  # toward less memory only
  combos = fit.candidates(space)
  assert {} in combos and all("model.remat" not in c for c in combos)
  for overrides in combos[:50]:
    cand = planner.evaluate(overrides)
    if cand is not None:
      t = cand.run.train
      assert t.batch_size == 8 and t.micro_batch * t.grad_accum == 8


def test_nothing_fits_names_the_gap():
  answer = fit.Planner(_config(), "1MiB", log=lambda _: None).plan()
  assert not answer["fits"]
  gap = answer["gap"]
  assert gap["bytes"] > 0 and gap["needs_bytes"] - gap["bytes"] == int(0.95 * 2**20)
  assert any("devices" in h for h in gap["hints"])
  text = fit.format_plan(answer, "python train.py --config c.py")
  assert "nothing fits" in text and "over" in text


def _calibrated_at_its_depth(config, target):
  """The planner's figures at the calibration depth against the compiler's report of that program."""
  planner = fit.Planner(config, target, pinned=set(fit.SEARCH_KEYS), calibration_depth=2, log=lambda _: None)
  cand = planner.evaluate({})
  planner.calibrate(cand)
  state = planner.state(cand.run, 2)
  model = planner.model_bytes(cand.run, 2, state)
  report = memory_report(with_overrides(config, {"model.n_layers": 2}), target, 1, only=("step",))
  return planner, cand, state, model, report


def test_model_against_the_cpu_compiler():
  """Arguments are the compiled program's, exactly; the calibration is what the compiler adds beyond
  the model at that depth; the prediction at full depth adds the traced residuals of the blocks not
  compiled (their accuracy against the TPU compiler at 1b / 7b: bench/fit_check.py)."""
  config = _config(**{"model.n_layers": 4, "model.remat": "none"})
  planner, cand, state, model, report = _calibrated_at_its_depth(config, "cpu")
  assert state["args"] == report["argument_bytes"]
  assert state["args"] + model["step"] + cand.calibration["step"] == report["peak_bytes"]
  # at 4 blocks: two more blocks' arguments, residuals and (clip_mode=global) gradients
  full = planner.state(cand.run)
  grads = (full["trainable"] - state["trainable"]) * 4
  per_block = planner._saved_at(cand.run, 2) - planner._saved_at(cand.run, 1)
  assert cand.predicted - report["peak_bytes"] == full["args"] - state["args"] + 2 * per_block + grads


def test_a_calibration_borrowed_across_structures_is_marked_rough():
  """A candidate takes the calibration of the most alike calibrated one; from other remat / bits /
  clipping / accumulation / FSDP / attention it is only a rough offset, and the table says so."""
  planner = fit.Planner(_config(**{"model.remat": "none"}), "cpu", log=lambda _: None)
  own = planner.evaluate({})
  planner.calibrate(own)
  alike, other = planner.evaluate({"train.loss_chunk_positions": 32}), planner.evaluate({"model.remat": "block"})
  for cand in (alike, other):
    planner.borrow(cand, [own])
  rows = {r["calibration"]: r for r in (fit._row(c, own) for c in (own, alike, other))}
  assert set(rows) == {"own", "same structure", "another structure"}
  answer = {"target": "cpu", "capacity_bytes": planner.capacity, "devices": 1, "headroom": 0.05, "candidates": 3,
            "compiles": 1, "seconds": 1.0, "fits": True, "verified": True, "overrides": {}, "rows": list(rows.values())}
  marked = [line for line in fit.format_plan(answer, "python train.py").splitlines() if line.lstrip().startswith("~")]
  assert len(marked) == 2 and "model.remat=block" in marked[0] and "rough" in marked[1]


@needs_libtpu
def test_model_against_the_tpu_compiler():
  config = _config(**{"model.n_layers": 4, "model.dtype": "bfloat16", "model.param_dtype": "bfloat16"})
  _, cand, state, model, report = _calibrated_at_its_depth(config, "tpu-v5e")
  assert abs(state["args"] / report["argument_bytes"] - 1) < 0.01  # (the TPU pads small arrays' layouts)
  assert state["args"] + model["step"] + cand.calibration["step"] == report["peak_bytes"]


def test_fit_write_gives_a_config_the_trainer_accepts_and_that_fits(tmp_path):
  out = tmp_path / "fitted.py"
  source = REPO / "configs" / "llama_tiny_adamw.py"
  fit.write_config(str(out), str(source), {"model.remat": "block", "train.grad_accum": 2}, {"train.batch_size": 8})
  spec = importlib.util.spec_from_file_location("fitted", out)
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, str(REPO))
  spec.loader.exec_module(module)
  config = module.get_config()
  assert (config.model.remat, config.train.grad_accum, config.train.batch_size) == ("block", 2, 8)
  report = memory_report(config, "cpu", 1)
  assert report["fits"]
  with pytest.raises(fit.FitError, match="exists"):  # never replaces a file
    fit.write_config(str(out), str(source), {}, {})


@pytest.mark.parametrize("target", ["tpu-v9", "24 parsecs", "0GiB"])
def test_bad_target_is_one_line(target):
  with pytest.raises(fit.FitError, match="tpu-v5e"):
    fit.parse_target(target)


def test_cli_fit_on_a_capacity(tmp_path):
  out = tmp_path / "fitted.py"
  result = subprocess.run([sys.executable, "train.py", "--config", "configs/llama_tiny_adamw.py",
                           "--config.train.batch_size=8", "--fit", "64MiB", "--fit_write", str(out)],
                          cwd=REPO, capture_output=True, text=True, env={**os.environ,
                                                                         "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "python train.py --config configs/llama_tiny_adamw.py --config.train.batch_size=8" in result.stdout
  assert out.exists()
  bad = subprocess.run([sys.executable, "train.py", "--config", "configs/llama_tiny_adamw.py", "--fit", "tpu-v9"],
                       cwd=REPO, capture_output=True, text=True)
  assert bad.returncode == 2
  assert bad.stderr.strip().count("\n") == 0 and "--fit" in bad.stderr, bad.stderr


def test_cost_model_counts_remat_and_chunks():
  planner = fit.Planner(_config(), "64MiB", log=lambda _: None)
  base = planner.evaluate({})
  block = planner.evaluate({"model.remat": "block"})
  chunk = planner.evaluate({"train.loss_chunk_positions": 32})
  run = planner.run
  # an independent count, from the model's own kernels: remat adds the blocks' forward (2 FLOPs per
  # multiply-add, attention's scores and values over the whole [T, T]); the chunked loss the head's
  params = _abstract_params(run, planner.vocab)
  block_macs = sum(int(np.prod(k.shape)) for k in jax.tree.leaves(params["layers"]) if k.ndim == 2)
  head_macs = int(np.prod(params["head"]["kernel"].shape))
  d, seq, layers = 128, 64, 2
  tokens = run.train.batch_size * seq
  assert np.isclose(block.flops - base.flops, tokens * (2 * block_macs + layers * 4 * seq * d))
  assert np.isclose(chunk.flops - base.flops, tokens * 2 * head_macs)


def test_gradients_held_once_under_a_waiting_clip_or_accumulation():
  """clip_mode=global holds one full set of gradients (float32 here: the tiny model's parameters);
  with grad_accum > 1 the float32 sum is that set, so the clip adds nothing more."""
  planner = fit.Planner(_config(), "64MiB", log=lambda _: None)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_abstract_params(planner.run, planner.vocab)))

  def step_bytes(**overrides):
    cand = planner.evaluate(overrides)
    return cand.parts["step"]
  clip = {"optimizer.clip_mode": "previous"}
  assert step_bytes() - step_bytes(**clip) == n * 4
  accum = {"train.grad_accum": 2}
  assert step_bytes(**accum) - step_bytes(**accum, **clip) == 0


def _abstract_params(run, vocab):
  from lowrank_jax.train.model import abstract_model, split_model
  return split_model(abstract_model(run, vocab))[1]
