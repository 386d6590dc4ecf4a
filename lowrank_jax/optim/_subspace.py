"""Tree plumbing of the subspace transform (private; see :mod:`lowrank_jax.optim.subspace`).

State layout: the projector tree has the structure of the
params; at a projected leaf it holds ``{'in': P}``, ``{'out': Q}`` or
``{'in': P, 'out': Q}``, elsewhere a float32 scalar placeholder. The base
transform runs as two instances: one on the *low-rank* tree (low-rank arrays
at projected leaves, placeholders elsewhere) and one on the *dense* tree (the
unprojected updates, placeholders at projected leaves). Every state leaf thus
has a nonzero size and is a plain array, which orbax saves and restores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim import projection as proj_lib

PLACEHOLDER_DTYPE = jnp.float32


def placeholder() -> jax.Array:
  return jnp.zeros((), PLACEHOLDER_DTYPE)


def is_placeholder(x: Any) -> bool:
  return not isinstance(x, dict)


@dataclasses.dataclass(frozen=True)
class LeafPlan:
  """Static per-leaf plan: how the leaf is viewed and which sides, which ranks."""

  view: proj_lib.MatrixView
  ranks: tuple[tuple[str, int], ...]  # ((side, r), ...) in SIDES order

  @property
  def sides(self) -> tuple[str, ...]:
    return tuple(s for s, _ in self.ranks)

  @property
  def rank_map(self) -> dict[str, int]:
    return dict(self.ranks)

  def projector_shape(self, side: str) -> tuple[int, ...]:
    d = self.view.n_in if side == 'in' else self.view.n_out
    return self.view.batch_shape + (d, self.rank_map[side])

  @property
  def lowrank_shape(self) -> tuple[int, ...]:
    rm = self.rank_map
    rows = rm.get('in', self.view.n_in)
    cols = rm.get('out', self.view.n_out)
    return self.view.batch_shape + (rows, cols)


def static_int(x: Any, name: str) -> int:
  """``int(x)`` for a concrete value, with a helpful error for a tracer."""
  try:
    return int(x)
  except (jax.errors.ConcretizationTypeError, TypeError) as e:
    raise ValueError(
        f'`{name}` must be a static Python int (it sets array shapes). Under '
        f'optax.inject_hyperparams, list it in static_args, e.g. '
        f"static_args=('{name}',)."
    ) from e


def resolve_mask(mask: Any, tree: Any) -> list[Any]:
  """Flattened per-leaf mask values (bool/None/MatrixAxes) for ``tree``."""
  treedef = jax.tree.structure(tree)
  if callable(mask) and not isinstance(mask, proj_lib.MatrixAxes):
    mask = mask(tree)
  if isinstance(mask, (bool, proj_lib.MatrixAxes)):
    leaves = jax.tree.leaves(tree)
    return [mask if getattr(x, 'ndim', 0) >= 2 else False for x in leaves]
  return treedef.flatten_up_to(mask)


def _axes_of(mask_value: Any) -> Optional[proj_lib.MatrixAxes]:
  if isinstance(mask_value, proj_lib.MatrixAxes):
    return mask_value
  return None


def init_plans(
    params: Any, mask: Any, rank: int, proj_type: str
) -> list[Optional[LeafPlan]]:
  """Plans at init: the mask decides which leaves are projected."""
  leaves = jax.tree.leaves(params)
  if mask is None:
    mask_vals = jax.tree.leaves(proj_lib.default_projection_mask(params, rank=rank))
  else:
    mask_vals = resolve_mask(mask, params)
  plans = []
  for x, m in zip(leaves, mask_vals):
    if m is None or m is False or (not isinstance(m, proj_lib.MatrixAxes) and not bool(m)):
      plans.append(None)
      continue
    view = proj_lib.matrix_view(x.shape, _axes_of(m))
    sides = proj_lib.projection_sides(proj_type, view.n_in, view.n_out)
    r = proj_lib.effective_rank(rank, view.n_in, view.n_out)
    plans.append(LeafPlan(view, tuple((s, r) for s in sides)))
  return plans


def plans_from_state(
    updates: Any, projectors: Any, mask: Any
) -> tuple[Any, list[jax.Array], list[Any], list[Optional[LeafPlan]]]:
  """Plans at update time: the state says which leaves are projected and the
  ranks (from the projector shapes), the mask only supplies the axes. So no
  static ``rank`` is needed when updating (friendly to inject_hyperparams)."""
  leaves, treedef = jax.tree.flatten(updates)
  proj_leaves = treedef.flatten_up_to(projectors)
  if mask is None:
    mask_vals = [None] * len(leaves)
  else:
    mask_vals = resolve_mask(mask, updates)
  plans = []
  for x, p, m in zip(leaves, proj_leaves, mask_vals):
    if is_placeholder(p):
      plans.append(None)
      continue
    view = proj_lib.matrix_view(x.shape, _axes_of(m))
    ranks = tuple((s, int(p[s].shape[-1])) for s in proj_lib.SIDES if s in p)
    plan = LeafPlan(view, ranks)
    for s in plan.sides:
      if tuple(p[s].shape) != plan.projector_shape(s):
        raise ValueError(
            f'projector of shape {p[s].shape} does not fit a leaf of shape '
            f'{x.shape} viewed as {view.matrix_shape}; is the mask the same as '
            'at init?'
        )
    plans.append(plan)
  return treedef, leaves, proj_leaves, plans


def zero_projectors(plans, dtype) -> list[Any]:
  return [
      placeholder()
      if plan is None
      else {s: jnp.zeros(plan.projector_shape(s), dtype) for s in plan.sides}
      for plan in plans
  ]


def lowrank_dtype(x_dtype, proj_dtype):
  return jnp.promote_types(x_dtype, proj_dtype)


def split_init_trees(params_leaves, plans, proj_dtype):
  """Zero low-rank and dense trees (as leaf lists) to init the base with."""
  low, dense = [], []
  for x, plan in zip(params_leaves, plans):
    if plan is None:
      low.append(placeholder())
      dense.append(jnp.zeros(x.shape, x.dtype))
    else:
      low.append(jnp.zeros(plan.lowrank_shape, lowrank_dtype(x.dtype, proj_dtype)))
      dense.append(placeholder())
  return low, dense


def cast_like(new, old):
  return jax.tree.map(lambda n, o: n.astype(o.dtype), new, old)


def compute_projectors(
    mats, plans, old_projs, refresh, proj_dtype, count, cold
) -> list[Any]:
  """New projectors for every projected leaf (SVD or randomized)."""
  out = []
  key = None
  if isinstance(refresh, proj_lib.RandomizedRefresh):
    key = jax.random.fold_in(jax.random.PRNGKey(refresh.seed), count)
  for i, (m, plan, old) in enumerate(zip(mats, plans, old_projs)):
    if plan is None:
      out.append(old)
      continue
    if refresh == 'svd':
      out.append(proj_lib.svd_projectors(m, plan.rank_map, proj_dtype))
    else:
      new = {}
      for j, (side, r) in enumerate(plan.ranks):
        a = m if side == 'in' else jnp.swapaxes(m, -1, -2)
        k = jax.random.fold_in(key, 2 * i + j)
        new[side] = proj_lib.randomized_projector(
            a,
            r,
            k,
            old[side],
            cold=cold,
            oversample=refresh.oversample,
            n_iter=refresh.n_iter,
            dtype=proj_dtype,
        )
      out.append(new)
  return out


def split_updates(leaves, mats, projs, plans):
  """Low-rank and dense trees (as leaf lists) fed to the two base instances."""
  low, dense = [], []
  for x, m, p, plan in zip(leaves, mats, projs, plans):
    if plan is None:
      low.append(placeholder())
      dense.append(x)
    else:
      pd = p[plan.sides[0]].dtype
      y = proj_lib.project(m.astype(lowrank_dtype(m.dtype, pd)), p)
      low.append(y)
      dense.append(placeholder())
  return low, dense


def base_params(params, low, plans):
  """Params handed to the two base instances, or (None, None).

  The low-rank instance sees ``jax.ShapeDtypeStruct`` shape carriers at the
  projected leaves (enough for transforms that read only shapes, such as
  ``scale_by_factored_rms``; a transform that reads param *values* fails
  loudly instead of silently using wrong ones); the dense instance sees the
  real params at the unprojected leaves. Placeholders elsewhere.
  """
  if params is None:
    return None, None
  p_leaves = jax.tree.leaves(params)
  lp, dp = [], []
  for x, lo, plan in zip(p_leaves, low, plans):
    if plan is None:
      lp.append(placeholder())
      dp.append(x)
    else:
      lp.append(jax.ShapeDtypeStruct(lo.shape, lo.dtype))
      dp.append(placeholder())
  return lp, dp


def run_base(base, treedef, plans, *, updates, states, params, extra_args):
  """Runs the two base instances on ``updates`` (the low-rank and dense leaf lists)
  with ``states`` (their states); returns the two update leaf lists and the two states."""
  unflat = lambda x: None if x is None else treedef.unflatten(x)  # noqa: E731
  outs, new_states = [], []
  for upd, state, p in zip(updates, states, base_params(params, updates[0], plans)):
    out, new_state = base.update(unflat(upd), state, unflat(p), **extra_args)
    outs.append(treedef.flatten_up_to(out))
    new_states.append(new_state)
  return tuple(outs), tuple(new_states)


def canonical_mats(leaves, plans):
  return [None if plan is None else plan.view.to_matrix(x) for x, plan in zip(leaves, plans)]


# ---------------------------------------------------------------------------
# Re-expressing the base state in a new subspace.

SECOND_MOMENT_NAMES = frozenset(
    {'nu', 'nu_hat', 'nu_max', 'sum_of_squares', 'v', 'v_hat', 'exp_avg_sq'}
)


def _moment_leaves(state, treedef_paths, plans):
  """Yields (state_leaf_index, leaf_index, is_second_moment) for every state
  leaf that is a moment of a projected param: its path ends with the param's
  path and its shape is the param's low-rank shape."""
  by_path = {}
  for i, (path, plan) in enumerate(zip(treedef_paths, plans)):
    if plan is not None:
      by_path[tuple(path)] = i
  lengths = sorted({len(p) for p in by_path})
  flat, sdef = jax.tree_util.tree_flatten_with_path(state)
  found = []
  for si, (spath, leaf) in enumerate(flat):
    spath = tuple(spath)
    for L in lengths:
      if L > len(spath):
        continue
      i = by_path.get(spath[len(spath) - L :])
      if i is None:
        continue
      if tuple(getattr(leaf, 'shape', ())) != plans[i].lowrank_shape:
        continue
      prefix = proj_lib.path_key_names(spath[: len(spath) - L])
      second = any(n in SECOND_MOMENT_NAMES for n in prefix)
      found.append((si, i, second))
      break
  return flat, sdef, found


