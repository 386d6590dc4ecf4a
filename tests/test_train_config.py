"""The config resolved once: typed settings, defaults from one place, errors naming keys, old runs readable."""

from __future__ import annotations

import importlib.util
import json

import pytest

from lowrank_jax.train import ConfigError, default_config, method_names, resolve
from lowrank_jax.train.config import RunConfig
from lowrank_jax.train.loop import _check_resumable, _leaves
from train_helpers import REPO, tiny_config


def test_resolve_is_typed_frozen_and_round_trips():
  run = resolve(tiny_config(**{"optimizer.name": "relora", "optimizer.lora.rank": 8}))
  assert isinstance(run, RunConfig) and run.method.NAME == "relora" and run.method.lora.rank == 8
  with pytest.raises(AttributeError):
    run.train.steps = 5  # frozen
  assert resolve(run) is run  # a RunConfig passes through
  # config.json holds the values in the config's own layout: resolving it back gives the same run.
  config = default_config()
  config.update_from_flattened_dict(_leaves(run.to_dict()))
  assert resolve(config) == run


def test_base_config_is_the_settings_defaults():
  from configs import base

  config = base.get_config()
  assert config.to_dict() == default_config().to_dict()
  assert {"sgd", "galore", "osd", "lora", "relora", "mhlora"} <= set(config.optimizer)
  assert "lora" not in config.optimizer.relora  # ReLoRA reads optimizer.lora, it does not copy it


@pytest.mark.parametrize("overrides,key,hint", [
    ({"optimizer.name": "galore", "optimizer.galore.refresh": "qr"}, "optimizer.galore.refresh", "randomized"),
    ({"optimizer.name": "galore", "optimizer.galore.moments": "drop"}, "optimizer.galore.moments", "rotate"),
    ({"optimizer.name": "osd", "optimizer.osd.proj_type": "diag"}, "optimizer.osd.proj_type", "reverse_std"),
    ({"optimizer.name": "mhlora", "optimizer.mhlora.mode": "serial"}, "optimizer.mhlora.mode", "parallel"),
    ({"model.velora.v_init": "zeros"}, "model.velora.v_init", "batch_average"),
    ({"train.checkpoint_every": -1}, "train.checkpoint_every", ">= 0"),
    ({"optimizer.warmup": 1.0}, "optimizer.warmup", "[0.0, 1.0)"),
])
def test_choices_come_from_the_library(overrides, key, hint):
  with pytest.raises(ConfigError) as info:
    resolve(tiny_config(**overrides))
  assert info.value.key == key and hint in str(info.value)


def test_resume_check_reads_configs_written_before_a_key_existed(tmp_path):
  run = resolve(tiny_config())
  old = run.to_dict()
  del old["model"]["velora"]["scale"]  # a run written before the key existed
  (tmp_path / "config.json").write_text(json.dumps(old))
  _check_resumable(str(tmp_path), run, has_checkpoint=True)  # the default stands in: resumable
  changed = resolve(tiny_config(**{"model.velora.scale": 2.0}))
  (tmp_path / "config.json").write_text(json.dumps(old))
  with pytest.raises(ConfigError) as info:
    _check_resumable(str(tmp_path), changed, has_checkpoint=True)
  assert info.value.key == "model.velora.scale"


def _docs_render():
  """docs/render.py as a module (docs/ is not a package)."""
  spec = importlib.util.spec_from_file_location("docs_render", REPO / "docs" / "render.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_configuration_reference_is_generated_from_the_settings():
  """docs/configuration.md is what docs/render.py writes from the settings now: a new or changed
  setting (or its comment) without a regenerated page fails here. Fix: python docs/render.py."""
  page = _docs_render().configuration_page()
  assert (REPO / "docs" / "configuration.md").read_text() == page, (
      "docs/configuration.md is out of date: run python docs/render.py")
  for key in _leaves(default_config().to_dict()):  # and the generator misses no key
    assert f"`{key}`" in page, f"{key} is not in docs/configuration.md"
  for name in method_names():
    assert f"### `{name}`" in page, name
