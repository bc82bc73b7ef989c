"""Building blocks shared by the vision tower and the text decoder.

Written as small NNX modules rather than `nnx.Linear`/`nnx.RMSNorm` because parity with
transformers depends on details those do not expose: RMSNorm normalises in float32 and
casts back *before* the weight multiply, and attention soft-maxes in float32.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dprl.models.config import HF_INITIALIZER_RANGE

# Large negative instead of -inf: a fully masked query row (left padding) then gives a
# uniform distribution rather than NaN, and its output is never used.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class Linear(nnx.Module):
  """y = x @ kernel + bias, kernel [in, out] (the transpose of torch's weight)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs,
               param_dtype: Any = jnp.float32, dtype: Any = jnp.float32):
    init = nnx.initializers.normal(HF_INITIALIZER_RANGE)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float, param_dtype: Any = jnp.float32):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """x: [..., D] normalised in float32, cast back to x's dtype, then scaled by scale [D]."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  # transformers casts back to the input dtype before scaling; so do we (bf16 parity).
  return scale.astype(dtype) * x32.astype(dtype)


class GatedMLP(nnx.Module):
  """SwiGLU: down(act(gate(x)) * up(x))."""

  def __init__(self, dim: int, hidden: int, *, act: str, use_bias: bool, rngs: nnx.Rngs,
               param_dtype: Any, dtype: Any):
    kw = dict(use_bias=use_bias, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.gate_proj = Linear(dim, hidden, **kw)
    self.up_proj = Linear(dim, hidden, **kw)
    self.down_proj = Linear(hidden, dim, **kw)
    self.act = act

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: [..., T, H, Dh]; cos, sin: [..., T, Dh] broadcast over heads."""
  return x * cos[..., None, :] + rotate_half(x) * sin[..., None, :]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
              *, return_probs: bool = False, query_chunk: int | None = None
              ) -> tuple[jax.Array, jax.Array | None]:
  """Grouped-query scaled dot-product attention.

  Args:
    q: [B, T, H, Dh]; k, v: [B, S, K, Dh] with H a multiple of K (over a KV cache, laid
      out as `text.KVCache`: `cached_attention`).
    mask: [B, T, S] (or broadcastable), True where query t may attend to key s.
    return_probs: also return the probabilities (then computed whole, unchunked).
    query_chunk: attend this many queries at a time (`lax.map`), so the float32 scores
      are [B, H, query_chunk, S] rather than [B, H, T, S]; exact, as every query's softmax
      row is its own. None: all at once.
  Returns:
    out [B, T, H, Dh] in q's dtype, and the probabilities [B, H, T, S] (float32) if asked.
  """
  b, t, h, dh = q.shape
  if query_chunk is not None and query_chunk < t and not return_probs:
    return _query_chunked_attention(q, k, v, mask, query_chunk), None
  probs = _grouped_probs(q, k, mask)  # [B, K, G, T, S]
  out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
  out = out.reshape(b, t, h, dh)
  return out, (probs.reshape(b, h, t, -1) if return_probs else None)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     *, return_probs: bool = False) -> tuple[jax.Array, jax.Array | None]:
  """`attention` over a KV cache's layout (`text.KVCache`): q [B, T, H, Dh]; k [B, K, Dh, S];
  v [B, K, S, Dh]; mask [B, T, S]. Returns out [B, T, H, Dh] and probabilities [B, H, T, S].

  The G = H / K query heads of a key/value head and the T queries are the rows of one
  matrix product per (b, k): scores [G*T, S] = q [G*T, Dh] @ k [Dh, S], out [G*T, Dh] =
  p [G*T, S] @ v [S, Dh]. Written so, XLA:CPU runs both as batched matrix products
  (YNNPACK) without moving the cache; with a singleton T axis between the heads, as in
  `attention`, it swapped the operands, transposed, and took 27 instead of 21 us a layer
  for a tiny model's decode step.
  """
  b, t, h, dh = q.shape
  kv_heads, s = k.shape[1], k.shape[3]
  g = h // kv_heads
  rows = jnp.transpose(q.reshape(b, t, kv_heads, g, dh), (0, 2, 3, 1, 4)).reshape(b, kv_heads, g * t, dh)
  scores = jnp.einsum("bkrd,bkds->bkrs", rows, k, preferred_element_type=jnp.float32) * (dh**-0.5)
  row_mask = jnp.tile(jnp.broadcast_to(mask, (b, t, s)), (1, g, 1))[:, None]  # row g * T + t: query t
  probs = jax.nn.softmax(jnp.where(row_mask, scores, MASK_VALUE), axis=-1)  # [B, K, G*T, S]
  out = jnp.einsum("bkrs,bksd->bkrd", probs.astype(v.dtype), v)
  out = jnp.transpose(out.reshape(b, kv_heads, g, t, dh), (0, 3, 1, 2, 4)).reshape(b, t, h, dh)
  return out, (probs.reshape(b, h, t, s) if return_probs else None)


