"""lowrank_jax.optim: low-rank gradient projection optimizers as Optax transforms.

Usable in any Optax code: nothing here imports the rest of ``lowrank_jax``.

* :func:`scale_by_galore` / :func:`galore`: GaLore (Zhao et al., 2024).
* :func:`scale_by_osd` / :func:`osd`: Online Subspace Descent (Liang et al., 2024).
* :mod:`lowrank_jax.optim.projection`: the shared projection core (matrix
  views, projection sides, SVD / randomized / online-PCA refreshes, the
  default projection mask).
* :func:`relora` / :func:`freeze_adapted_kernels`: ReLoRA merges, re-inits
  and moment pruning (Lialin et al., 2023); :func:`jagged_cosine_schedule`.
* :func:`lte_merge`: LTE multi-head LoRA merges (Huh et al., 2024), also with
  the heads spread over devices (``axis_name``).
* :func:`clip_by_global_norm` / :func:`global_norm`: global-norm clipping
  when some leaves are split over a device axis.
"""

from lowrank_jax.optim.clipping import clip_by_global_norm, global_norm

from lowrank_jax.optim.galore import GaLoreState, galore, scale_by_galore
from lowrank_jax.optim.osd import OSDState, osd, scale_by_osd
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
from lowrank_jax.optim.relora import ReLoRAState, adapted_layer_paths, freeze_adapted_kernels, relora
from lowrank_jax.optim.schedules import jagged_cosine_schedule

__all__ = [
    'GaLoreState',
    'LTEState',
    'ReLoRAState',
    'adapted_layer_paths',
    'clip_by_global_norm',
    'freeze_adapted_kernels',
    'global_norm',
    'jagged_cosine_schedule',
    'lte_head_mask',
    'lte_layer_paths',
    'lte_leaf_roles',
    'lte_merge',
    'relora',
    'OSDState',
    'galore',
    'scale_by_galore',
    'osd',
    'scale_by_osd',
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
