"""The trainer's split projector refresh (GaLore, OSD, Fira): a refresh program run only when due."""

import functools

import jax
import numpy as np

from lowrank_jax.train import methods, setup as setup_lib, train
from train_helpers import saved_params, tiny_config

RUN = {"optimizer.name": "galore", "optimizer.galore.rank": 16, "optimizer.galore.update_proj_gap": 3,
       "optimizer.galore.moments": "rotate", "optimizer.schedule": "constant", "train.steps": 7, "train.log_every": 1, "train.eval_every": 0,
       "train.checkpoint_every": 0, "train.batch_size": 8, "data.seq_len": 32, "train.eval_batches": 1}


def test_split_refresh_resumes_and_equals_one_transform(tmp_path, monkeypatch):
  refreshed_at = []
  original = setup_lib.Setup.refresh_step

  def recording(self, state, tokens):
    refreshed_at.append(int(state.step))
    return original(self, state, tokens)

  monkeypatch.setattr(setup_lib.Setup, "refresh_step", recording)
  # Stopped mid-gap (after step 4; a constant learning rate, so the shorter run is a prefix)
  # and resumed: the refresh schedule is in the optimizer state.
  train(tiny_config(**{**RUN, "train.steps": 4}), str(tmp_path / "split"))
  assert refreshed_at == [0, 3]  # only at refresh steps, in their own program
  summary = train(tiny_config(**RUN), str(tmp_path / "split"))
  assert summary["resumed_from"] == 4 and refreshed_at == [0, 3, 6]

  # The one-transform form (the refresh inside the step's lax.cond) trains the same parameters.
  one_transform = methods.subspace.galore
  monkeypatch.setattr(methods.subspace, "galore", lambda *a, **k: one_transform(*a, **{**k, "split_refresh": False}))
  refreshed_at.clear()
  train(tiny_config(**RUN), str(tmp_path / "inline"))
  assert refreshed_at == []
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
               saved_params(str(tmp_path / "split"), 7), saved_params(str(tmp_path / "inline"), 7))
