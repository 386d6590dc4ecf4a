"""Memory targets and the knobs that lower the step's peak (issue #11).

The TPU checks compile for a TPU v5e on this CPU through libtpu (`pip install -e ".[aot]"`);
without it they are skipped. Shapes are tiny and each program is compiled once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowrank_jax import optim
from lowrank_jax.models import Llama, llama_config
from lowrank_jax.train import ConfigError, build_optimizer, format_report, memory_report, resolve
from lowrank_jax.train import targets
from lowrank_jax.train.model import split_model
from lowrank_jax.train.step import make_train_step
from train_helpers import needs_libtpu, tiny_config




# --- config keys ---------------------------------------------------------------------------

@pytest.mark.parametrize("value, policy", [(True, "block"), (False, "none"), ("True", "block"),
                                           ("matmul_inputs", "matmul_inputs")])
def test_remat_takes_policies_and_the_old_bools(value, policy):
  config = tiny_config()
  del config.model["remat"]  # a config written for the old boolean key
  config.model.remat = value
  assert resolve(config).model.remat == policy


def test_remat_policies_give_the_same_gradients():
  """Recomputation changes no number: every policy's loss gradient equals the plain one (CPU)."""
  config = llama_config("tiny", 64, max_seq_len=16)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
  grads = {}
  for policy in ("none", "block", "matmul_inputs"):
    split, params, rest = split_model(Llama(dataclasses.replace(config, remat=policy), rngs=nnx.Rngs(0)))
    loss = lambda p: split.merge(p, rest)(tokens).astype(jnp.float32).std()  # noqa: E731
    grads[policy] = jax.grad(loss)(params)
  for policy in ("block", "matmul_inputs"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads["none"], grads[policy])


def test_bad_memory_settings_name_their_key():
  with pytest.raises(ConfigError, match=r"model\.remat.*'none', 'block', 'matmul_inputs'"):
    resolve(tiny_config(**{"model.remat": "layer"}))
  with pytest.raises(ConfigError, match=r"optimizer\.clip_mode.*'global', 'block', 'previous'"):
    resolve(tiny_config(**{"optimizer.clip_mode": "norm"}))
  with pytest.raises(ConfigError, match=r"train\.accum_dtype.*'float32', 'param'"):
    resolve(tiny_config(**{"train.accum_dtype": "bfloat16"}))
  with pytest.raises(targets.TargetError, match=r"must be one of \['cpu', 'tpu-v5e', 'tpu-v5p', 'tpu-v6e', 'gpu'\]"):
    targets.get_target("tpu-v4")


def test_clip_mode_is_the_trainers_clipping():
  """optimizer.clip_mode picks the transform chained in front of the method (here: previous)."""
  run = resolve(tiny_config(**{"optimizer.clip_mode": "previous", "optimizer.grad_clip": 0.5}))
  tx, _ = build_optimizer(run)
  params = {"w": jnp.ones((3, 2))}
  state = tx.init(params)
  assert isinstance(state[0], optim.ClipByPreviousNormState)


def _capture_gradients() -> optax.GradientTransformation:
  """An optimizer whose state is the gradients it was last given (its updates are zero)."""
  return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                      lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def test_accumulating_in_the_param_dtype():
  """train.accum_dtype='param': the scan carries bf16 sums for bf16 weights, and the step's gradient is
  the mean of the micro-batches' gradients (taken here one micro-batch at a time, outside the step)
  within the bf16 rounding of each partial sum; with float32 sums within one rounding (the mean's)."""
  from lowrank_jax.train.losses import language_model_loss
  from lowrank_jax.train.setup import build_setup, init_state

  accum = 4  # with 2, a bf16 sum then /2 rounds exactly as the float32 one: the two could not differ
  config = tiny_config(**{"model.param_dtype": "bfloat16", "model.dtype": "bfloat16", "train.grad_accum": accum,
                          "train.batch_size": accum, "optimizer.grad_clip": 0.0})
  run = resolve(config)
  setup = build_setup(run, 258)
  capture = _capture_gradients()
  state = init_state(setup, 258)
  state = state._replace(opt_state=capture.init(state.params))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 258, (accum, 1, run.data.seq_len)), jnp.int32)

  @jax.jit
  def micro_grad(tokens):
    def mean_loss(p):
      total, count = language_model_loss(setup.split.merge(p, state.rest), tokens)
      return total / count
    return jax.grad(mean_loss)(state.params)

  micro = [[np.asarray(g, np.float64) for g in jax.tree.leaves(micro_grad(t))] for t in tokens]
  mean = [np.mean(gs, axis=0) for gs in zip(*micro)]
  size = [np.mean(np.abs(gs), axis=0) for gs in zip(*micro)]  # what each element's rounding scales with
  half_ulp = float(jnp.finfo(jnp.bfloat16).eps) / 2  # a bf16 rounding's relative error, at most
  # float32 sums: the mean is rounded once to bf16. bf16 sums: each of the accum - 1 additions rounds,
  # by at most half_ulp * |partial sum| <= half_ulp * accum * size, and the division by accum is exact.
  bound = {"float32": half_ulp, "param": half_ulp * (accum - 1)}
  got = {}
  for dtype in ("float32", "param"):
    step = make_train_step(setup.split, capture, setup.schedule, accum_dtype=dtype)
    jaxpr = jax.make_jaxpr(step)(state, tokens)
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    carried = {str(v.aval.dtype) for v in scans[0].outvars if v.aval.ndim == 2}
    assert carried == ({"bfloat16"} if dtype == "param" else {"float32"})
    grads = jax.tree.leaves(jax.jit(step)(state, tokens)[0].opt_state)
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    got[dtype] = [np.asarray(g, np.float64) for g in grads]
    for g, m, s in zip(got[dtype], mean, size):
      err = np.abs(g - m) - bound[dtype] * s * 1.0001
      assert np.all(err <= 1e-30), (dtype, float(np.max(np.abs(g - m) / np.maximum(s, 1e-30))) / half_ulp)
  assert max(float(np.abs(g).max()) for g in got["float32"]) > 1e-3  # gradients, not zeros
  # And the bf16 sums did round: some elements differ from the float32 sums' result.
  assert sum(int(np.sum(a != b)) for a, b in zip(got["float32"], got["param"])) > 0