def _query_chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                             chunk: int) -> jax.Array:
  """`attention`'s output, `chunk` queries at a time: q [B, T, H, Dh] -> [B, T, H, Dh]."""
  b, t, h, dh = q.shape
  num_chunks = -(-t // chunk)
  pad = num_chunks * chunk - t
  mask = jnp.broadcast_to(mask, (b, t, k.shape[1]))
  # Padding queries attend to nothing (a uniform row) and are cut off at the end.
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
  q = jnp.moveaxis(q.reshape(b, num_chunks, chunk, h, dh), 1, 0)  # [C, B, chunk, H, Dh]
  mask = jnp.moveaxis(mask.reshape(b, num_chunks, chunk, -1), 1, 0)  # [C, B, chunk, S]
  out = jax.lax.map(lambda qm: attention(qm[0], k, v, qm[1])[0], (q, mask))
  return jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * chunk, h, dh)[:, :t]


def attention_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
  """The probabilities `attention` soft-maxes, alone (no values).

  q: [B, T, H, Dh]; k: [B, S, K, Dh]; mask: [B, T, S]. Returns [B, H, T, S] float32, head
  h reading kv head h // (H / K) as in `attention`.
  """
  b, t, h, _ = q.shape
  return _grouped_probs(q, k, mask).reshape(b, h, t, -1)


def _grouped_probs(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
  """q: [B, T, H, Dh], k: [B, S, K, Dh], mask: [B, T, S] -> [B, K, H/K, T, S] float32."""
  b, t, h, dh = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, h // kv_heads, dh)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (dh**-0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, MASK_VALUE)
  return jax.nn.softmax(scores, axis=-1)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment: jax.Array,
                      block: int | None) -> jax.Array:
  """Attention within contiguous segments of a packed sequence (no batch axis).

  q, k, v: [N, H, Dh]; segment: [N] ids, each segment a contiguous run. With `block`,
  every segment must be at most `block` long: a query then only needs the keys of its
  own block and the two beside it, so the cost is N * 3 * block instead of N^2 (the
  vision tower packs hundreds of images whose windows hold <= 64 patches). When no
  segment crosses a block boundary (every window full, as in images whose sides are
  multiples of the window; checked at run time) a block's keys are its own: N * block.
  With `block=None` it is dense masked attention.
  Returns [N, H, Dh].
  """
  n, h, dh = q.shape
  if block is None or block >= n:
    out, _ = attention(q[None], k[None], v[None], (segment[:, None] == segment[None, :])[None])
    return out[0]
  nb = -(-n // block)
  pad = nb * block - n
  # Padding gets its own segment id (-1) so it attends to nothing real.
  qb, kb, vb = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))).reshape(nb, block, h, dh) for x in (q, k, v))
  segb = jnp.pad(segment, (0, pad), constant_values=-1).reshape(nb, block)

  def neighbours(x):  # [nb, block, ...] -> [nb, 3 * block, ...]: previous, own, next block
    fill = jnp.full_like(x[:1], -2) if x.dtype == segb.dtype else jnp.zeros_like(x[:1])
    prev = jnp.concatenate([fill, x[:-1]], axis=0)
    nxt = jnp.concatenate([x[1:], fill], axis=0)
    return jnp.concatenate([prev, x, nxt], axis=1)

  def own_block(qb, kb, vb, segb):
    return attention(qb, kb, vb, segb[:, :, None] == segb[:, None, :])[0]

  def with_neighbours(qb, kb, vb, segb):
    mask = segb[:, :, None] == neighbours(segb)[:, None, :]  # [nb, block, 3 * block]
    return attention(qb, neighbours(kb), neighbours(vb), mask)[0]

  aligned = jnp.all(segb[1:, 0] != segb[:-1, -1])  # no segment runs across a block boundary
  out = jax.lax.cond(aligned, own_block, with_neighbours, qb, kb, vb, segb)
  return out.reshape(nb * block, h, dh)[:n]
