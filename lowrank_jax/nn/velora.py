"""VeLoRA: rank-1 sub-token projections of a linear layer's saved input.

Miles et al. 2024, "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token
Projections" (NeurIPS 2024; official code: github.com/roymiles/VeLoRA).

A linear layer ``y = x @ W`` normally keeps its input ``x`` ([..., D]) alive
until the backward pass, only to form the weight gradient ``x^T dy``. VeLoRA
splits every token into ``G = num_groups`` sub-tokens ``x_g`` of size
``d = D / G`` and, for the backward pass, keeps only one scalar per sub-token,
``s_g = x_g . v``, where ``v`` is a fixed unit vector of size ``d``. The
backward pass rebuilds ``x^_g = s_g v`` and uses ``x^`` in place of ``x`` for
the weight gradient. The forward output and the input gradient are exact:

  forward        y  = x @ W                        (exact)
  saved          s  = [..., G] scalars, W, v       (x itself is not saved)
  input grad     dx = dy @ W^T                     (exact)
  weight grad    dW = scale * x^^T dy              (compressed)

The weight gradient is computed without materialising ``x^``: with ``t`` the
flattened token index, ``dW[g*d + j, o] = v_j * sum_t s[t, g] dy[t, o]``, i.e.
one ``[G, out]`` contraction ``s^T dy`` followed by an outer product with
``v``; this is the same number as ``x^^T dy`` (up to float rounding), costs
``d`` times fewer FLOPs and needs no ``[..., D]`` temporary.

Memory. :func:`velora_matmul` is a ``jax.custom_vjp`` whose residuals are only
``(s, kernel, v)``, so when nothing else needs ``x`` for backward (e.g. the
input of a down projection, ``silu(gate) * up``), XLA frees it right after the
forward pass. When ``x`` has another consumer that saves it (q/k/v all read the
same normed input; so do gate/up), compressing only one of them saves nothing:
compress every linear that reads that input.

The vector ``v`` (and an ``initialised`` flag) are non-``Param`` variables:
they are not trained, they travel in the trainer's ``rest`` and are
checkpointed with it. Initialisation (``v_init``), following the official
code's ``VeLoRAWrapper.init_embed_``:

* ``'batch_average_once'`` (official default): the first batch the layer sees
  sets ``v`` to the L2-normalised mean sub-token of that batch, i.e. the mean
  over *all* ``B * T * G`` sub-tokens (tokens and groups flattened together,
  as the official ``flattened.view(B*N*G, C//G).mean(0)`` followed by
  ``F.normalize(p=2)``); it is then kept fixed. The batch that initialises
  ``v`` is already compressed with the new ``v``.
* ``'batch_average'``: the same average, recomputed from every batch.
* ``'random'``: a random unit vector drawn at construction and never changed
  (official ``'uniform'``: ``normalize(torch.rand(d))``, i.e. uniform [0, 1)
  entries, normalised; the same distribution is used here).

Before the first batch every mode holds such a random unit vector. A batch
whose mean sub-token is (numerically) zero leaves ``v`` unchanged and, for
``'batch_average_once'``, does not mark it initialised. The mean is computed in
float32 whatever the input dtype; ``v`` is stored in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.nn.dense import DTypeLike, Initializer, default_kernel_init, init_linear, matmul

V_INITS: tuple[str, ...] = ('batch_average_once', 'batch_average', 'random')
DEFAULT_NUM_GROUPS = 32  # the official code's default
_NORM_EPS = 1e-12  # as torch.nn.functional.normalize


class VeLoRAVector(nnx.Variable):
  """VeLoRA's fixed projection direction ``v`` (float32 ``[sub_token_size]``); not trained."""


class VeLoRAInitialised(nnx.Variable):
  """int32 scalar: 1 once ``v`` has been set from a batch (or drawn at random)."""


# ---------------------------------------------------------------------------
# Functional core.


