"""The pieces the model families share: their config's common fields (``ModelConfig``), causal
self-attention, the pre-norm block, the block stack.

Each model supplies what differs (norms, MLP, rotary or learned positions, init);
the attention and residual structure are written once here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax import nn
from lowrank_jax.models.linear_factory import LinearFactory

# dtype names every family accepts, for compute (`dtype`) and storage (`param_dtype`).
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def is_positive_int(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value > 0


def is_positive_number(value: Any) -> bool:
  return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
  """The fields every family's config has, and their checks.

  A family's config subclasses it (keyword-only, frozen), adds its own fields, gives the
  shape fields its defaults, and lists its extra positive fields in ``POSITIVE_INTS`` /
  ``POSITIVE_NUMBERS``; its ``__post_init__`` calls this one first.
  """
  d_model: int
  n_heads: int
  n_layers: int
  d_ff: int                     # MLP width
  norm_eps: float
  init_std: float = 0.02
  dtype: str = 'float32'        # compute dtype: a key of DTYPES
  param_dtype: str = 'float32'  # storage dtype of the parameters: a key of DTYPES
  remat: bool | str = False     # activation checkpointing per block: see REMAT_POLICIES
  attention: str = 'xla'        # the attention kernel: one of ATTENTION_KERNELS

  POSITIVE_INTS: ClassVar[tuple[str, ...]] = ('d_model', 'n_heads', 'n_layers', 'd_ff')
  POSITIVE_NUMBERS: ClassVar[tuple[str, ...]] = ('norm_eps', 'init_std')

  def __post_init__(self):
    cls = type(self).__name__
    for name in self.POSITIVE_INTS:
      if not is_positive_int(value := getattr(self, name)):
        raise ValueError(f'{cls}.{name} must be a positive integer, got {value!r}')
    for name in self.POSITIVE_NUMBERS:
      if not is_positive_number(value := getattr(self, name)):
        raise ValueError(f'{cls}.{name} must be a positive number, got {value!r}')
    if self.d_model % self.n_heads:
      raise ValueError(f'{cls}.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})')
    for name in ('dtype', 'param_dtype'):
      if (value := getattr(self, name)) not in DTYPES:
        raise ValueError(f'{cls}.{name} must be one of {list(DTYPES)}, got {value!r}')
    try:
      remat_policy(self.remat)
    except ValueError as e:
      raise ValueError(f'{cls}.remat: {e}') from None
    if self.attention not in ATTENTION_KERNELS:
      raise ValueError(f'{cls}.attention must be one of {list(ATTENTION_KERNELS)}, got {self.attention!r}')

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return DTYPES[self.param_dtype]


class CausalSelfAttention(nnx.Module):
  """Multi-head causal self-attention with linears `q, k, v, o` from the factory.

  `rope_theta`: rotary embeddings on q and k (LLaMA), or None (GPT-2, learned positions);
  `rope_scaling`: their frequency scaling (`nn.rope.Llama3RopeScaling`), or None.
  `q_kw` / `o_kw`: keyword arguments for the linears (dtypes, init); `o_kw` lets GPT-2
  scale its residual projection's init.
  `causal`: False gives bidirectional attention (ViT).
  `bias`: each of q, k, v, o gets a bias (see `attach_bias`).
  `n_kv_heads`: grouped-query attention (LLaMA's `num_key_value_heads`): k and v have
  `n_kv_heads` heads, each shared by `n_heads / n_kv_heads` query heads. None: `n_heads`.
  `attention`: the kernel computing softmax(q k^T) v (`attend`).
  """

  def __init__(self, d_model: int, n_heads: int, linear_factory: LinearFactory, *, dtype: Any,
               rope_theta: float | None, q_kw: dict, o_kw: dict | None = None,
               causal: bool = True, bias: bool = False, n_kv_heads: int | None = None,
               rope_scaling: Any = None, attention: str = 'xla'):
    self.attention = attention
    self.n_heads = n_heads
    self.n_kv_heads = n_heads if n_kv_heads is None else int(n_kv_heads)
    if self.n_kv_heads <= 0 or n_heads % self.n_kv_heads:
      raise ValueError(f'n_kv_heads ({n_kv_heads}) must be a positive divisor of n_heads ({n_heads})')
    self.head_dim = d_model // n_heads
    kv_features = self.n_kv_heads * self.head_dim
    self.rope_theta = None if rope_theta is None else float(rope_theta)
    self.rope_scaling = rope_scaling
    self.dtype = dtype
    self.causal = bool(causal)
    self.q = linear_factory('q', d_model, d_model, **q_kw)
    self.k = linear_factory('k', d_model, kv_features, **q_kw)
    self.v = linear_factory('v', d_model, kv_features, **q_kw)
    self.o = linear_factory('o', d_model, d_model, **(o_kw or q_kw))
    if bias:
      for layer in (self.q, self.k, self.v, self.o):
        attach_bias(layer, q_kw['param_dtype'])

  def __call__(self, x: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """`positions` int [B, T] (rotary angles; default 0..T-1); `segment_ids` int [B, T]:
    a token attends only to tokens of its own segment (packed examples stay apart)."""
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, -1, self.head_dim)  # noqa: E731
    q, k, v = (heads(linear_with_bias(self.q, x)), heads(linear_with_bias(self.k, x)),
               heads(linear_with_bias(self.v, x)))
    if self.rope_theta is not None:
      if positions is None:
        positions = jnp.arange(t, dtype=jnp.int32)
      q = nn.apply_rope(q, positions, self.rope_theta, self.rope_scaling)
      k = nn.apply_rope(k, positions, self.rope_theta, self.rope_scaling)
    q, k, v = (y.astype(self.dtype) for y in (q, k, v))
    out = attend(q, k, v, causal=self.causal, segment_ids=segment_ids, kernel=self.attention)
    return linear_with_bias(self.o, out.reshape(b, t, self.n_heads * self.head_dim))


# The attention kernels (`attend`): the one softmax(q k^T / sqrt(H)) v, computed three ways.
#   xla     the [T, T] scores as XLA's products (every platform).
#   cudnn   cuDNN's fused flash attention (GPU, bf16): the scores never exist whole.
#   splash  Pallas' splash attention for TPU (flash attention with block-sparse causal and
#           segment masks): the scores never exist whole.
ATTENTION_KERNELS = ('xla', 'cudnn', 'splash')
SPLASH_BLOCK = 128  # splash tiles the sequence in blocks of (a multiple of) this many tokens


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, segment_ids: jax.Array | None = None,
           kernel: str = 'xla', interpret: bool = False) -> jax.Array:
  """softmax(q k^T / sqrt(H) + mask) v in the [B, T, N, H] layout.

  k, v [B, T, K, H] with K dividing N (grouped-query attention: each k/v head serves N / K query
  heads). `segment_ids` int [B, T]: a token sees only its own segment (packed examples stay
  apart). `interpret`: run a Pallas kernel (splash) in its interpreter, for tests off a TPU.
  """
  if kernel not in ATTENTION_KERNELS:
    raise ValueError(f'attention kernel must be one of {list(ATTENTION_KERNELS)}, got {kernel!r}')
  if kernel == 'splash':
    return _splash_attention(q, k, v, causal=causal, segment_ids=segment_ids, interpret=interpret)
  # With packed rows cuDNN takes the segment mask as its additive bias input ([B, 1, T, T], shared by
  # the heads): still fused, at the cost of one bias of T x T per row.
  mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                      implementation='cudnn' if kernel == 'cudnn' else 'xla')


@functools.lru_cache(maxsize=32)
def _splash_kernel(t: int, group: int, causal: bool, interpret: bool) -> Callable:
  """Splash's multi-query kernel for one k/v head and its `group` query heads, sequence length `t`."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
  one = masks.CausalMask((t, t)) if causal else masks.FullMask((t, t))
  block = max(b for b in (512, 256, SPLASH_BLOCK) if t % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                            block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mqa(masks.MultiHeadMask([one] * group), block_sizes=sizes, head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, *, causal, segment_ids, interpret):
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  if t % SPLASH_BLOCK:
    raise ValueError(f'splash attention needs a sequence length that is a multiple of {SPLASH_BLOCK}, got {t}')
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  kernel = _splash_kernel(t, n // kv_heads, bool(causal), bool(interpret))
  # Splash does not scale the scores; its layout is heads first: q [K, N / K, T, H], k and v [K, T, H].
  q = (q * (h ** -0.5)).astype(q.dtype).reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over the k/v heads

  def one_row(q, k, v, segments):
    ids = None if segments is None else splash.SegmentIds(q=segments, kv=segments)
    return per_head(q, k, v, ids)

  out = jax.vmap(one_row, in_axes=(0, 0, 0, None if segment_ids is None else 0))(
      q, k, v, None if segment_ids is None else segment_ids.astype(jnp.int32))
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def attach_bias(layer: nnx.Module, param_dtype: Any) -> nnx.Module:
  """Gives a factory-built linear (any kind) a zero `bias` Param of its output size.

  The factory's kinds are bias-free; checkpoints such as ViT's carry biases. The bias
  lives on the layer itself, beside `kernel` (paths `.../q/kernel`, `.../q/bias`, as in
  Flax and HF), so checkpoint mappings and optimizer masks see one layer; `lora_a` /
  `lora_b` stay beside it. 1-D, so GaLore and weight decay leave it alone.
  """
  layer.bias = nnx.Param(jnp.zeros((layer.out_features,), jnp.dtype(param_dtype)))
  return layer


def linear_with_bias(layer: nnx.Module, x: jax.Array) -> jax.Array:
  """`layer(x)`, plus its bias when `attach_bias` gave it one."""
  y = layer(x)
  bias = getattr(layer, 'bias', None)
  return y if bias is None else y + bias[...].astype(y.dtype)


def _trained_params(module: nnx.Module):
  """An nnx filter: the module's parameters but those its layers freeze (`frozen_params`: LoRA's base
  kernels). A frozen weight is never updated in place, and through a barrier its zero gradient
  would stop being a known zero: a data-parallel step would all-reduce it every step."""
  frozen = {(*path, name) for path, layer in nnx.iter_modules(module) for name in getattr(layer, 'frozen_params', ())}
  return lambda path, variable: isinstance(variable, nnx.Param) and tuple(path) not in frozen


@jax.custom_vjp
def _tie_gradients(x: jax.Array, carriers: list) -> tuple[jax.Array, list]:
  """The identity on (x, carriers) whose backward passes their cotangents through one barrier."""
  return x, carriers


def _tie_fwd(x, carriers):
  return (x, carriers), None


def _tie_bwd(_, cotangents):
  return jax.lax.optimization_barrier(cotangents)


_tie_gradients.defvjp(_tie_fwd, _tie_bwd)


def _behind_barrier(module: nnx.Module, x: jax.Array, **kwargs: Any) -> jax.Array:
  """`module(x, **kwargs)` with `x` and the module's weights through one optimization barrier.

  An identity whose transpose is a barrier too: the module's weight gradients leave the backward
  pass together with the gradient of `x`, i.e. after every backward matmul of the module has read
  the weights. A step that donates the weights and updates each one as soon as its gradient
  exists can then overwrite a weight in place. Without it the TPU compiler updated the attention
  kernels before their last backward read (dx = dy W^T) and so kept a copy of each from the
  forward pass to the backward: 3.6 GiB of a LLaMA 7b step's temporaries (docs/memory.md, "What the
  model does for the peak"). Only attention is wrapped: over the whole block the same barrier
  made the compiler hold AdamW's MLP gradients to the end of the backward pass (+5.7 GiB at 7b).
  Outside a trace the call is plain.
  """
  if not isinstance(x, jax.core.Tracer):
    return module(x, **kwargs)
  graphdef, params, rest = nnx.split(module, _trained_params(module), ...)
  # Int8 weights (`nn.int8_weight`): their gradients leave through carriers, whose values are never
  # read. A carrier through the barrier would have to exist as a zero array from the forward pass to
  # the backward (a bf16 copy of every attention kernel); it is tied to `x` only in the backward.
  is_int8 = nn.int8_weight.is_int8
  carriers = [w.carrier for w in jax.tree.leaves(params, is_leaf=is_int8) if is_int8(w) and w.carrier is not None]
  if carriers:
    params = jax.tree.map(lambda w: dataclasses.replace(w, carrier=None) if is_int8(w) else w, params, is_leaf=is_int8)
  x, params = jax.lax.optimization_barrier((x, params))
  if carriers:
    x, carriers = _tie_gradients(x, carriers)
    stream = iter(carriers)
    params = jax.tree.map(lambda w: dataclasses.replace(w, carrier=next(stream)) if is_int8(w) else w, params,
                          is_leaf=is_int8)
  fresh = nnx.merge(graphdef, params, rest)
  y = fresh(x, **kwargs)
  nnx.update(module, nnx.state(fresh, nnx.Not(nnx.Param)))  # what the call changed besides weights (RNG counts)
  return y


class PreNormBlock(nnx.Module):
  """`x + attn(attn_norm(x))`, then `x + mlp(mlp_norm(x))`, kept in the compute dtype."""

  def __init__(self, attn_norm: nnx.Module, attn: nnx.Module, mlp_norm: nnx.Module, mlp: nnx.Module,
               dtype: Any):
    self.attn_norm = attn_norm
    self.attn = attn
    self.mlp_norm = mlp_norm
    self.mlp = mlp
    self.dtype = dtype

  def __call__(self, x: jax.Array, **attn_kw) -> jax.Array:
    x = (x + _behind_barrier(self.attn, self.attn_norm(x), **attn_kw)).astype(self.dtype)
    return (x + self.mlp(self.mlp_norm(x))).astype(self.dtype)


class DecoderLM(nnx.Module):
  """What LLaMA and GPT-2 share above their blocks: ``model(tokens) = model.logits(model.hidden_states(tokens))``.

  The two halves let a loss run the output head over chunks of positions
  (``lowrank_jax.train.step.chunked_cross_entropy``), so the float32 [tokens, vocab]
  logits never exist whole. A subclass sets ``config`` (with ``tie_embeddings``),
  ``embed``, ``head`` (when not tied) and defines ``hidden_states``.
  """

  def __call__(self, tokens: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """float32 logits [B, T, vocab] of int tokens [B, T]; ``positions`` / ``segment_ids`` int [B, T]
    for packed rows (positions restart, attention stays inside a segment); None: one sequence per row."""
    return self.logits(self.hidden_states(tokens, positions=positions, segment_ids=segment_ids))

  def hidden_states(self, tokens: jax.Array, *, positions: jax.Array | None = None,
                    segment_ids: jax.Array | None = None) -> jax.Array:
    """The final hidden states [B, T, d_model] (after the final norm), in the compute dtype."""
    raise NotImplementedError

  def check_tokens(self, tokens: jax.Array) -> None:
    """Raises ``ValueError`` unless ``tokens`` is [batch, seq] with seq <= ``config.max_seq_len``."""
    if tokens.ndim != 2:
      raise ValueError(f'tokens must have shape [batch, seq], got {tokens.shape}')
    if tokens.shape[1] > self.config.max_seq_len:
      raise ValueError(f'sequence length {tokens.shape[1]} exceeds max_seq_len {self.config.max_seq_len}')

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits [..., vocab] of final hidden states [..., d_model]: the output head, or
    ``hidden @ embedding.T`` when the embeddings are tied (in the compute dtype, then cast)."""
    out = self.embed.attend(hidden) if self.config.tie_embeddings else self.head(hidden)
    return out.astype(jnp.float32)


# `model.remat`: what each block keeps for the backward pass.
#   none:          everything (no recomputation; the most memory).
#   block:         only the block's input; the whole block is recomputed in the backward pass.
#   matmul_inputs: the inputs of the block's linear layers (named MATMUL_INPUT by `nn.Dense`),
#                  what the weight gradients need; the rest (norms, attention, activations,
#                  the matmul outputs) is recomputed from them.
REMAT_POLICIES = ('none', 'block', 'matmul_inputs')
MATMUL_INPUT = nn.MATMUL_INPUT
_CHECKPOINT_POLICIES = {
    'block': jax.checkpoint_policies.nothing_saveable,
    'matmul_inputs': jax.checkpoint_policies.save_only_these_names(MATMUL_INPUT),
}


def remat_policy(remat: bool | str) -> str:
  """`remat` as one of REMAT_POLICIES; the old booleans mean 'block' (True) and 'none' (False)."""
  if isinstance(remat, bool):
    return 'block' if remat else 'none'
  if remat not in REMAT_POLICIES:
    raise ValueError(f'remat must be one of {list(REMAT_POLICIES)} (or a bool), got {remat!r}')
  return remat


def _block_call(block: nnx.Module, x: jax.Array, positions: Any, segment_ids: Any) -> jax.Array:
  return block(x, positions=positions, segment_ids=segment_ids)


_REMAT_BLOCK = {name: nnx.remat(_block_call, policy=policy) for name, policy in _CHECKPOINT_POLICIES.items()}


def run_blocks(blocks: Any, x: jax.Array, *, remat: bool | str, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
  """The block stack, each block under the activation checkpointing `remat` names.

  `remat`: one of REMAT_POLICIES, or a bool (True = 'block', False = 'none').
  `positions` / `segment_ids` ([B, T] or None) go to every block's attention.
  """
  call = _REMAT_BLOCK.get(remat_policy(remat), _block_call)
  for block in blocks:
    x = call(block, x, positions, segment_ids)
  return x