def test_report_names_target_capacity_and_margin():
  report = memory_report(tiny_config())
  assert report["target"] == "cpu" and report["fits"] is True and not report["exact"]
  assert 0 < report["peak_bytes"] < report["capacity_bytes"]
  text = format_report(report)
  assert "target cpu" in text and "fits: margin" in text and "capacity" in text


def test_the_gpu_reports_real_step_runs_the_executables_it_measured():
  """`--memory_target=gpu`'s real step, here on the CPU (which has no allocator figures): the refresh
  and step executables the report compiled run on an initialised state, in the loop's order."""
  from lowrank_jax.train import memory
  from lowrank_jax.train.setup import build_setup, vocab_size_of
  run = resolve(tiny_config(**{"optimizer.name": "galore", "optimizer.galore.rank": 8}))
  setup = build_setup(run, vocab_size_of(run))
  ran = []

  def executable(name, fn):
    compiled = targets.compile_program(fn.lower(setup.abstract_state, setup.abstract_tokens()),
                                       targets.get_target("cpu"))[1]
    return lambda *args: ran.append(name) or compiled(*args)

  programs = {name: executable(name, fn) for name, fn in memory.run_programs(setup).items()}
  assert memory._measured_peak(setup, vocab_size_of(run), programs) == (0, 0)
  assert ran == ["refresh", "step"]


# --- the TPU target ------------------------------------------------------------------------

def _tpu():
  targets.prepare_environment("tpu-v5e")
  return targets.get_target("tpu-v5e")


def _model_grad_memory(target, **overrides) -> targets.ProgramMemory:
  """A small LLaMA's gradient program on `target` (batch 32 x 256: activations large enough to live in HBM)."""
  config = llama_config("tiny", 256, max_seq_len=256, **overrides)
  split, params, rest = split_model(nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0))))
  sharding = jax.sharding.SingleDeviceSharding(target.devices(1)[0])
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), params)
  tokens = jax.ShapeDtypeStruct((32, 256), jnp.int32, sharding=sharding)

  def loss(p, tokens):
    logits = split.merge(p, rest)(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  return targets.compile_memory(jax.jit(jax.grad(loss)).lower(params, tokens), target)


@needs_libtpu
def test_tpu_target_remat_and_bf16_lower_the_temporaries():
  target = _tpu()
  assert target.capacity_bytes > 15 * 2**30 and target.exact
  full = _model_grad_memory(target)
  remat = _model_grad_memory(target, remat="block")
  bf16 = _model_grad_memory(target, dtype="bfloat16")
  assert full.temp_bytes > 0 and remat.temp_bytes < 0.5 * full.temp_bytes
  # bf16 activations take about half the bytes of float32 ones (logits and gradients stay float32).
  assert bf16.temp_bytes < 0.7 * full.temp_bytes
  # (The TPU peak also holds a fixed ~100 MiB the compiler reserves per program, so at this size
  # bf16's smaller temporaries do not show in it.)
  assert remat.peak_bytes < full.peak_bytes


def _toy_step_memory(target, clip: str | None) -> targets.ProgramMemory:
  """8 linears of 2048 x 2048 (16 MiB of gradient each), batch 512: a donated AdamW step."""
  sharding = jax.sharding.SingleDeviceSharding(target.devices(1)[0])
  params = [jax.ShapeDtypeStruct((2048, 2048), jnp.float32, sharding=sharding) for _ in range(8)]
  x = jax.ShapeDtypeStruct((512, 2048), jnp.float32, sharding=sharding)
  tx = optax.adamw(1e-3) if clip is None else optax.chain(optim.clip_gradients(clip, 1.0), optax.adamw(1e-3))
  state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                       jax.eval_shape(tx.init, params))

  def loss(ps, x):
    for w in ps:
      x = jnp.tanh(x @ w)
    return jnp.mean(jnp.square(x))

  def step(ps, st, x):
    updates, st = tx.update(jax.grad(loss)(ps, x), st, ps)
    return optax.apply_updates(ps, updates), st

  return targets.compile_memory(jax.jit(step, donate_argnums=(0, 1)).lower(params, state, x), target)


@needs_libtpu
@pytest.mark.parametrize("clip", ["block", "previous"])
def test_tpu_target_block_and_previous_clipping_keep_the_per_layer_release(clip):
  """The issue's toy (8 linears of 2048 x 2048): its step's temporaries stay under one full gradient."""
  memory = _toy_step_memory(_tpu(), clip)
  full_gradient = 8 * 2048 * 2048 * 4
  assert memory.fits and 0 <= memory.temp_bytes < full_gradient / 2
