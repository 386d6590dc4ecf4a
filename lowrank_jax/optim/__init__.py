"""lowrank_jax.optim: low-rank gradient projection optimizers as Optax transforms.

Usable in any Optax code: nothing here imports the rest of ``lowrank_jax``.

* :func:`scale_by_galore` / :func:`galore`: GaLore (Zhao et al., 2024).
* :func:`scale_by_osd` / :func:`osd`: Online Subspace Descent (Liang et al., 2024).
* :func:`apollo` / :func:`apollo_mini` / :func:`scale_by_apollo`: APOLLO (Zhu et al., 2024).
* :func:`fira` / :func:`scale_by_fira`: Fira (Chen et al., 2024).
  Each takes ``learning_rate`` (the optimizers) and ``rank`` by position and
  the rest by keyword, in one order the four share.
* :mod:`lowrank_jax.optim.subspace`: the transform all four share
  (:func:`scale_by_subspace`, pluggable projector and lift rules) and the split
  refresh program (:func:`refresh_due`, :func:`refresh_projectors`).
* :mod:`lowrank_jax.optim.projection`: the shared projection core (matrix
  views, projection sides, SVD / randomized / online-PCA refreshes, the
  default projection mask).
* :func:`relora` / :func:`freeze_adapted_kernels`: ReLoRA merges, re-inits
  and moment pruning (Lialin et al., 2023); :func:`jagged_cosine_schedule`.
* :func:`lte_merge`: LTE multi-head LoRA merges (Huh et al., 2024), also with
  the heads spread over devices (``axis_name``).
* :func:`quantize_state`: 8-bit block-wise optimizer states for any
  transform (Dettmers et al., 2022).
* :func:`muon`: Muon (Jordan et al., 2024) on the linears' kernels, AdamW on
  the rest; the full-rank baseline beside AdamW.
* :func:`param_groups` / :func:`scale_by_group` / :func:`with_groups`: a
  learning-rate multiplier per kind of parameter (embeddings and head, other
  non-matrix leaves, matrices) for any transform.
* :func:`clip_by_global_norm` / :func:`global_norm`: global-norm clipping
  when some leaves are split over a device axis.
* :func:`clip_gradients` (``CLIP_MODES``): ``global``, per-leaf ``block`` RMS
  (:func:`clip_by_block_rms`) or the ``previous`` step's norm
  (:func:`clip_by_previous_norm`); the last two keep a compiled step's per-layer
  gradient release.
"""

from lowrank_jax.optim.clipping import (CLIP_MODES, ClipByPreviousNormState, clip_by_block_rms,
                                        clip_by_global_norm, clip_by_previous_norm, clip_gradients,
                                        global_norm)

from lowrank_jax.optim.galore import GaLoreState, galore, scale_by_galore
from lowrank_jax.optim.osd import OSDState, osd, scale_by_osd
from lowrank_jax.optim.subspace import (SubspaceState, refresh_due, refresh_projectors, scale_by_subspace,
                                        steps_to_refresh, uses_split_refresh)
from lowrank_jax.optim.apollo import apollo, apollo_mini, scale_by_apollo
from lowrank_jax.optim.fira import fira, scale_by_fira
from lowrank_jax.optim.groups import GROUPS, lora_b_labels, param_groups, scale_by_group, scale_lora_b, with_groups
from lowrank_jax.optim.lte import LTEState, lte_head_mask, lte_layer_paths, lte_leaf_roles, lte_merge
from lowrank_jax.optim.projection import (
    DEFAULT_EXCLUDED_KEYS,
    PROJ_TYPES,
    MatrixAxes,
    MatrixView,
    RandomizedRefresh,
    captured_energy,
    default_projection_mask,
    effective_rank,
    matrix_view,
    online_pca_grad,
    online_pca_loss,
    orthonormality_error,
    path_key_names,
    principal_angles,
    project,
    project_back,
    projection_sides,
    randomized_projector,
    svd_projectors,
)
from lowrank_jax.optim.muon import muon
from lowrank_jax.optim.quantize import QuantizedArray, QuantizedState, quantize_state
from lowrank_jax.optim.relora import ReLoRAState, adapted_layer_paths, freeze_adapted_kernels, relora
from lowrank_jax.optim.schedules import jagged_cosine_schedule

__all__ = [
    'GaLoreState',
    'LTEState',
    'ReLoRAState',
    'adapted_layer_paths',
    'CLIP_MODES',
    'ClipByPreviousNormState',
    'clip_by_block_rms',
    'clip_by_global_norm',
    'clip_by_previous_norm',
    'clip_gradients',
    'freeze_adapted_kernels',
    'global_norm',
    'GROUPS',
    'muon',
    'param_groups',
    'scale_by_group',
    'scale_lora_b',
    'lora_b_labels',
    'with_groups',
    'jagged_cosine_schedule',
    'lte_head_mask',
    'lte_layer_paths',
    'lte_leaf_roles',
    'lte_merge',
    'relora',
    'QuantizedArray',
    'QuantizedState',
    'quantize_state',
    'OSDState',
    'galore',
    'scale_by_galore',
    'osd',
    'scale_by_osd',
    'SubspaceState',
    'refresh_due',
    'refresh_projectors',
    'scale_by_subspace',
    'steps_to_refresh',
    'uses_split_refresh',
    'apollo',
    'apollo_mini',
    'scale_by_apollo',
    'fira',
    'scale_by_fira',
    'DEFAULT_EXCLUDED_KEYS',
    'PROJ_TYPES',
    'MatrixAxes',
    'MatrixView',
    'RandomizedRefresh',
    'captured_energy',
    'default_projection_mask',
    'effective_rank',
    'matrix_view',
    'online_pca_grad',
    'online_pca_loss',
    'orthonormality_error',
    'path_key_names',
    'principal_angles',
    'project',
    'project_back',
    'projection_sides',
    'randomized_projector',
    'svd_projectors',
]
