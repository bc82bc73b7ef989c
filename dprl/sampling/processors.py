"""Logit processing for sampling: temperature, top-k, top-p. Pure, jittable, batched."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Keeps the k largest logits of each row ([B, V]); ties at the threshold are kept."""
  kth = jax.lax.top_k(logits, k)[0][:, -1:]
  return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filter: keeps the smallest set of top tokens whose probability reaches p.

  A token is dropped when the probability mass strictly before it (in descending order)
  already reaches p, so the most likely token always stays.
  """
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < p
  # The smallest kept logit is the threshold in the unsorted row.
  threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, NEG_INF)


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
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
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
