"""The attention kernels (`model.attention`): one softmax(q k^T / sqrt(H)) v, whichever computes it.

The XLA kernel is checked against the formula in numpy (causal, packed segments, grouped-query
heads); splash, Pallas' TPU kernel, runs here in its interpreter and must agree with XLA, values
and gradients. cuDNN needs a GPU to run: here the model is lowered for CUDA and must hold the fused
calls, forward and backward (the GPU run of bench/gpu_session.sh compares the values). `auto` must
leave a CPU run on XLA.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.models import attend
from lowrank_jax.train import ConfigError, resolve
from lowrank_jax.train.model import model_config
from train_helpers import needs_libtpu, tiny_config

B, T, N, K, H = 2, 128, 4, 2, 16  # 4 query heads over 2 k/v heads; splash tiles 128 tokens


def _inputs():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(B, T, n, H)).astype(np.float32) for n in (N, K, K))
  segments = np.zeros((B, T), np.int32)
  segments[0, 50:] = 1  # the first row packs two examples
  segments[0, 90:] = 2  # ... three
  return q, k, v, segments


def _numpy_attention(q, k, v, segments):
  """softmax over the keys a query may see (its own segment, not after it), in float64."""
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # query head n reads k/v head n // group
  scores = np.einsum("btnh,bsnh->bnts", q.astype(np.float64), k) / np.sqrt(q.shape[-1])
  seen = np.tril(np.ones((T, T), bool))[None] & (segments[:, :, None] == segments[:, None, :])
  scores = np.where(seen[:, None], scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", weights, v)


def test_xla_kernel_is_the_formula():
  q, k, v, segments = _inputs()
  out = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=True, segment_ids=jnp.asarray(segments))
  np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, segments), atol=2e-5)


def test_splash_agrees_with_xla_values_and_gradients():
  q, k, v, segments = (jnp.asarray(x) for x in _inputs())
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)).astype(np.float32))

  def loss(kernel):
    return lambda q, k, v: jnp.sum(attend(q, k, v, causal=True, segment_ids=segments, kernel=kernel,
                                          interpret=True) * cotangent)

  for segment_ids in (segments, None):
    xla = attend(q, k, v, causal=True, segment_ids=segment_ids)
    splash = attend(q, k, v, causal=True, segment_ids=segment_ids, kernel="splash", interpret=True)
    np.testing.assert_allclose(np.asarray(splash), np.asarray(xla), atol=2e-5)
  grads = [jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v) for kernel in ("xla", "splash")]
  for name, want, got in zip("qkv", *grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, err_msg=f"d{name}")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
def test_cudnn_agrees_with_xla_values_and_gradients():
  q, k, v, segments = (jnp.asarray(x) for x in _inputs())
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, N, H)), jnp.bfloat16)
  for segment_ids in (segments, None):
    def loss(kernel):
      return lambda q, k, v: jnp.sum((attend(q, k, v, causal=True, segment_ids=segment_ids, kernel=kernel)
                                      * cotangent).astype(jnp.float32))
    xla, cudnn = (attend(q, k, v, causal=True, segment_ids=segment_ids, kernel=kernel) for kernel in ("xla", "cudnn"))
    np.testing.assert_allclose(np.asarray(cudnn, np.float32), np.asarray(xla, np.float32), atol=2e-2)
    grads = [jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v) for kernel in ("xla", "cudnn")]
    for name, want, got in zip("qkv", *grads):
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=5e-2, rtol=5e-2,
                                 err_msg=f"d{name}")


def _cuda_lowering(fn, *args) -> str:
  """`fn` lowered for CUDA on this host: JAX's cuDNN attention asks for the library's version while it
  traces, so that check is stood in for (nothing is compiled or run)."""
  fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  if not hasattr(fused, "check_cudnn_version"):
    pytest.skip("this JAX checks cuDNN elsewhere")
  real, fused.check_cudnn_version = fused.check_cudnn_version, lambda: 91000
  try:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    fused.check_cudnn_version = real


def test_cudnn_model_lowers_to_fused_calls_forward_and_backward():
  """The tiny LLaMA with model.attention=cudnn (bf16) and the packed-row path (GQA, segment ids as the
  bias), lowered for CUDA: one fused call per block forward and one backward."""
  from flax import nnx
  from lowrank_jax.models import Llama, llama_config
  config = llama_config("tiny", 256, max_seq_len=T, dtype="bfloat16", param_dtype="bfloat16", attention="cudnn")
  graph, params = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
  tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)

  def loss(params, tokens):
    return nnx.merge(graph, params)(tokens).astype(jnp.float32).mean()

  text = _cuda_lowering(jax.grad(loss), params, tokens)
  calls = re.findall(r"@(__cudnn\$fmha\w+)", text)
  assert sorted(set(calls)) == ["__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward"]
  assert len(calls) == 2 * config.n_layers

  q, k = (jax.ShapeDtypeStruct((B, T, n, H), jnp.bfloat16) for n in (N, K))
  segments = jax.ShapeDtypeStruct((B, T), jnp.int32)
  packed = _cuda_lowering(jax.grad(lambda q, k, v, s: attend(q, k, v, causal=True, segment_ids=s, kernel="cudnn")
                                   .astype(jnp.float32).sum(), argnums=(0, 1, 2)), q, k, k, segments)
  assert sorted(set(re.findall(r"@(__cudnn\$fmha\w+)", packed))) == [
      "__cudnn$fmhaScaleBiasSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward"]


def test_auto_is_xla_off_a_gpu_and_cudnn_on_one_for_bfloat16():
  assert resolve(tiny_config()).attention == "xla"  # this host (CI: a CPU)
  assert resolve(tiny_config(), platform="tpu").attention == "xla"
  assert resolve(tiny_config(), platform="gpu").attention == "xla"  # float32: cuDNN's kernel takes 16 bits
  run = resolve(tiny_config(**{"model.dtype": "bfloat16"}), platform="gpu")
  assert run.attention == "cudnn" and run.to_dict()["model"]["attention"] == "auto"
  assert model_config(run, 256).attention == "cudnn"  # the model is built with the resolved kernel


def test_auto_leaves_packed_instruction_rows_on_xla(tmp_path):
  """Segment ids reach cuDNN as a [T, T] bias, not yet checked on a GPU: `auto` keeps XLA for them."""
  from test_instructions import ALPACA, write_jsonl
  config = tiny_config(**{"data.source": "instructions", "data.tokenizer": "byte", "data.seq_len": 256,
                          "data.path": write_jsonl(tmp_path / "alpaca.jsonl", ALPACA * 4), "model.dtype": "bfloat16"})
  assert resolve(config, platform="gpu").attention == "xla"
  config.model.attention = "cudnn"
  assert resolve(config, platform="gpu").attention == "cudnn"


@pytest.mark.parametrize("overrides, platform, says", [
    ({"model.attention": "cudnn"}, "cpu", "cudnn needs a GPU"),
    ({"model.attention": "cudnn"}, "gpu", "model.dtype=bfloat16"),
    ({"model.attention": "splash"}, "gpu", "splash needs a TPU"),
    ({"model.attention": "splash", "data.seq_len": 100}, "tpu", "data.seq_len=100 is not a multiple"),
])
def test_a_kernel_the_run_cannot_use_is_refused_by_name(overrides, platform, says):
  with pytest.raises(ConfigError, match=r"^config\.model\.attention: ") as info:
    resolve(tiny_config(**overrides), platform=platform)
  assert says in str(info.value)


def test_splash_over_a_mesh_of_devices_needs_pmap():
  config = tiny_config(**{"model.attention": "splash", "data.seq_len": 128, "train.batch_size": 4})
  with pytest.raises(ConfigError, match="parallel.mode=pmap"):
    resolve(config, num_devices=2, process_count=1, platform="tpu")
  config.parallel.mode = "pmap"
  assert resolve(config, num_devices=2, process_count=1, platform="tpu").attention == "splash"


@needs_libtpu
def test_splash_compiles_for_a_tpu_and_keeps_no_scores():
  """The tiny model's step for tpu-v5e: splash's peak below XLA's, by about the softmax XLA keeps."""
  from lowrank_jax.train import memory_report
  seq, rows = 1024, 8
  peaks = {kernel: memory_report(tiny_config(**{"model.attention": kernel, "data.seq_len": seq,
                                                "train.batch_size": rows}), "tpu-v5e", 1, only=("step",))
           for kernel in ("xla", "splash")}
  config = model_config(resolve(tiny_config()), 256)
  # XLA's backward keeps each block's float32 softmax [rows, heads, T, T]; splash only a row statistic.
  scores = config.n_layers * rows * config.n_heads * seq * seq * 4
  saved = peaks["xla"]["peak_bytes"] - peaks["splash"]["peak_bytes"]
  assert 0.75 * scores < saved < 1.5 * scores, (saved, scores)
