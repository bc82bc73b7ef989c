"""Logit processing for sampling: temperature, top-k, top-p. Pure, jittable, batched."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


# Top-k and top-p find each row's threshold logit by a binary search over the logits'
# float32 bit patterns (32 halvings of a masked count or sum over the vocabulary) rather
# than a sort: on CPU `jax.lax.top_k` and `jnp.sort` of 64 rows x 32,768 logits took 275
# and 325 ms, against 10 and 22 ms searched, in a decode step of ~27 ms (the same kept
# sets, ties included; `benchmarks/sampler.py`'s small model). No library filters so.


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row ([B, V]); ties at the threshold are kept."""
  keys = _sortable_keys(logits)
  # The largest key t with at least k logits >= t is the k-th largest logit's.
  threshold = _search_keys(keys, lambda t: jnp.sum(keys >= t[:, None], axis=-1) >= k, largest=True)
  return jnp.where(keys >= threshold[:, None], logits, NEG_INF)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the smallest set of top tokens whose probability reaches p.

  A token is dropped when the probability mass strictly before it (in descending order)
  already reaches p, so the most likely token always stays; tokens tied with the last
  kept one are kept.
  """
  keys = _sortable_keys(logits)
  probs = jax.nn.softmax(logits, axis=-1)
  # The smallest key t whose strictly larger logits hold less than p: every logit from
  # there up is kept, every one below has at least p before it.
  mass_above_below_p = lambda t: jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=-1) < p
  threshold = _search_keys(keys, mass_above_below_p, largest=False)
  return jnp.where(keys >= threshold[:, None], logits, NEG_INF)


def _sortable_keys(x: jax.Array) -> jax.Array:
  """float32 [B, V] -> uint32 keys in the floats' order (-inf lowest; -0 as +0, as
  comparisons of the floats treat them)."""
  x = jnp.where(x == 0, 0.0, x.astype(jnp.float32))
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(1 << 31))


def _search_keys(keys: jax.Array, pred, *, largest: bool) -> jax.Array:
  """Per row of keys [B, V], the smallest (largest=False) or largest key value t in
  [row min, row max] with pred(t) [B] true, pred monotone in t and true at the max
  (smallest) or at the min (largest). 32 halvings cover the uint32 range."""

  def halve(_, bounds):
    lo, hi = bounds
    active = lo < hi
    span = hi - lo
    if largest:
      mid = lo + (span >> 1) + (span & 1)  # in (lo, hi] while active
      ok = pred(mid)
      return jnp.where(active & ok, mid, lo), jnp.where(active & ~ok, mid - 1, hi)
    mid = lo + (span >> 1)  # in [lo, hi) while active
    ok = pred(mid)
    return jnp.where(active & ~ok, mid + 1, lo), jnp.where(active & ok, mid, hi)

  lo, hi = jax.lax.fori_loop(0, 32, halve, (keys.min(axis=-1), keys.max(axis=-1)))
  return lo


def sample_tokens(uniform: jax.Array, logits: jax.Array, *, temperature: float, top_k: int,
                  top_p: float) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row. uniform: [B] draws in (0, 1) (the sampler draws every
  step's at once, before its decode loop); logits: [B, V] float32.

  Returns tokens [B] int32 and their log-probabilities [B] under softmax(logits /
  temperature), the distribution before truncation (what GRPO's ratio uses; temperature
  0 means greedy, scored under temperature 1).
  """
  scaled = logits if temperature == 0.0 else logits / temperature
  # One max and one exp serve the draw and the log-probability's normaliser; with a
  # filter the draw needs its own.
  top = jnp.max(scaled, axis=-1, keepdims=True)
  weights = jnp.exp(scaled - top)  # [B, V], unnormalised probabilities
  log_norm = top[:, 0] + jnp.log(jnp.sum(weights, axis=-1))
  if temperature == 0.0:
    tokens = first_argmax(logits, top)
  else:
    if top_k > 0 or top_p < 1.0:
      filtered = scaled
      if top_k > 0:
        filtered = top_k_filter(filtered, top_k)
      if top_p < 1.0:
        filtered = top_p_filter(filtered, top_p)
      weights = jnp.exp(filtered - top)  # the maximum always survives the filters
    tokens = inverse_cdf_sample(uniform, weights)
  chosen = jnp.take_along_axis(scaled, tokens[:, None], axis=-1)[:, 0]
  return tokens, chosen - log_norm


def first_argmax(x: jax.Array, row_max: jax.Array) -> jax.Array:
  """`jnp.argmax(x, -1)` for rows x [B, V] without NaN, given their maxima [B, 1]: the
  first index holding the maximum, int32 [B].

  XLA:CPU runs argmax as a reduction over (value, index) pairs that it does not
  vectorise: greedy decode steps of a tiny model took ~125 us against ~97 sampling;
  a comparison with the known maximum and a min over indices are two plain reductions.
  """
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
  return jnp.min(jnp.where(x == row_max, index, x.shape[-1] - 1), axis=-1)


def inverse_cdf_sample(uniform: jax.Array, weights: jax.Array) -> jax.Array:
  """One draw per row from weights / weights.sum() ([B, V], non-negative, unnormalised)
  by inverting the cumulative sum at `uniform` ([B] in (0, 1)).

  `jax.random.categorical` draws V Gumbel variates per row; on CPU that costs half as much
  as the LM head's matmul at V = 32K. Inversion needs one uniform per row and a cumulative
  sum, taken in two levels: over blocks of ~sqrt(V) tokens (one sum per block), then
  inside the block the draw falls in. XLA:CPU runs a cumulative sum as a reduce-window at
  a few ns an element, so one over the whole vocabulary was 2.8 ms of a 32 ms decode step
  at V = 32K and 64 rows (`benchmarks/sampler.py`'s small model), against a sum, which is
  fast, and two short cumulative sums. No library samples from a given uniform this way.
  Zero-weight tokens are never drawn: u is bounded away from 0, the first index whose
  cumulative weight reaches u is taken, and the in-block target is kept inside (0, the
  block's total] whatever the two sums' rounding.
  """
  b, v = weights.shape
  size = 1 << max(0, math.isqrt(v - 1)).bit_length()  # a power of two >= sqrt(V)
  num_blocks = -(-v // size)
  blocks = jnp.pad(weights, ((0, 0), (0, num_blocks * size - v))).reshape(b, num_blocks, size)
  block_cdf = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [B, num_blocks]
  target = uniform * block_cdf[:, -1]  # [B]
  block = jnp.minimum(jnp.sum(block_cdf < target[:, None], axis=-1), num_blocks - 1)  # [B]
  # The mass before the block, as the block search saw it (< target): block_cdf[block - 1].
  before = jnp.take_along_axis(jnp.pad(block_cdf, ((0, 0), (1, 0))), block[:, None], axis=-1)[:, 0]
  inner_cdf = jnp.cumsum(jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0], axis=-1)  # [B, size]
  inner_target = jnp.minimum(target - before, inner_cdf[:, -1])
  tokens = block * size + jnp.sum(inner_cdf < inner_target[:, None], axis=-1)
  return jnp.minimum(tokens, v - 1).astype(jnp.int32)


def draw_uniforms(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniforms in [1e-7, 1) for `sample_tokens`: bounded away from 0 so that a
  zero-probability token is never drawn."""
  return jax.random.uniform(key, shape, minval=1e-7, maxval=1.0)
