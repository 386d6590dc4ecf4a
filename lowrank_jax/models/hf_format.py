"""What a model family tells ``pretrained.py`` to read and write its Hugging Face checkpoints.

Each family module builds one :class:`HFFormat` (config.json <-> its config, its parameter
paths <-> HF tensor names) and puts it in its :class:`~lowrank_jax.models.family.Family`
record; ``pretrained.py`` holds only the machinery every family shares (files, shards,
layouts, sharded placement), so a family's checkpoint format lives in the family's file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

__all__ = ['HFFormat', 'OVERRIDES', 'PretrainedError', 'Tensors', 'hf_get', 'layer_norm_tensors']

# our parameter path -> (HF tensor name, layout). Layouts: 'copy' (same array), 'linear'
# (torch [out, in] <-> kernel [in, out]), 'fused{j}' (block j of 3 along the last axis: GPT-2's
# c_attn into q, k, v), 'conv{C}' (ViT's Conv2d [d, C, p, p] <-> kernel [(p, p, C), d]),
# 'squeeze{k}' (k leading axes of size 1 dropped: ViT's class token and positions).
Tensors = dict[tuple, tuple[str, str]]

# Config fields every family lets a caller choose over config.json (per-family extras are added).
OVERRIDES = ('dtype', 'param_dtype', 'remat', 'attention')

_NOTHING = re.compile(r'(?!)')


class PretrainedError(ValueError):
  """A model directory that cannot be read as (or written to) a Hugging Face checkpoint."""


@dataclasses.dataclass(frozen=True)
class HFFormat:
  """One family's Hugging Face checkpoint format."""
  # (config.json, overrides) -> our config.
  config_from_hf: Callable[[dict, dict], Any]
  # (our config, the config.json it came from or {}) -> the config.json keys we set.
  config_to_hf: Callable[[Any, dict], dict]
  tensors: Callable[[Any], Tensors]
  # Config fields a caller may choose; everything else comes from config.json.
  overrides: tuple[str, ...]
  # Names a checkpoint may use for one of ours (GPT-2 hub files were saved without 'transformer.').
  aliases: Callable[[str], tuple[str, ...]] = lambda name: (name,)
  # Checkpoint entries that are buffers, not weights (or a tied head saved anyway).
  ignored: re.Pattern = _NOTHING
  # Tensors freshly initialised when the checkpoint lacks them or holds another shape (a new head).
  replaceable: re.Pattern = _NOTHING


def hf_get(hf: dict, key: str, default: Any = None, *, required: bool = False) -> Any:
  """``hf[key]`` (or ``default``); a missing required key is a :class:`PretrainedError` naming it."""
  if required and key not in hf:
    raise PretrainedError(f'config.json has no {key!r}, needed for {hf.get("architectures")}')
  return hf.get(key, default)


def layer_norm_tensors(ours: tuple, theirs: str) -> Tensors:
  """A LayerNorm's scale and bias: HF's ``<theirs>.weight`` and ``<theirs>.bias``."""
  return {(*ours, 'scale'): (f'{theirs}.weight', 'copy'), (*ours, 'bias'): (f'{theirs}.bias', 'copy')}
