"""One subspace transform with pluggable projector and lift rules.

GaLore, Online Subspace Descent, APOLLO and Fira all do the same five things
to every projected leaf (canonical gradient matrix ``G``, see
:mod:`lowrank_jax.optim.projection` for the matrix view and the sides):

1. obtain this step's projector ``P`` (the **projector rule**: an exact or
   randomized decomposition every ``T`` steps, an online-PCA step every step,
   or a Gaussian matrix re-drawn every ``T`` steps from a stored key);
2. at a change of subspace, re-express the base optimizer's moments (the
   **moment policy**: ``keep``, ``reset`` or ``rotate``);
3. project, ``R = P^T G`` (or ``G Q``, ``P^T G Q``);
4. run the **base optimizer** on ``R``, giving ``N``;
5. map back to a full-size update (the **lift rule**: GaLore's ``scale P N``,
   APOLLO's norm-ratio scaling of ``G``, Fira's ``scale P N`` plus the scaled
   residual ``G - P R``).

:func:`scale_by_subspace` is that skeleton; a method supplies a projector rule
and a lift rule. Unprojected leaves go through the base optimizer unchanged.

**Split refresh.** With ``split_refresh=True`` the update never runs a
decomposition: the projector refresh is a separate program the caller runs
only when :func:`refresh_due` says so, with :func:`refresh_projectors`::

  if refresh_due(opt_state):                          # a host bool
    opt_state = refresh_fn(grads, opt_state, params)  # jit of refresh_projectors(tx, ...)
  updates, opt_state = step_fn(grads, opt_state, params)

Both work through ``optax.chain``, ``inject_hyperparams`` and
``apply_if_finite``. The split form gives the same parameters as the
one-transform form (which hides the refresh in a ``lax.cond``); the every-step
program then carries no decomposition workspace, and an ahead-of-time compile
for an accelerator need not compile an SVD in the step.

State layout: see :class:`SubspaceState`; every leaf is a plain nonzero-size
array, so orbax saves and restores it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim import _subspace as sub
from lowrank_jax.optim import projection as proj_lib

#: Moment policies at a change of subspace.
MOMENT_POLICIES = ('keep', 'reset', 'rotate')
#: Granularities of the norm-ratio scaling (APOLLO, Fira).
SCALINGS = ('channel', 'tensor')
#: Decomposition algorithms of a projector refresh.
REFRESH_ALGORITHMS = ('svd', 'randomized')

# Extra argument of ``update`` that turns it into the refresh program.
_REFRESH_ARG = 'subspace_refresh'
_NEVER = jnp.iinfo(jnp.int32).max


class SubspaceState(NamedTuple):
  """State of :func:`scale_by_subspace` (and so of GaLore, OSD, APOLLO, Fira).

  Attributes:
    count: number of updates taken (int32 scalar).
    projector: pytree with the structure of the params: at a projected leaf a
      dict ``{'in': P}`` / ``{'out': Q}`` / both with shapes ``batch + (n_in,
      r)`` / ``batch + (n_out, r)`` when the projector rule stores projectors,
      else (and at unprojected leaves) a float32 scalar placeholder.
    projector_state: the projector rule's own state: OSD's projector
      optimizer state, the Gaussian rule's PRNG key (uint32[2]), or empty.
    lowrank_state: state of the base optimizer on the low-rank gradients
      (placeholders at unprojected leaves).
    dense_state: state of the base optimizer on the unprojected gradients
      (placeholders at projected leaves).
    lift_state: the norm-growth limiter's previous norms (float32
      ``batch_shape`` per projected leaf, placeholder elsewhere), or empty.
    next_refresh: with ``split_refresh``, the ``count`` at which the next
      refresh is due (int32 scalar), else empty.
  """

  count: jax.Array
  projector: Any
  projector_state: Any
  lowrank_state: optax.OptState
  dense_state: optax.OptState
  lift_state: Any
  next_refresh: Any


# ---------------------------------------------------------------------------
# Projector rules.


class ProjectorRule:
  """How projectors are obtained. Subclasses override what they need.

  ``stores_projectors``: projectors live in the state (else the rule draws
  them each step with ``draw(projector_state, count // every, plans, dtype)``,
  as :class:`GaussianRedraw`, and ``rank`` must be static at update time).
  ``due(count)``: a
  traced bool, the step changes the subspace. ``refresh``: the new projectors
  from this step's canonical gradient matrices. ``advance``: a per-step move
  of the projectors after the update (online PCA).
  """

  stores_projectors = True
  decomposes = True  # its refresh runs a decomposition (worth a split program)

  def init_state(self, projs_tree: Any) -> Any:
    return optax.EmptyState()

  def due(self, count):
    raise NotImplementedError

  def next_refresh(self, count):
    """``count`` of the refresh after the one at ``count`` (split refresh)."""
    raise NotImplementedError

  def refresh(self, mats, plans, projs, count, pdtype) -> list:
    raise NotImplementedError

  def advance(self, count, mats, low, projs, pstate, plans, treedef):
    return projs, pstate


def refresh_algorithm(refresh: Union[str, proj_lib.RandomizedRefresh]):
  """``'svd'``, or the :class:`~lowrank_jax.optim.projection.RandomizedRefresh` of
  ``'randomized'`` (default settings) or of the one given."""
  if isinstance(refresh, proj_lib.RandomizedRefresh):
    return refresh
  if refresh not in REFRESH_ALGORITHMS:
    raise ValueError(f'`refresh` must be one of {REFRESH_ALGORITHMS} or a RandomizedRefresh, got {refresh!r}')
  return proj_lib.RandomizedRefresh() if refresh == 'randomized' else refresh


class DecompositionRefresh(ProjectorRule):
  """GaLore's rule: the top-``r`` singular subspace of the gradient every ``every`` steps.

  ``algorithm`` is ``'svd'`` (exact float32 SVD, the paper) or a
  :class:`~lowrank_jax.optim.projection.RandomizedRefresh` (warm-started
  subspace iteration).
  """

  def __init__(self, every, algorithm: Union[str, proj_lib.RandomizedRefresh] = 'svd'):
    self.every = every
    self.algorithm = refresh_algorithm(algorithm)

  def due(self, count):
    return (count % self.every) == 0

  def next_refresh(self, count):
    return count + self.every

  def refresh(self, mats, plans, projs, count, pdtype):
    return sub.compute_projectors(mats, plans, projs, self.algorithm, pdtype, count, count == 0)


class OnlinePCA(ProjectorRule):
  """OSD's rule: SVD of the first gradient, then one optimizer step per step on
  the online-PCA loss (:func:`~lowrank_jax.optim.projection.online_pca_grad`)."""

  def __init__(self, projector_optimizer, lr_fn, orthogonality):
    self.popt = projector_optimizer
    self.lr_fn = lr_fn
    self.orthogonality = orthogonality

  def init_state(self, projs_tree):
    return self.popt.init(projs_tree)

  def due(self, count):
    return count == 0

  def next_refresh(self, count):
    return jnp.full_like(count, _NEVER)

  def refresh(self, mats, plans, projs, count, pdtype):
    return sub.compute_projectors(mats, plans, projs, 'svd', pdtype, count, True)

  def advance(self, count, mats, low, projs, pstate, plans, treedef):
    def step(operand):
      projs, pstate = operand
      grads = []
      for m, y, p, plan in zip(mats, low, projs, plans):
        if plan is None:
          grads.append(jnp.zeros_like(p))
          continue
        g = {}
        for s in plan.sides:
          # The low-rank gradient is P^T A when there is one side: reuse it.
          pa = None
          if len(plan.sides) == 1:
            pa = y if s == 'in' else jnp.swapaxes(y, -1, -2)
          g[s] = proj_lib.online_pca_grad(p[s], m, s, self.orthogonality, pa).astype(p[s].dtype)
        grads.append(g)
      ptree = treedef.unflatten(projs)
      direction, new_pstate = self.popt.update(treedef.unflatten(grads), pstate, ptree)
      lr = self.lr_fn(count)
      new = treedef.flatten_up_to(
          jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), ptree, direction))
      new = [q if plan is not None else p for q, p, plan in zip(new, projs, plans)]  # placeholders stay
      return new, sub.cast_like(new_pstate, pstate)

    # As the official code, no projector step at step 0 (the SVD step). A select per leaf, not a
    # lax.cond over the whole tree: a cond's operands (every leaf's gradient) all stay alive until
    # it runs, while a select lets each leaf's step run, and its gradient go, as soon as it exists.
    moved = count > 0
    new_projs, new_pstate = step((projs, pstate))
    select = lambda new, old: jax.tree.map(lambda n, o: jnp.where(moved, n, o), new, old)  # noqa: E731
    return select(new_projs, projs), select(new_pstate, pstate)


class GaussianRedraw(ProjectorRule):
  """APOLLO's rule: ``P`` with i.i.d. ``N(0, 1/r)`` entries, re-drawn every ``every`` steps.

  Nothing but a PRNG key is stored: the projector of step ``t`` is drawn
  from ``fold_in(fold_in(key, t // every), leaf side index)`` at every step,
  so a checkpoint (key and count) reproduces it exactly.
  """

  stores_projectors = False
  decomposes = False

  def __init__(self, every, seed: int = 0):
    self.every = every
    self.seed = seed

  def init_state(self, projs_tree):
    return jax.random.PRNGKey(self.seed)

  def due(self, count):
    return (count % self.every) == 0

  def next_refresh(self, count):
    return count + self.every

  def draw(self, key, epoch, plans, pdtype) -> list:
    """The projectors of re-draw number ``epoch`` (placeholders at unprojected leaves)."""
    ekey = jax.random.fold_in(key, epoch)
    out = []
    for i, plan in enumerate(plans):
      if plan is None:
        out.append(sub.placeholder())
        continue
      out.append({
          side: gaussian_projector(jax.random.fold_in(ekey, 2 * i + j), plan.projector_shape(side), pdtype)
          for j, side in enumerate(plan.sides)
      })
    return out


def gaussian_projector(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
  """``shape = batch + (d, r)`` with i.i.d. ``N(0, 1/r)`` entries (APOLLO's random projection).

  ``P^T x`` then preserves norms in expectation (Johnson-Lindenstrauss).
  """
  r = shape[-1]
  return (jax.random.normal(key, tuple(shape), jnp.float32) / math.sqrt(r)).astype(dtype)


# ---------------------------------------------------------------------------
# Lift rules and the norm-growth limiter.


def limit_norm_growth(x: jax.Array, prev_norm: jax.Array, gamma) -> tuple[jax.Array, jax.Array]:
  """Fira's norm-growth limiter on a batch of matrices ``x`` (``batch + (m, n)``).

  ``S <- S * gamma ||S_prev|| / ||S||`` when ``||S|| > gamma ||S_prev||``
  (per batch matrix, Frobenius norms); a zero ``prev_norm`` (the first step)
  limits nothing. Returns the limited ``x`` and its norm (the next ``prev_norm``).
  """
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1)))
  cap = gamma * prev_norm
  factor = jnp.where((prev_norm > 0) & (norm > cap), cap / jnp.maximum(norm, 1e-30), 1.0)
  return x * factor[..., None, None].astype(x.dtype), norm * factor


def norm_ratio(n: jax.Array, y: jax.Array, sides: Sequence[str], granularity: str) -> jax.Array:
  """``||N|| / ||R||`` of the base output ``N`` and its input ``R`` (the low-rank gradient).

  ``'tensor'``: one ratio per matrix, shape ``batch + (1, 1)``. ``'channel'``:
  one per channel of the uncompressed side (columns of ``R = P^T G``, rows of
  ``R = G Q``), shaped to broadcast against the full ``(n_in, n_out)`` matrix.
  A zero channel of ``R`` gets ratio 0 (its gradient channel is zero too).
  """
  if granularity == 'tensor':
    axis = (-2, -1)
  elif len(sides) != 1:
    raise ValueError("channel-wise scaling needs a one-sided proj_type (not 'full'); "
                     "use granularity 'tensor'")
  else:
    axis = -2 if sides[0] == 'in' else -1  # reduce over the compressed (rank) axis
  num = jnp.sqrt(jnp.sum(jnp.square(n.astype(jnp.float32)), axis=axis, keepdims=True))
  den = jnp.sqrt(jnp.sum(jnp.square(y.astype(jnp.float32)), axis=axis, keepdims=True))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


class LiftRule:
  """Maps the base output ``N`` back to a full-size update of a projected leaf.

  ``lift(m, y, n, p, sides, prev)``: ``m`` the canonical gradient matrix,
  ``y`` its low-rank projection, ``n`` the base output, ``p`` the projectors,
  ``prev`` the limiter's previous norm (None without limiter). Returns the
  canonical update and the new limiter norm.
  """

  gamma = None  # norm-growth limit; None: no limiter state

  def lift(self, m, y, n, p, sides, prev):
    raise NotImplementedError


class ProjectBack(LiftRule):
  """GaLore / OSD: ``scale * P N``."""

  def __init__(self, scale):
    self.scale = scale

  def lift(self, m, y, n, p, sides, prev):
    return self.scale * proj_lib.project_back(n, p), prev


class ScaleGradient(LiftRule):
  """APOLLO: ``scale * limit(G * ||N|| / ||R||)``, the ratio channel- or tensor-wise."""

  def __init__(self, scale, granularity='channel', gamma=1.01):
    self.scale, self.granularity, self.gamma = scale, granularity, gamma

  def lift(self, m, y, n, p, sides, prev):
    s = norm_ratio(n, y, sides, self.granularity)
    out = m.astype(s.dtype) * s
    if self.gamma is not None:
      out, prev = limit_norm_growth(out, prev, self.gamma)
    return self.scale * out, prev


class ProjectBackPlusResidual(LiftRule):
  """Fira: ``scale * P N + limit((G - P R) * ||N|| / ||R||)``."""

  def __init__(self, scale, granularity='channel', gamma=1.01):
    self.scale, self.granularity, self.gamma = scale, granularity, gamma

  def lift(self, m, y, n, p, sides, prev):
    s = norm_ratio(n, y, sides, self.granularity)
    resid = (m.astype(s.dtype) - proj_lib.project_back(y, p).astype(s.dtype)) * s
    if self.gamma is not None:
      resid, prev = limit_norm_growth(resid, prev, self.gamma)
    return self.scale * proj_lib.project_back(n, p) + resid, prev


# ---------------------------------------------------------------------------
# The transform.


def scale_by_subspace(
    projector_rule: ProjectorRule,
    lift_rule: LiftRule,
    *,
    rank: int = 128,
    proj_type: str = 'std',
    base_optimizer: Optional[optax.GradientTransformation] = None,
    moments: str = 'keep',
    projection_mask: Any = None,
    projector_dtype: Any = None,
    split_refresh: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Runs ``base_optimizer`` in low-rank subspaces; the rules say how (module docstring).

  Args:
    projector_rule: a :class:`ProjectorRule` (:class:`DecompositionRefresh`,
      :class:`OnlinePCA`, :class:`GaussianRedraw`, or your own).
    lift_rule: a :class:`LiftRule` (:class:`ProjectBack`,
      :class:`ScaleGradient`, :class:`ProjectBackPlusResidual`, ...).
    rank: projection rank (static int; ``min(rank, n_in, n_out)`` per leaf).
      Rules that store projectors read it at init only; others also at update.
    proj_type: which side is compressed (:data:`projection.PROJ_TYPES`).
    base_optimizer: gradient-only transform run on the low-rank gradients
      and, as a second instance, on the unprojected leaves; default
      ``optax.scale_by_adam()``.
    moments: at a change of subspace, ``'keep'`` the base moments, ``'reset'``
      them (``base_optimizer.init``), or ``'rotate'`` them into the new basis
      (see :func:`~lowrank_jax.optim.scale_by_galore`).
    projection_mask: which leaves are projected: None for
      :func:`~lowrank_jax.optim.projection.default_projection_mask`; else a
      pytree (or callable ``params -> pytree``) of ``True``/``False``/``None``
      or :class:`~lowrank_jax.optim.projection.MatrixAxes`.
    projector_dtype: dtype of the projectors (float32 by default).
    split_refresh: run the projector refresh only in the separate program
      :func:`refresh_projectors` (see the module docstring).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra args go to the base.
  """
  sub.check_choice('proj_type', proj_type, proj_lib.PROJ_TYPES)
  sub.check_choice('moments', moments, MOMENT_POLICIES)
  if split_refresh and not projector_rule.stores_projectors:
    raise ValueError('split_refresh needs a projector rule that stores projectors; '
                     f'{type(projector_rule).__name__} draws them every step')
  base = optax.with_extra_args_support(optax.scale_by_adam() if base_optimizer is None else base_optimizer)
  pdtype = jnp.dtype('float32' if projector_dtype is None else projector_dtype)
  rule, lift = projector_rule, lift_rule

  def plans_for(tree, r):
    return sub.init_plans(tree, projection_mask, r, proj_type)

  def init_fn(params):
    r = sub.static_int(rank, 'rank')
    if r <= 0:
      raise ValueError(f'`rank` must be positive, got {r}')
    leaves, treedef = jax.tree.flatten(params)
    plans = plans_for(params, r)
    if rule.stores_projectors:
      projs = treedef.unflatten(sub.zero_projectors(plans, pdtype))
    else:
      projs = treedef.unflatten([sub.placeholder() for _ in plans])
    low, dense = sub.split_init_trees(leaves, plans, pdtype)
    if lift.gamma is None:
      lift_state = optax.EmptyState()
    else:
      lift_state = treedef.unflatten([
          sub.placeholder() if plan is None else jnp.zeros(plan.view.batch_shape, jnp.float32)
          for plan in plans
      ])
    return SubspaceState(
        count=jnp.zeros([], jnp.int32),
        projector=projs,
        projector_state=rule.init_state(projs),
        lowrank_state=base.init(treedef.unflatten(low)),
        dense_state=base.init(treedef.unflatten(dense)),
        lift_state=lift_state,
        next_refresh=jnp.zeros([], jnp.int32) if split_refresh else optax.EmptyState(),
    )

  def switch_moments(low_state, treedef, leaves, plans, paths, old, new):
    """The low-rank base state re-expressed at a change of subspace (``moments``)."""
    if moments == 'reset':
      low0, _ = sub.split_init_trees(leaves, plans, pdtype)
      return sub.cast_like(base.init(treedef.unflatten(low0)), low_state)
    if moments == 'rotate':
      return sub.rotate_state(low_state, paths, plans, old, new)
    return low_state

  def update_fn(updates, state, params=None, **extra_args):
    refresh_only = bool(extra_args.pop(_REFRESH_ARG, False))
    leaves, treedef = jax.tree.flatten(updates)
    if rule.stores_projectors:
      treedef, leaves, old_projs, plans = sub.plans_from_state(updates, state.projector, projection_mask)
    else:
      plans = plans_for(updates, sub.static_int(rank, 'rank'))
      old_projs = None
    mats = sub.canonical_mats(leaves, plans)
    count = state.count
    paths = sub.param_paths(updates)

    def refreshed(operand):
      projs, low_state = operand
      new = sub.cast_like(rule.refresh(mats, plans, projs, count, pdtype), projs)
      return new, switch_moments(low_state, treedef, leaves, plans, paths, projs, new)

    if refresh_only:  # the refresh program: new projectors (and moments), nothing else
      if not split_refresh:
        return updates, state
      projs, low_state = refreshed((old_projs, state.lowrank_state))
      return updates, state._replace(
          projector=treedef.unflatten(projs), lowrank_state=low_state,
          next_refresh=rule.next_refresh(count).astype(jnp.int32))

    low_state = state.lowrank_state
    pstate = state.projector_state
    if not rule.stores_projectors:
      projs = rule.draw(pstate, count // rule.every, plans, pdtype)
      if moments != 'keep':
        low_state = jax.lax.cond(
            rule.due(count) & (count > 0),
            lambda s: switch_moments(
                s, treedef, leaves, plans, paths, rule.draw(pstate, count // rule.every - 1, plans, pdtype), projs),
            lambda s: s, low_state)
    elif split_refresh:
      projs = old_projs
    elif moments == 'keep':  # the base state need not go through the cond
      projs = jax.lax.cond(rule.due(count), lambda p: refreshed((p, None))[0], lambda p: p, old_projs)
    else:
      projs, low_state = jax.lax.cond(rule.due(count), refreshed, lambda o: o, (old_projs, low_state))

    low, dense = sub.split_updates(leaves, mats, projs, plans)
    (low_upd, dense_upd), (low_state, dense_state) = sub.run_base(
        base, treedef, plans, updates=(low, dense), states=(low_state, state.dense_state), params=params,
        extra_args=extra_args)

    use_limiter = lift.gamma is not None
    prevs = treedef.flatten_up_to(state.lift_state) if use_limiter else [None] * len(leaves)
    out, new_prevs = [], []
    for x, m, y, n, du, p, plan, prev in zip(leaves, mats, low, low_upd, dense_upd, projs, plans, prevs):
      if plan is None:
        out.append(du)
        new_prevs.append(prev)
        continue
      full, prev = lift.lift(m, y, n, p, plan.sides, prev)
      out.append(plan.view.from_matrix(full).astype(x.dtype))
      new_prevs.append(prev)

    if rule.stores_projectors:
      projs, pstate = rule.advance(count, mats, low, projs, pstate, plans, treedef)
      projector = treedef.unflatten(projs)
    else:
      projector = state.projector
    new_state = SubspaceState(
        count=sub.safe_increment(count),
        projector=projector,
        projector_state=pstate,
        lowrank_state=low_state,
        dense_state=dense_state,
        lift_state=treedef.unflatten(new_prevs) if use_limiter else state.lift_state,
        next_refresh=state.next_refresh,
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ---------------------------------------------------------------------------
# The split refresh program.


def _is_node(x) -> bool:
  return isinstance(x, SubspaceState)


def refresh_due(opt_state: Any) -> jax.Array:
  """Whether any split-refresh subspace transform in ``opt_state`` is due a refresh.

  A traced bool (jit it, or call it eagerly and convert with ``bool``): some
  :class:`SubspaceState` made with ``split_refresh=True`` has
  ``count >= next_refresh``. Transforms without split refresh never are.
  """
  return steps_to_refresh(opt_state) == 0


def _split_nodes(opt_state: Any) -> list:
  return [n for n in jax.tree.leaves(opt_state, is_leaf=_is_node)
          if _is_node(n) and not isinstance(n.next_refresh, optax.EmptyState)]


def uses_split_refresh(opt_state: Any) -> bool:
  """Whether ``opt_state`` (arrays or shapes) holds a split-refresh subspace transform (its structure alone)."""
  return bool(_split_nodes(opt_state))


def steps_to_refresh(opt_state: Any) -> jax.Array:
  """Updates left before the next split refresh is due (0: due now); int32 max if none.

  A loop can fetch it once after each refresh and count down on the host,
  checking again (it is cheap) when the count reaches 0.
  """
  left = jnp.full([], _NEVER, jnp.int32)
  for node in _split_nodes(opt_state):
    left = jnp.minimum(left, jnp.maximum(node.next_refresh - node.count, 0))
  return left


def refresh_projectors(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any = None,
                       **extra_args) -> Any:
  """The refresh program: ``opt_state`` with every split-refresh subspace transform refreshed.

  Runs ``tx.update`` in refresh mode (each split-refresh subspace transform
  computes its new projectors from ``grads``, and re-expresses its moments as
  its ``moments`` policy says, without counting a step) and keeps only the
  refreshed :class:`SubspaceState` nodes: every other part of ``opt_state`` is
  returned unchanged, and under ``jax.jit`` the rest of the update is dead
  code. Pass the same ``grads`` the following update gets (the one-transform
  form refreshes on them too). Works through ``optax.chain``,
  ``inject_hyperparams`` and ``apply_if_finite`` (not ``MultiSteps``, whose
  inner update only runs on the last micro-step: use the one-transform form
  there).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lowrank_jax import optim
    >>> params = {'w': jnp.ones((16, 32))}
    >>> tx = optim.galore(1e-2, rank=4, update_proj_gap=10, split_refresh=True,
    ...                   projection_mask={'w': True})
    >>> state = tx.init(params)
    >>> refresh = jax.jit(lambda g, s, p: optim.refresh_projectors(tx, g, s, p))
    >>> grads = {'w': jnp.ones((16, 32))}
    >>> if optim.refresh_due(state):
    ...   state = refresh(grads, state, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
  """
  _, new_state = tx.update(grads, opt_state, params, **{_REFRESH_ARG: True}, **extra_args)
  old_nodes, treedef = jax.tree.flatten(opt_state, is_leaf=_is_node)
  new_nodes = jax.tree.leaves(new_state, is_leaf=_is_node)
  merged = [n if _is_node(o) else o for o, n in zip(old_nodes, new_nodes)]
  return jax.tree.unflatten(treedef, merged)
