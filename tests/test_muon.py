"""Muon (optimizer.name=muon): the kernels' update against a numpy Muon, AdamW on the rest, 8-bit
momentum, and a tiny run whose loss falls. Resuming (32- and 8-bit states) is in
test_resume_every_method.py."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import optim
from lowrank_jax.train import build_optimizer, resolve, train
from lowrank_jax.train.methods import decay_mask
from train_helpers import tiny_config

NS = (3.4445, -4.7750, 2.0315)  # the quintic's coefficients (Jordan et al.)


def newton_schulz(m: np.ndarray, steps: int) -> np.ndarray:
  """The reference Muon's orthogonalisation, in float64."""
  x = m / (np.linalg.norm(m) + 1e-8)
  tall = x.shape[0] > x.shape[1]
  if tall:
    x = x.T
  a, b, c = NS
  for _ in range(steps):
    g = x @ x.T
    x = a * x + (b * g + c * g @ g) @ x
  return x.T if tall else x


def _params(rng):
  shapes = {("layers", "0", "mlp", "up", "kernel"): (24, 40), ("layers", "0", "mlp", "down", "kernel"): (40, 24),
            ("embed", "embedding"): (50, 24), ("head", "kernel"): (24, 50), ("final_norm", "scale"): (24,)}
  params = {}
  for path, shape in shapes.items():
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = rng.normal(size=shape).astype(np.float32)
  return params


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("nesterov,consistent_rms", [(True, 0.2), (False, None)])
def test_kernels_get_newton_schulz_of_the_momentum_and_the_rest_adamw(nesterov, consistent_rms):
  lr, beta, wd, steps, ns_steps = 0.02, 0.9, 0.1, 3, 5
  rng = np.random.default_rng(0)
  params = _params(rng)
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(steps)]
  tx = optim.muon(lr, beta=beta, ns_steps=ns_steps, nesterov=nesterov, consistent_rms=consistent_rms,
                  weight_decay=wd, weight_decay_mask=decay_mask)
  adamw = optax.adamw(lr, weight_decay=wd, mask=decay_mask)  # what every other leaf must get
  p, q = jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, params)
  state, adam_state = tx.init(p), adamw.init(q)
  ref = {k: v.astype(np.float64) for k, v in _flat(params).items() if "kernel" in k and "head" not in k}
  momentum = {k: 0.0 for k in ref}
  for t, g in enumerate(grads, start=1):
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    adam_updates, adam_state = adamw.update(g, adam_state, q)
    q = optax.apply_updates(q, adam_updates)
    flat_g = _flat(g)
    for k in ref:
      gk = flat_g[k].astype(np.float64)
      momentum[k] = beta * momentum[k] + (1 - beta) * gk
      if nesterov:
        m = beta * momentum[k] / (1 - beta ** (t + 1)) + (1 - beta) * gk / (1 - beta ** t)
      else:
        m = momentum[k] / (1 - beta ** t)
      fan_in, fan_out = gk.shape
      k_shape = (consistent_rms * np.sqrt(max(fan_in, fan_out)) if consistent_rms
                 else np.sqrt(max(1.0, fan_out / fan_in)))
      ref[k] = ref[k] - lr * (k_shape * newton_schulz(m, ns_steps) + wd * ref[k])
  got, adam, start = _flat(p), _flat(q), _flat(params)
  for k, want in ref.items():  # float32 Newton-Schulz against float64
    np.testing.assert_allclose(got[k], want, rtol=0, atol=2e-5, err_msg=k)
    assert np.abs(got[k] - start[k]).max() > 1e-3, k  # it moved
  for k in set(got) - set(ref):  # the embedding, the head, the norm: optax's AdamW
    np.testing.assert_allclose(got[k], adam[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_8bit_states_code_the_muon_momentum():
  run = resolve(tiny_config(**{"optimizer.name": "muon", "optimizer.state_bits": 8}))
  tx, _ = build_optimizer(run)
  params = {"layers": {"0": {"attn": {"q": {"kernel": jnp.ones((128, 128))}}}},
            "embed": {"embedding": jnp.ones((300, 128))}}
  coded = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      jax.eval_shape(tx.init, params), is_leaf=lambda x: isinstance(x, optim.QuantizedArray))[0]
      if isinstance(x, optim.QuantizedArray)}
  kernel = [k for k in coded if "'muon'" in k and "kernel" in k]
  assert len(kernel) == 1 and ".mu" in kernel[0], coded.keys()  # Muon's momentum, one byte per element
  assert coded[kernel[0]].codes.dtype == jnp.uint8
  embedding = [k for k in coded if "embedding" in k]
  assert len(embedding) == 2 and all("'adam'" in k for k in embedding), embedding  # AdamW's mu and nu too


def test_tiny_muon_trains(tmp_path):
  from configs import llama_tiny_muon

  config = llama_tiny_muon.get_config()
  config.train.progress_bar = False
  config.train.steps, config.train.log_every, config.train.eval_every = 30, 5, 0
  config.data.seq_len, config.train.batch_size = 32, 8
  summary = train(config, str(tmp_path))
  losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").open() if '"loss"' in line]
  assert summary["method"] == "muon"
  assert losses[-1] < losses[0] - 1.0, losses
