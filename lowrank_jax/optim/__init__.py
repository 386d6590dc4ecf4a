"""lowrank_jax.optim: low-rank gradient projection optimizers as Optax transforms.

Usable in any Optax code: nothing here imports the rest of ``lowrank_jax``.

* :func:`scale_by_galore` / :func:`galore`: GaLore (Zhao et al., 2024).
* :func:`scale_by_osd` / :func:`osd`: Online Subspace Descent (Liang et al., 2024).
* :mod:`lowrank_jax.optim.projection`: the shared projection core (matrix
  views, projection sides, SVD / randomized / online-PCA refreshes, the
  default projection mask).
"""

from lowrank_jax.optim.galore import GaLoreState, galore, scale_by_galore
from lowrank_jax.optim.osd import OSDState, osd, scale_by_osd
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

__all__ = [
    'GaLoreState',
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
