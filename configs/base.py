"""Shared defaults for every configuration; other configs state only what differs.

Every key is declared once, beside its default, its check and a comment, in the typed
settings the trainer resolves this config into:
  model.*, data.*, train.*, parallel.*, optimizer.* (shared by every method)
                         lowrank_jax/train/settings.py (seed: default_config in lowrank_jax/train/config.py)
  optimizer.<method>.*   the method's settings, in its file under lowrank_jax/train/methods/
                         (optimizer.sgd, .lora, .relora, .galore, .osd, .apollo, .apollo_mini, .fira, .mhlora)
docs/configuration.md (generated from them by docs/render.py) lists them. Override any key
on the command line:
  python train.py --config configs/llama_tiny_adamw.py --config.optimizer.lr=3e-3
A value that cannot work stops the run before compilation with one line naming the key
and the valid choices (exit status 2).
"""

import ml_collections

from lowrank_jax.train.config import default_config


def get_config() -> ml_collections.ConfigDict:
  return default_config()