def _check_groups(in_features: int, num_groups: int) -> int:
  if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups <= 0:
    raise ValueError(f'num_groups must be a positive int, got {num_groups!r}')
  if in_features % num_groups:
    raise ValueError(
        f'VeLoRA: in_features ({in_features}) must be divisible by num_groups '
        f'({num_groups}); valid num_groups are the divisors of {in_features}: '
        f'{_divisors(in_features)}')
  return in_features // num_groups


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def velora_project(x: jax.Array, v: jax.Array, num_groups: int) -> jax.Array:
  """The per-sub-token scalars ``s[..., g] = x[..., g*d:(g+1)*d] . v`` in ``x.dtype``."""
  d = _check_groups(x.shape[-1], num_groups)
  if v.shape != (d,):
    raise ValueError(f'v must have shape ({d},) for in_features={x.shape[-1]} and '
                     f'num_groups={num_groups}, got {v.shape}')
  # One matmul with the block-diagonal [D, G] matrix P[g*d + j, g] = v_j, not a [..., G, d]
  # view: a TPU pads a minor axis of d < 128 to 128 lanes, and that view of every compressed
  # input cost ViT-B/16 (sub-token 16, tpu-v5e) more than VeLoRA saved.
  eye = jnp.eye(num_groups, dtype=x.dtype)
  p = (eye[:, None, :] * v.astype(x.dtype)[None, :, None]).reshape(x.shape[-1], num_groups)
  s = jnp.dot(x.reshape(-1, x.shape[-1]), p, preferred_element_type=jnp.float32)
  return s.reshape(*x.shape[:-1], num_groups).astype(x.dtype)


