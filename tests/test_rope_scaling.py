"""Llama 3.1+ rotary frequency scaling (HF ``rope_type: "llama3"``).

The frequencies against an independent numpy version of Meta's ``apply_scaling`` (one
frequency at a time, float64); a tiny scaled checkpoint in both config.json spellings, its
attention against a numpy forward with those frequencies, written back unchanged; other
scaling types refused. ``transformers`` is not installed here, so nothing is compared with it.
"""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax import models
from lowrank_jax.nn.rope import Llama3RopeScaling, rope_frequencies
from test_pretrained import _attention, llama_weights, write_checkpoint

# Llama 3.1 8B's config.json (3.2 1B/3B: factor 32).
LLAMA31 = {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
# For the tiny checkpoint (head dim 8, theta 5e5, wavelengths 6.3, 167, 4443, 118000): one
# frequency kept, one in the smoothed band (64 < 167 < 256), two divided by the factor.
TINY = {'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0, 'original_max_position_embeddings': 256}


def numpy_llama3_inv_freq(head_dim, theta, factor, low_freq_factor, high_freq_factor,
                          original_max_position_embeddings):
  old_len = original_max_position_embeddings
  out = []
  for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / high_freq_factor:
      out.append(freq)
    elif wavelen > old_len / low_freq_factor:
      out.append(freq / factor)
    else:
      smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
      out.append((1 - smooth) * freq / factor + smooth * freq)
  return np.array(out)


def test_llama31_frequencies_equal_numpy_formula():
  got = np.asarray(rope_frequencies(128, 500000.0, Llama3RopeScaling(**LLAMA31)))
  want = numpy_llama3_inv_freq(128, 500000.0, **LLAMA31)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  plain = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
  kept, divided = np.isclose(want, plain, rtol=1e-12), np.isclose(want, plain / 8, rtol=1e-12)
  assert kept.sum() and divided.sum() and (~kept & ~divided).sum()  # all three regimes are checked
  np.testing.assert_array_equal(rope_frequencies(128, 500000.0, None), rope_frequencies(128, 500000.0))


def _numpy_attention(config, w, x, positions, inv):
  """Layer 0's self-attention (HF names and layouts) with inverse frequencies ``inv``."""
  b, t, d = x.shape
  heads, kv = config['num_attention_heads'], config['num_key_value_heads']
  hd = d // heads
  ang = positions[..., None] * inv
  cos, sin = (np.concatenate([f(ang)] * 2, -1)[:, :, None] for f in (np.cos, np.sin))
  rotate_half = lambda y: np.concatenate([-y[..., hd // 2:], y[..., :hd // 2]], -1)  # noqa: E731
  proj = lambda h, n: h @ w[f'model.layers.0.self_attn.{n}_proj.weight'].T  # noqa: E731
  q, k, v = (proj(x, n).reshape(b, t, -1, hd) for n in 'qkv')
  q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
  k, v = np.repeat(k, heads // kv, axis=2), np.repeat(v, heads // kv, axis=2)
  return proj(_attention(q, k, v, np.zeros((b, t), int)).reshape(b, t, d), 'o')


def test_scaled_checkpoint_loads_and_round_trips(tmp_path):
  config, w = llama_weights(tied=True, positions=4096)  # Llama 3.2 1B/3B tie their embeddings
  v4 = {**config, 'rope_scaling': {'rope_type': 'llama3', **TINY}}
  v5 = {k: v for k, v in config.items() if k != 'rope_theta'}
  v5['rope_parameters'] = {'rope_type': 'llama3', 'rope_theta': config['rope_theta'], **TINY}
  src = write_checkpoint(tmp_path / 'v4', v4, w)
  model = models.from_pretrained(src)
  assert model.config.rope_scaling == Llama3RopeScaling(**TINY) and not hasattr(model, 'head')
  assert models.pretrained_config(write_checkpoint(tmp_path / 'v5', v5, w)) == model.config

  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 10, 32))
  positions = np.stack([np.arange(10) * 150 + 500, np.arange(10) * 7])
  inv = numpy_llama3_inv_freq(8, config['rope_theta'], **TINY)
  got = model.layers[0].attn(jnp.asarray(x, jnp.float32), positions=jnp.asarray(positions, jnp.int32))
  np.testing.assert_allclose(got, _numpy_attention(config, w, x, positions, inv), atol=2e-4, rtol=1e-4)

  out = models.save_pretrained(model, tmp_path / 'out', source=src)
  with open(os.path.join(out, 'config.json')) as f:
    saved = json.load(f)
  assert saved['rope_scaling'] == v4['rope_scaling']
  assert saved['rope_parameters'] == v5['rope_parameters']
  assert models.pretrained_config(out) == model.config


def test_other_scaling_types_are_refused_in_one_line(tmp_path):
  config, w = llama_weights(layers=1)
  for kind in ('linear', 'dynamic', 'yarn'):
    scaling = {'rope_type': kind, 'factor': 4.0, 'original_max_position_embeddings': 64}
    v5 = {**config, 'rope_parameters': {**scaling, 'rope_theta': 10000.0}}
    for name, cfg in (('v4', {**config, 'rope_scaling': scaling}), ('v5', v5)):
      with pytest.raises(models.PretrainedError, match=f"rope scaling type '{kind}' is not supported") as e:
        models.pretrained_config(write_checkpoint(tmp_path / f'{kind}_{name}', cfg, w))
      assert '\n' not in str(e.value)
  partial = {**config, 'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0}}
  with pytest.raises(models.PretrainedError, match="\"llama3\" has no 'low_freq_factor'"):
    models.pretrained_config(write_checkpoint(tmp_path / 'partial', partial, w))
