"""The GRPO policy loss: clipped surrogate + KL to a frozen reference, as exact sums.

Per valid token (mask = True):

    rho  = exp(logp - old_logp)
    pg   = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))        (PPO, clip-higher)
    pg   = min(pg, -A c)  where A < 0, if clip_ratio_c = c is given         (dual clip)
    loss = pg + beta * KL(logp, ref_logp)                       (k1, k2 or k3 estimator)

and the per-token losses are aggregated by `aggregation`. `policy_loss` returns
`(loss_sum, denominator, metrics)`; the loss is `loss_sum / denominator`.

Micro-batching and gradient accumulation are exact because nothing is divided by a
batch-dependent quantity inside a micro-batch: for micro-batches k,

    loss = sum_k loss_sum_k / sum_k denominator_k,
    grad = sum_k grad(loss_sum_k) / sum_k denominator_k,

equal to the full-batch loss and gradient for every aggregation (`finalize` divides):
  token_mean               sum over valid tokens / number of valid tokens. Each token's
                           term is local, so sums and counts add up across micro-batches.
  seq_mean_token_mean      sum over sequences of each one's token-mean / number of
                           sequences with >= 1 valid token. A sequence's token-mean only
                           needs its own tokens, which sit in one micro-batch (micro-batches
                           split the batch axis, never the time axis).
  seq_mean_token_sum_norm  Dr. GRPO: sum over sequences of (token sum / max_len) / number
                           of sequences with >= 1 valid token. `max_len` is a constant
                           (the maximum response length), never the batch's own longest.
The denominator of a micro-batch is thus a count the caller sums, so a loss of
`loss_sum_k / global_denominator` can also be differentiated directly when the global
count is known up front.

Metrics come as `{name: (sum, count)}`, summable across micro-batches the same way, then
`finalize_metrics` divides: token-level `clip_frac`, `dual_clip_frac`, `ratio`, `kl`,
`entropy`, and `pg_loss` / `kl_loss` aggregated like the loss.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from dprl.rl.registry import Registry

KL_ESTIMATORS = Registry("KL estimator")
AGGREGATIONS = Registry("loss aggregation")
register_kl_estimator = KL_ESTIMATORS.register
register_aggregation = AGGREGATIONS.register

# exp() of a log-ratio beyond this overflows float32 (and a ratio of e^20 is clipped or
# meaningless anyway); verl and EasyR1 clamp at the same value.
_MAX_LOG_RATIO = 20.0

Metrics = dict[str, tuple[jax.Array, jax.Array]]


# ---------------------------------------------------------------------------------------
# KL estimators: per-token KL(pi || pi_ref) from log-probs of the sampled tokens
# (Schulman, "Approximating KL divergence", 2020)
# ---------------------------------------------------------------------------------------


@register_kl_estimator("k1", "kl")
def kl_k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k1 = logp - ref_logp: unbiased, high variance, can be negative."""
  return logp - ref_logp


