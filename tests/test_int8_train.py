"""The trainer with int8 weights (`model.weight_bits=8`): every method trains, a run resumes rounding
the same way, export gives the int8 model's logits, and the 7B config fits a TPU v5e (opt-in)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import models
from lowrank_jax.nn import int8_weight
from lowrank_jax.train import ConfigError, resolve, targets, train
from train_helpers import REPO, saved_params


SMALL = {"model.weight_bits": 8, "data.seq_len": 32, "train.batch_size": 8, "train.log_every": 1,
         "train.eval_every": 0, "train.checkpoint_every": 0, "train.eval_batches": 1, "train.progress_bar": False}

METHODS = {
    "adamw": {},
    "sgd": {},
    # GaLore and APOLLO-Mini as the 7B configs run them: with 8-bit optimizer states as well.
    "galore": {"optimizer.galore.update_proj_gap": 10, "optimizer.state_bits": 8},
    "osd": {},
    "apollo": {"optimizer.apollo.update_proj_gap": 10},
    "apollo_mini": {"optimizer.apollo_mini.update_proj_gap": 10, "optimizer.state_bits": 8},
    "fira": {"optimizer.fira.update_proj_gap": 10},
    "lora": {},
    "relora": {"optimizer.relora.warm_start_steps": 10, "optimizer.relora.merge_every": 10,
               "optimizer.relora.restart_warmup_steps": 2},
    "mhlora": {},
}


def _tiny(method="adamw", **overrides):
  config = importlib.import_module(f"configs.llama_tiny_{method}").get_config()
  config.update_from_flattened_dict({**SMALL, **METHODS[method], **overrides})
  return config


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _int8_leaves(params):
  """{path: (codes, scale)} of a checkpoint's int8 weights; asserts no kernel or embedding is float."""
  flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  out = {}
  for path, x in flat.items():
    if path.endswith("['codes']"):
      base = path[:-len("['codes']")]
      assert x.dtype == np.int8 and flat[base + "['scale']"].dtype == np.float32, path
      # A scale per column (kernels) or per row (the embedding: per token).
      assert flat[base + "['scale']"].shape in ((1, x.shape[1]), (x.shape[0], 1)), path
      out[base] = (x, flat[base + "['scale']"])
    else:
      assert not path.endswith(("['kernel']", "['embedding']")), f"{path} is stored as {x.dtype}"
  return out


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
  """The AdamW run of the method test, also the uninterrupted run of the resume test (checkpoints at
  15 and 30; saving changes no number)."""
  workdir = tmp_path_factory.mktemp("adamw") / "run"
  return workdir, train(_tiny("adamw", **{"train.steps": 30, "train.checkpoint_every": 15}), str(workdir))


def _initial_codes(config):
  """{path: codes} of the int8 weights a run of `config` starts from."""
  from lowrank_jax.train.model import build_model, split_model, store_weights

  run = resolve(config)
  params = store_weights(run, split_model(build_model(run, 258, seed=run.seed))[1])
  return {"".join(f"['{getattr(k, 'key', k)}']" for k in p): np.asarray(w.codes)  # (as _int8_leaves names them)
          for p, w in jax.tree_util.tree_flatten_with_path(params, is_leaf=int8_weight.is_int8)[0]
          if int8_weight.is_int8(w)}


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_with_int8_weights(tmp_path, request, method):
  if method == "adamw":
    tmp_path, summary = request.getfixturevalue("adamw_run")
  else:
    summary = train(_tiny(method, **{"train.steps": 30}), str(tmp_path))
  losses = _losses(tmp_path)
  assert summary["method"] == method and len(losses) == 30 and np.isfinite(summary["eval_loss"])
  assert np.mean(losses[-5:]) < losses[0] - 0.5, losses  # measured: 0.66 (mhlora) to 3.6 (galore) nats
  int8 = _int8_leaves(saved_params(str(tmp_path)))
  # 2 layers x 7 linears, the head and the embedding.
  assert len(int8) == 16 and "['embed']['embedding']" in int8 and "['head']['kernel']" in int8, sorted(int8)
  # Against the run's initial codes (its seed's model, rounded to nearest): every weight moved, but
  # LoRA's frozen kernels (zero updates every step) are bit-identical.
  initial = _initial_codes(_tiny(method))
  assert initial.keys() == int8.keys()
  for path, (codes, _) in int8.items():
    frozen = method == "lora" and "['layers']" in path
    changed = np.mean(codes != initial[path])
    assert changed == 0 if frozen else changed > 0.01, (path, changed)