def rotate_state(state, param_paths, plans, old_projs, new_projs):
  """First moments ``m -> R m`` (``R = P_new^T P_old``, per side), second
  moments ``v -> (R*R) v`` (the diagonal of the rotated diagonal covariance;
  stays nonnegative); everything else is kept."""
  flat, sdef, found = _moment_leaves(state, param_paths, plans)
  leaves = [x for _, x in flat]
  rots = {}
  for _, i, _ in found:
    if i in rots:
      continue
    r = {}
    for s in plans[i].sides:
      pn = new_projs[i][s].astype(jnp.float32)
      po = old_projs[i][s].astype(jnp.float32)
      r[s] = jnp.einsum('...dr,...ds->...rs', pn, po, precision=jax.lax.Precision.HIGHEST)
    rots[i] = r
  for si, i, second in found:
    x = leaves[si]
    y = x.astype(jnp.float32)
    for s, rmat in rots[i].items():
      if second:
        rmat = jnp.square(rmat)
      if s == 'in':
        y = jnp.einsum('...rs,...so->...ro', rmat, y)
      else:
        y = jnp.einsum('...is,...rs->...ir', y, rmat)
    if second:
      y = jnp.maximum(y, 0)
    leaves[si] = y.astype(x.dtype)
  return jax.tree.unflatten(sdef, leaves)


def param_paths(tree) -> list[tuple]:
  return [tuple(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f'`{name}` must be one of {tuple(choices)}, got {value!r}')


def as_schedule(x) -> Callable[[jax.Array], jax.Array]:
  if callable(x):
    return x
  return lambda count: x


def safe_increment(count):
  return optax.safe_int32_increment(count)