def batch_mean_direction(x: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """(normalised mean sub-token of ``x`` in float32, its norm before normalising).

  The mean is over every sub-token of the batch (all leading axes and the
  groups), as in the official code.
  """
  d = _check_groups(x.shape[-1], num_groups)
  # Over the tokens first (a [D] vector), then over the groups: the same mean, without a
  # [..., d] view that a TPU pads to 128 lanes (see velora_project).
  mean = jnp.mean(x.reshape(-1, x.shape[-1]), axis=0, dtype=jnp.float32).reshape(num_groups, d).mean(axis=0)
  norm = jnp.linalg.norm(mean)
  return mean / jnp.maximum(norm, _NORM_EPS), norm


def next_velora_vector(x: jax.Array, v: jax.Array, initialised: jax.Array, num_groups: int,
                       v_init: str) -> tuple[jax.Array, jax.Array]:
  """(v, initialised) after seeing the batch ``x``; jit-safe (no Python branching on values).

  ``'random'`` never changes ``v``; ``'batch_average'`` takes every batch's
  direction; ``'batch_average_once'`` takes the first batch's direction while
  ``initialised == 0`` and keeps it afterwards. A batch whose mean sub-token is
  (numerically) zero changes nothing.
  """
  if v_init not in V_INITS:
    raise ValueError(f'unknown v_init {v_init!r}; valid: {list(V_INITS)}')
  initialised = jnp.asarray(initialised, jnp.int32)
  if v_init == 'random':
    return v, initialised
  x = jax.lax.stop_gradient(x)

  def from_batch(v, initialised):
    direction, norm = batch_mean_direction(x, num_groups)
    usable = norm > _NORM_EPS
    return (jnp.where(usable, direction.astype(v.dtype), v),
            jnp.where(usable, jnp.ones_like(initialised), initialised))

  batch_v, batch_initialised = from_batch(v, initialised)
  if v_init == 'batch_average':
    return batch_v, batch_initialised
  # batch_average_once: the first batch's direction, then v stays. A select, not a lax.cond
  # that would skip the (cheap) reduction: a conditional takes the whole activation as an
  # operand, and the TPU compiler then keeps a copy of it (ViT-B/16 LoRA + VeLoRA, batch 32,
  # tpu-v5e: 804 MiB peak at one block with the cond, against 295 MiB for LoRA alone).
  first = initialised == 0
  return jnp.where(first, batch_v, v), jnp.where(first, batch_initialised, initialised)


def _saved_scalars(s: jax.Array) -> jax.Array:
  """The residual kept for backward: ``s`` as ``[G, tokens]``, behind an optimisation barrier.

  Tokens last, because a TPU pads an array's minor axis to 128 lanes: ``[tokens, G]`` with
  G = 48 (a 768-wide input at sub-token 16) takes 2.7x its bytes. The barrier, because the
  backward's ``s^T dy`` with ``s = x P`` is a chain of two dots that XLA reassociates into
  ``P^T (x^T dy)`` (fewer flops: it sees the block-diagonal ``P`` as dense), which keeps the
  full input ``x`` alive instead of ``s``: on ViT-B/16 (tpu-v5e) the down projection's
  ``[32, 197, 3072]`` input, 37.5 MiB per block, more than VeLoRA saved.
  """
  return jax.lax.optimization_barrier(s.reshape(-1, s.shape[-1]).T)


@functools.lru_cache(maxsize=None)
def _velora_matmul_fn(num_groups: int, scale: float):
  """A custom_vjp ``(x, kernel, v) -> x @ kernel`` for static num_groups / scale."""

  @jax.custom_vjp
  def f(x, kernel, v):
    return matmul(x, kernel)

  def fwd(x, kernel, v):
    y = matmul(x, kernel)
    s = velora_project(x, v, num_groups)  # [..., G] in x.dtype: the only saved activation.
    return y, (_saved_scalars(s), kernel, v)

  def bwd(res, dy):
    s, kernel, v = res
    # Exact input gradient.
    dx = jnp.dot(dy, kernel.T).astype(s.dtype)
    # Weight gradient from the rank-1 sub-token reconstruction, without building x^:
    # dW[g*d + j, o] = v_j * sum_t s[t, g] dy[t, o]  (s is kept as [G, tokens]).
    dy2 = dy.reshape(-1, dy.shape[-1])
    m = jnp.einsum('gt,to->go', s, dy2.astype(s.dtype), preferred_element_type=jnp.float32)
    dk = m[:, None, :] * v.astype(jnp.float32)[None, :, None]
    dk = dk.reshape(kernel.shape)
    if scale != 1.0:
      dk = dk * scale
    return dx, dk.astype(kernel.dtype), jnp.zeros_like(v)

  f.defvjp(fwd, bwd)
  return f


def velora_matmul(x: jax.Array, kernel: jax.Array, v: jax.Array, num_groups: int,
                  scale: float = 1.0) -> jax.Array:
  """``x @ kernel`` whose backward keeps only VeLoRA's sub-token scalars of ``x``.

  Args:
    x: ``[..., D]`` input (any linear's input, e.g. a LoRA A input).
    kernel: ``[D, out]``, same dtype as ``x`` (cast before calling, as ``Dense`` does).
    v: ``[D // num_groups]`` unit vector (treated as a constant: its gradient is 0).
    num_groups: static Python int ``G``; ``D`` must be divisible by it.
    scale: static Python float multiplying the (compressed) kernel gradient.

  Returns ``x @ kernel`` as ``Dense`` computes it (bit-identical forward). Backward: ``dx`` exact,
  ``dkernel = scale * x^^T dy`` with ``x^_g = (x_g . v) v``.
  """
  if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
    raise ValueError(f'kernel must be [{x.shape[-1]}, out], got {kernel.shape}')
  _check_groups(x.shape[-1], num_groups)
  return _velora_matmul_fn(int(num_groups), float(scale))(x, kernel, v)


def random_unit_vector(key: jax.Array, size: int) -> jax.Array:
  """``normalize(uniform[0, 1)^size)`` in float32, as the official random init."""
  u = jax.random.uniform(key, (size,), jnp.float32)
  return u / jnp.maximum(jnp.linalg.norm(u), _NORM_EPS)


def resolve_num_groups(in_features: int, num_groups: int | None,
                       sub_token_size: int | None) -> int:
  """num_groups from exactly one of (num_groups, sub_token_size); default 32."""
  if num_groups is not None and sub_token_size is not None:
    raise ValueError('give only one of num_groups and sub_token_size, got '
                     f'num_groups={num_groups!r}, sub_token_size={sub_token_size!r}')
  if sub_token_size is not None:
    if (isinstance(sub_token_size, bool) or not isinstance(sub_token_size, int)
        or sub_token_size <= 0):
      raise ValueError(f'sub_token_size must be a positive int, got {sub_token_size!r}')
    if in_features % sub_token_size:
      raise ValueError(
          f'VeLoRA: in_features ({in_features}) must be divisible by sub_token_size '
          f'({sub_token_size}); valid sub_token_size values are the divisors of '
          f'{in_features}: {_divisors(in_features)}')
    return in_features // sub_token_size
  if num_groups is None:
    num_groups = DEFAULT_NUM_GROUPS
  _check_groups(in_features, num_groups)
  return num_groups


# ---------------------------------------------------------------------------
# Module.


class VeLoRAInput:
  """Mixin: VeLoRA compression of a layer's input, with its state on the layer itself.

  ``init_velora`` creates ``v`` (:class:`VeLoRAVector`) and ``initialised``
  (:class:`VeLoRAInitialised`); ``velora_dot(x, kernel)`` is ``x @ kernel``
  whose backward keeps only the sub-token projections of ``x``, updating ``v``
  as ``v_init`` says. Used by :class:`VeLoRALinear` (on its kernel) and by
  ``LoRALinear`` (on its adapter's input).
  """

  def init_velora(self, in_features: int, *, num_groups: int | None, sub_token_size: int | None,
                  scale: float, v_init: str, key: jax.Array) -> None:
    if v_init not in V_INITS:
      raise ValueError(f'unknown v_init {v_init!r}; valid: {list(V_INITS)}')
    self.num_groups = resolve_num_groups(int(in_features), num_groups, sub_token_size)
    self.sub_token_size = int(in_features) // self.num_groups
    self.velora_scale = float(scale)
    self.v_init = v_init
    self.v = VeLoRAVector(random_unit_vector(key, self.sub_token_size))
    self.initialised = VeLoRAInitialised(jnp.asarray(v_init == 'random', jnp.int32))

  def velora_dot(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    v, initialised = next_velora_vector(x, self.v[...], self.initialised[...], self.num_groups,
                                        self.v_init)
    if self.v_init != 'random':
      self.v[...] = v
      self.initialised[...] = initialised
    return velora_matmul(x, kernel, jax.lax.stop_gradient(v), self.num_groups, self.velora_scale)


class VeLoRALinear(nnx.Module, VeLoRAInput):
  """``Dense`` with VeLoRA-compressed saved input: ``y = x @ kernel`` (exact forward).

  Same constructor as :class:`~lowrank_jax.nn.Dense` (the kernel is drawn with
  the same key, so it equals the ``Dense`` kernel for the same ``rngs``, and the
  ``rngs`` stream is advanced identically), plus:

  Args:
    num_groups: number of sub-tokens per token (``in_features`` must be
      divisible by it). Default 32 (the official default) when neither this nor
      ``sub_token_size`` is given.
    sub_token_size: alternatively, the sub-token size ``in_features / num_groups``.
      Handy as a single factory option for layers of different widths.
    scale: multiplies the (compressed) kernel gradient (official ``velora_scale``).
    v_init: ``'batch_average_once'`` | ``'batch_average'`` | ``'random'`` (see module doc).

  Variables: ``kernel`` (``nnx.Param``), ``v`` (:class:`VeLoRAVector`, float32
  ``[sub_token_size]``), ``initialised`` (:class:`VeLoRAInitialised`, int32
  scalar). Calling the layer updates ``v``/``initialised`` in place (a state
  update under ``jit``: return the non-Param state after the call). As NNX
  only lets a trace mutate Variables created in that trace, pass the non-Param
  state into the jitted / differentiated function as data (e.g. the pure dict
  of ``nnx.split(model, nnx.Param, ...)``, as the trainer does) and merge there;
  do not close over a ``State`` built outside it.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      num_groups: int | None = None,
      sub_token_size: int | None = None,
      scale: float = 1.0,
      v_init: str = 'batch_average_once',
      dtype: DTypeLike = jnp.float32,
      param_dtype: DTypeLike = jnp.float32,
      kernel_init: Initializer = default_kernel_init,
      rngs: nnx.Rngs,
  ):
    # One draw, as Dense (the rest of the model inits identically); v comes from the same key.
    key = init_linear(self, in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=kernel_init, rngs=rngs)
    self.init_velora(self.in_features, num_groups=num_groups, sub_token_size=sub_token_size,
                     scale=scale, v_init=v_init, key=jax.random.fold_in(key, 1))

  @property
  def scale(self) -> float:
    return self.velora_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    return self.velora_dot(x, self.kernel[...].astype(self.dtype))