@register_kl_estimator("k2", "mse")
def kl_k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k2 = (logp - ref_logp)^2 / 2: biased, low variance, >= 0."""
  return 0.5 * jnp.square(logp - ref_logp)


@register_kl_estimator("k3", "low_var_kl")
def kl_k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k3 = exp(ref - logp) - (ref - logp) - 1: unbiased, low variance, >= 0 (GRPO's)."""
  log_ratio = jnp.clip(ref_logp - logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
  return jnp.exp(log_ratio) - log_ratio - 1.0


# ---------------------------------------------------------------------------------------
# Aggregations: per-token values [B, T] -> (sum, denominator), scalars
# ---------------------------------------------------------------------------------------


def _num_valid_sequences(mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32)


@register_aggregation("token_mean")
def token_mean(values: jax.Array, mask: jax.Array, *, max_len=None):
  """Every valid token weighs the same: long responses count for more."""
  del max_len
  return (jnp.sum(jnp.where(mask, values, 0.0)),
          jnp.sum(mask).astype(jnp.float32))


@register_aggregation("seq_mean_token_mean")
def seq_mean_token_mean(values: jax.Array, mask: jax.Array, *, max_len=None):
  """Every valid sequence weighs the same (the original GRPO loss)."""
  del max_len
  token_sums = jnp.sum(jnp.where(mask, values, 0.0), axis=-1)  # [B]
  token_counts = jnp.sum(mask, axis=-1).astype(jnp.float32)  # [B]
  # Fully masked sequences give 0 / 1 = 0 and are left out of the denominator.
  seq_means = token_sums / jnp.maximum(token_counts, 1.0)
  return jnp.sum(seq_means), _num_valid_sequences(mask)


@register_aggregation("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(values: jax.Array, mask: jax.Array, *, max_len=None):
  """Dr. GRPO: token sums over a constant `max_len`, so no length bias; mean over sequences."""
  if max_len is None:
    raise ValueError("aggregation 'seq_mean_token_sum_norm' needs max_len (the constant "
                     "maximum response length it divides token sums by)")
  if isinstance(max_len, numbers.Real) and max_len <= 0:
    raise ValueError(f"max_len must be > 0, got {max_len}")
  token_sums = jnp.sum(jnp.where(mask, values, 0.0), axis=-1)  # [B]
  return jnp.sum(token_sums) / max_len, _num_valid_sequences(mask)


def aggregate(values: jax.Array, mask: jax.Array, aggregation: str = "token_mean", *,
              max_len: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Aggregates per-token values into `(sum, denominator)`.

  Args:
    values: [B, T] per-token values.
    mask: [B, T] bool, True for tokens that count.
    aggregation: a name in `AGGREGATIONS`.
    max_len: the constant length `seq_mean_token_sum_norm` normalises by.

  Returns:
    (sum, denominator), float32 scalars; the aggregate is sum / denominator.
  """
  return AGGREGATIONS[aggregation](jnp.asarray(values, jnp.float32), jnp.asarray(mask, bool),
                                   max_len=max_len)


# ---------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------


def _token_stat(values: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum over valid tokens, number of valid tokens) of a metric."""
  return token_mean(values.astype(jnp.float32), mask)


def _check_shapes(logp, old_logp, ref_logp, advantages, mask, entropy):
  if logp.ndim != 2:
    raise ValueError(f"logp must be [B, T], got shape {logp.shape}")
  for name, value in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask),
                      ("entropy", entropy)):
    if value is not None and value.shape != logp.shape:
      raise ValueError(f"{name} has shape {value.shape} but logp has shape {logp.shape}; "
                       "they must match ([B, T])")
  if advantages.shape not in (logp.shape[:1], logp.shape):
    raise ValueError(f"advantages must be [B] or [B, T] = {logp.shape[:1]} or "
                     f"{logp.shape}, got shape {advantages.shape}")
  if mask.dtype != jnp.bool_:
    raise TypeError(f"mask must be a bool array, got {mask.dtype}; pass e.g. "
                    "`mask.astype(bool)`")


def _check_clip(eps_low, eps_high, clip_ratio_c):
  # Only Python numbers can be checked; traced values pass through.
  if isinstance(eps_low, numbers.Real) and not 0 <= eps_low < 1:
    raise ValueError(f"eps_low must be in [0, 1) so 1 - eps_low > 0, got {eps_low}")
  if isinstance(eps_high, numbers.Real) and eps_high < 0:
    raise ValueError(f"eps_high must be >= 0, got {eps_high}")
  if isinstance(clip_ratio_c, numbers.Real) and clip_ratio_c <= 1:
    raise ValueError(f"clip_ratio_c must be > 1 (the dual clip bounds -A rho at -A c for "
                     f"A < 0; c <= 1 would cut into the trust region), got {clip_ratio_c}")


def policy_loss(logp: jax.Array,
                old_logp: jax.Array,
                ref_logp: jax.Array | None,
                advantages: jax.Array,
                mask: jax.Array,
                *,
                eps_low: float = 0.2,
                eps_high: float = 0.2,
                clip_ratio_c: float | None = None,
                beta: float = 0.0,
                kl_estimator: str = "k3",
                aggregation: str = "token_mean",
                max_len: int | None = None,
                entropy: jax.Array | None = None) -> tuple[jax.Array, jax.Array, Metrics]:
  """Clipped-surrogate policy loss with KL penalty, as `(loss_sum, denominator, metrics)`.

  Gradients flow only through `logp`; old and reference log-probs and the advantages are
  constants. Padding (mask False) cannot affect the loss or its gradient w.r.t. valid
  tokens, whatever values it holds.

  Args:
    logp: [B, T] log-probs of the sampled tokens under the policy being trained.
    old_logp: [B, T] the same under the policy that sampled them.
    ref_logp: [B, T] the same under the frozen reference policy, or None when beta is 0
      (then no KL is computed).
    advantages: [B] (broadcast over tokens) or [B, T].
    mask: [B, T] bool, True for response tokens that count.
    eps_low, eps_high: the ratio is clipped to [1 - eps_low, 1 + eps_high] (DAPO's
      clip-higher raises eps_high, e.g. 0.28).
    clip_ratio_c: dual-clip constant c > 1 (e.g. 3.0) or None: for A < 0 the loss is at
      most -A c, so a token whose ratio exploded cannot dominate.
    beta: KL coefficient (EasyR1 default 1e-2).
    kl_estimator: a name in `KL_ESTIMATORS` (k1/kl, k2/mse, k3/low_var_kl). Static.
    aggregation: a name in `AGGREGATIONS`. Static.
    max_len: the constant normaliser of `seq_mean_token_sum_norm`.
    entropy: optional [B, T] per-token policy entropy, for the `entropy` metric (see
      `entropy_from_logits`).

  Returns:
    loss_sum: float32 scalar.
    denominator: float32 scalar; the loss is `finalize(loss_sum, denominator)`.
    metrics: {name: (sum, count)} float32 scalars; see `finalize_metrics`.
  """
  logp = jnp.asarray(logp)
  old_logp = jnp.asarray(old_logp)
  ref_logp = None if ref_logp is None else jnp.asarray(ref_logp)
  advantages = jnp.asarray(advantages)
  mask = jnp.asarray(mask)
  entropy = None if entropy is None else jnp.asarray(entropy)
  _check_shapes(logp, old_logp, ref_logp, advantages, mask, entropy)
  _check_clip(eps_low, eps_high, clip_ratio_c)
  aggregate_fn = AGGREGATIONS[aggregation]
  kl_fn = KL_ESTIMATORS[kl_estimator]
  use_kl = not (isinstance(beta, numbers.Real) and beta == 0)
  if use_kl and ref_logp is None:
    raise ValueError(f"beta = {beta} needs ref_logp (the frozen reference's log-probs); "
                     "pass beta=0.0 to train without a KL term")

  # Float32 for the exp and the sums whatever the model's dtype.
  logp = logp.astype(jnp.float32)
  old_logp = jax.lax.stop_gradient(old_logp.astype(jnp.float32))
  advantages = jax.lax.stop_gradient(advantages.astype(jnp.float32))
  if advantages.ndim == 1:
    advantages = jnp.broadcast_to(advantages[:, None], logp.shape)
  # Padding may hold anything (even inf). Neutralising the inputs there, not just masking
  # the per-token outputs, also keeps NaN out of the gradient: a masked-out output still
  # back-propagates 0 * d(output)/d(input), which is NaN when that derivative is inf.
  logp = jnp.where(mask, logp, 0.0)
  old_logp = jnp.where(mask, old_logp, 0.0)
  advantages = jnp.where(mask, advantages, 0.0)

  log_ratio = jnp.clip(logp - old_logp, -_MAX_LOG_RATIO, _MAX_LOG_RATIO)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  pg = jnp.maximum(unclipped, clipped)
  metrics: Metrics = {
      "clip_frac": _token_stat(clipped > unclipped, mask),
      "ratio": _token_stat(ratio, mask),
  }
  if clip_ratio_c is not None:
    dual_bound = -advantages * clip_ratio_c
    dual_clipped = (advantages < 0) & (dual_bound < pg)
    pg = jnp.where(dual_clipped, dual_bound, pg)
    metrics["dual_clip_frac"] = _token_stat(dual_clipped, mask)
  metrics["pg_loss"] = aggregate_fn(pg, mask, max_len=max_len)

  loss = pg
  if ref_logp is not None:
    ref_logp = jax.lax.stop_gradient(jnp.where(mask, ref_logp.astype(jnp.float32), 0.0))
    kl = kl_fn(logp, ref_logp)
    metrics["kl"] = _token_stat(kl, mask)
    metrics["kl_loss"] = aggregate_fn(kl, mask, max_len=max_len)
    if use_kl:
      loss = pg + beta * kl
  if entropy is not None:
    metrics["entropy"] = _token_stat(entropy, mask)

  loss_sum, denominator = aggregate_fn(loss, mask, max_len=max_len)
  return loss_sum, denominator, metrics


def finalize(loss_sum: jax.Array, denominator: jax.Array) -> jax.Array:
  """loss_sum / denominator, 0 for an empty batch (no valid token) instead of NaN."""
  return loss_sum / jnp.maximum(denominator, 1e-8)


def finalize_metrics(metrics: Mapping[str, tuple[jax.Array, jax.Array]]
                     ) -> dict[str, jax.Array]:
  """{name: sum / count} from (possibly micro-batch-summed) `(sum, count)` metrics."""
  return {name: finalize(total, count) for name, (total, count) in metrics.items()}


# ---------------------------------------------------------------------------------------
# Entropy
# ---------------------------------------------------------------------------------------


def _entropy_f32(logits: jax.Array) -> jax.Array:
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def entropy_from_logits(logits: jax.Array, *, chunk_size: int = 512) -> jax.Array:
  """Per-token entropy of the softmax over the vocabulary, in float32.

  The float32 copy of the logits exists for `chunk_size` positions at a time: for
  Qwen2.5-VL's 152K vocabulary a whole [B, T, V] upcast would be several GiB.

  Args:
    logits: [B, T, V], any float dtype.
    chunk_size: positions (along T) upcast at once.

  Returns:
    [B, T] float32 entropies (nats).
  """
  logits = jnp.asarray(logits)
  if logits.ndim != 3:
    raise ValueError(f"logits must be [B, T, V], got shape {logits.shape}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  batch, length, _ = logits.shape
  chunk = min(chunk_size, length)
  if chunk == length:
    return _entropy_f32(logits)
  num_chunks = -(-length // chunk)

  def body(i, out):
    # The last chunk is shifted left to stay in bounds; it rewrites identical values.
    start = jnp.minimum(i * chunk, length - chunk)
    piece = jax.lax.dynamic_slice_in_dim(logits, start, chunk, axis=1)
    return jax.lax.dynamic_update_slice_in_dim(out, _entropy_f32(piece), start, axis=1)

  return jax.lax.fori_loop(0, num_chunks, body, jnp.zeros((batch, length), jnp.float32))