def test_resume_rounds_the_same_as_the_uninterrupted_run(adamw_run, tmp_path):
  """Stopped after step 15 (its newest checkpoint deleted by hand, as a kill -9 before the save at 30
  leaves it) and resumed: the same codes and scales at step 30, bit for bit."""
  straight, _ = adamw_run
  resumed = shutil.copytree(straight, tmp_path / "resumed")
  shutil.rmtree(resumed / "checkpoints" / "30")
  summary = train(_tiny("adamw", **{"train.steps": 30, "train.checkpoint_every": 15}), str(resumed))
  assert summary["resumed_from"] == 15
  at15, at30 = _int8_leaves(saved_params(str(straight), 15)), _int8_leaves(saved_params(str(straight), 30))
  assert np.mean([np.mean(at15[k][0] != at30[k][0]) for k in at15]) > 0.05  # the resumed steps rounded codes
  jax.tree.map(np.testing.assert_array_equal, saved_params(str(straight), 30), saved_params(str(resumed), 30))
  with open(resumed / "metrics.jsonl") as a, open(straight / "metrics.jsonl") as b:
    timing = ("tokens_per_s", "step_time_s")
    assert [{k: v for k, v in json.loads(r).items() if k not in timing} for r in a] == \
        [{k: v for k, v in json.loads(r).items() if k not in timing} for r in b]


def test_a_run_with_other_weight_bits_is_refused_naming_the_key(adamw_run, tmp_path):
  workdir = shutil.copytree(adamw_run[0], tmp_path / "run")
  with pytest.raises(ConfigError, match=r"^config\.model\.weight_bits: differs .*\(8 there, 16 now\)"):
    train(_tiny("adamw", **{"train.steps": 40, "model.weight_bits": 16}), str(workdir))


def test_export_gives_the_int8_models_logits(tmp_path):
  from lowrank_jax.train.model import build_model, split_model, store_weights

  out = str(tmp_path / "export")
  config = _tiny(**{"train.steps": 3, "model.export_to": out})
  run = resolve(config)  # (before the export exists: a run refuses to overwrite one)
  train(config, str(tmp_path / "run"))
  params = saved_params(str(tmp_path / "run"))
  int8 = _int8_leaves(params)
  # The trained int8 model: the run's own int8 layout (store_weights of a fresh model) holding the
  # checkpoint's codes and scales.
  split, fresh, rest = split_model(build_model(run, 258, seed=0))
  key = lambda path: tuple(str(getattr(k, "key", k)) for k in path)  # noqa: E731
  stored = lambda x: isinstance(x, dict) and "codes" in x  # noqa: E731  (an Int8Weight as the checkpoint holds it)
  saved = {key(p): x for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=stored)[0]}
  templates, treedef = jax.tree_util.tree_flatten_with_path(store_weights(run, fresh), is_leaf=int8_weight.is_int8)
  assert len(saved) == len(templates)
  as_int8 = treedef.unflatten([
      dataclasses.replace(t, codes=jnp.asarray(saved[key(p)]["codes"]), scale=jnp.asarray(saved[key(p)]["scale"]))
      if int8_weight.is_int8(t) else jnp.asarray(saved[key(p)]) for p, t in templates])
  model = split.merge(as_int8, rest, evaluation=True)
  exported = models.from_pretrained(out)
  # The exported tensors are codes x scale (numpy), exactly.
  embed, q = int8["['embed']['embedding']"], int8["['layers']['0']['attn']['q']['kernel']"]
  np.testing.assert_array_equal(np.asarray(exported.embed.embedding[...]), embed[0].astype(np.float32) * embed[1])
  np.testing.assert_array_equal(np.asarray(exported.layers[0].attn.q.kernel[...]), q[0].astype(np.float32) * q[1])
  tokens = jnp.asarray(np.random.default_rng(6).integers(0, 258, size=(2, 16)), jnp.int32)
  got, want = np.asarray(exported(tokens)), np.asarray(model(tokens))
  assert got.shape == want.shape == (2, 16, 384)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


SEVEN_B = REPO / "configs" / "llama_7b_apollo_mini.py"


@pytest.mark.skipif(not targets.libtpu_available(), reason='the TPU target needs libtpu: pip install -e ".[aot]"')
@pytest.mark.skipif(os.environ.get("LOWRANK_SLOW_AOT") != "1",
                    reason="a 7B compile for a TPU v5e takes about 10 minutes: set LOWRANK_SLOW_AOT=1")
def test_llama_7b_apollo_mini_with_int8_weights_fits_a_tpu_v5e():
  from lowrank_jax.train import memory_report

  config = importlib.import_module("configs.llama_7b_apollo_mini").get_config()
  # Offline: the built-in source with the recipe's vocabulary (T5's 32,101), not the Hub's C4.
  config.data.source, config.data.tokenizer, config.data.synthetic.vocab_size = "synthetic", "", 32101 - 2
  assert config.model.weight_bits == 8
  report = memory_report(config, "tpu-v5e", only=("step",))
  assert report["target"] == "tpu-v5e" and report["exact"]
  # About one byte per parameter: 6.7B int8 codes, float32 scales per column and the float norms.
  assert 6.5e9 < report["params_bytes"] < 7.0e9, report["params_bytes"]
  assert report["fits"] and report["peak_bytes"] <= report["capacity_bytes"], {k: v for k, v in report.items()
                                                                               if k != "programs"}
