"""Parameter groups (optimizer.embed_lr_scale, optimizer.other_lr_scale): the labels of the real
models, the factor on every leaf for every registered method, and what a factor means (the lr of
AdamW, weight decay included)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax import optim
from lowrank_jax.train import build_optimizer, method_names, resolve
from lowrank_jax.train.model import build_model, split_model
from lowrank_jax.train.setup import vocab_size_of
from train_helpers import tiny_config

EMBED, OTHER = 3.0, 0.25
# Small ranks so every subspace method projects the tiny model's kernels; merges every step.
METHOD_KEYS = {"galore": {"optimizer.galore.rank": 8, "optimizer.galore.update_proj_gap": 2},
               "fira": {"optimizer.fira.rank": 8, "optimizer.fira.update_proj_gap": 2},
               "osd": {"optimizer.osd.rank": 8}, "apollo": {"optimizer.apollo.rank": 8},
               "lora": {"optimizer.lora.rank": 4}, "relora": {"optimizer.lora.rank": 4},
               "mhlora": {"optimizer.mhlora.rank": 4}}


def _paths(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): x
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _params(**overrides):
  run = resolve(tiny_config(**overrides))
  _, params, _ = split_model(build_model(run, vocab_size_of(run), seed=0))
  return run, params


def _expected(path: str, shape) -> str:
  """The tiny models' groups, from their documented parameter names."""
  top = path.split("/")[0]
  if top in ("embed", "head", "pos_embed"):
    return "embed"
  return "other" if len(shape) < 2 else "matrix"


@pytest.mark.parametrize("overrides", [{}, {"optimizer.name": "lora"}, {"model.family": "gpt2"}],
                         ids=["llama", "llama_lora", "gpt2"])
def test_labels_of_the_tiny_models(overrides):
  _, params = _params(**overrides)
  labels = _paths(optim.param_groups(params))
  shapes = {k: v.shape for k, v in _paths(params).items()}
  assert labels == {k: _expected(k, s) for k, s in shapes.items()}
  # The groups the names promise: every kind is there, the head and token embedding are 'embed'.
  assert labels["embed/embedding"] == labels["head/kernel"] == "embed"
  assert labels["final_norm/scale"] == "other" and labels["layers/0/attn/q/kernel"] == "matrix"
  if "optimizer.name" in overrides:
    assert labels["layers/0/attn/q/lora_a"] == labels["layers/0/mlp/down/lora_b"] == "matrix"


def test_factors_of_one_are_the_method_itself():
  tx = optax.adamw(1e-3)
  assert optim.with_groups(tx) is tx  # no chain: today's numbers and today's state tree


@pytest.mark.parametrize("method", method_names())
def test_every_method_scales_each_group_by_its_factor(method):
  """An update of the trainer's optimizer with groups is, leaf by leaf, the update without
  groups times the factor of the leaf's group (hand-labelled), to a float32 rounding (XLA may
  fold the factor into the learning rate's multiply)."""
  # No warmup (ReLoRA's jagged schedule too): the first update would be 0.
  keys = {"optimizer.name": method, "optimizer.weight_decay": 0.1, "optimizer.schedule": "constant",
          "optimizer.warmup": 0.0, **METHOD_KEYS.get(method, {})}
  run, params = _params(**keys)
  grouped = resolve(tiny_config(**keys, **{"optimizer.embed_lr_scale": EMBED, "optimizer.other_lr_scale": OTHER}))
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-2, p.dtype), params)
  txs = [build_optimizer(r)[0] for r in (run, grouped)]

  def update(tx, grads, params):
    state = tx.init(params)
    if optim.uses_split_refresh(state):  # due at the start: projectors from this gradient, as the trainer
      state = optim.refresh_projectors(tx, grads, state, params)
    return tx.update(grads, state, params)[0]

  # One compile for both; arguments, not constants (XLA would fold the whole update at compile time).
  plain, scaled = map(_paths, jax.jit(lambda g, p: [update(tx, g, p) for tx in txs])(grads, params))
  factor = {"embed": EMBED, "other": OTHER, "matrix": 1.0}
  moved = set()
  for path, u in plain.items():
    label = _expected(path, u.shape)
    np.testing.assert_allclose(scaled[path], np.asarray(u) * np.float32(factor[label]), rtol=3e-7, atol=0,
                               err_msg=path)
    if np.any(np.asarray(u) != 0):
      moved.add(label)
  assert moved == {"embed", "other", "matrix"}, moved  # each group's factor was seen acting


def test_a_factor_is_the_groups_learning_rate_weight_decay_included():
  """AdamW then the factors equals, on each leaf, optax's AdamW at lr x factor: the decoupled
  decay (lr x wd x p) scales with the group's rate."""
  lr, wd, s = 1e-2, 0.3, 5.0
  rng = np.random.default_rng(1)
  params = {"embed": {"embedding": rng.normal(size=(6, 4))}, "up": {"kernel": rng.normal(size=(4, 8))}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  grouped = optax.chain(optax.adamw(lr, weight_decay=wd), optim.scale_by_group({"embed": s}))
  references = {"embed": optax.adamw(lr * s, weight_decay=wd), "up": optax.adamw(lr, weight_decay=wd)}
  p, state = params, grouped.init(params)
  q = dict(params)
  ref_states = {k: references[k].init(params[k]) for k in params}
  for _ in range(3):
    g = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    u, state = grouped.update(g, state, p)
    p = optax.apply_updates(p, u)
    for k in q:
      ru, ref_states[k] = references[k].update(g[k], ref_states[k], q[k])
      q[k] = optax.apply_updates(q[k], ru)
  for k in q:
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(p[k])[0]), np.asarray(jax.tree.leaves(q[k])[0]),
                               rtol=1e-6, atol=1e-7, err_msg=k)
