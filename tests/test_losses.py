"""Tests for dprl.rl.losses against NumPy transcriptions of the formulas."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dprl.rl.losses import (AGGREGATIONS, KL_ESTIMATORS, aggregate, entropy_from_logits,
                            finalize, finalize_metrics, policy_loss)

MAX_LEN = 16

# --- NumPy references ------------------------------------------------------------------

REF_KL = {
    "k1": lambda logp, ref: logp - ref,
    "k2": lambda logp, ref: 0.5 * (logp - ref)**2,
    "k3": lambda logp, ref: np.exp(ref - logp) - (ref - logp) - 1,
}


def ref_token_loss(logp, old_logp, ref_logp, adv, *, eps_low=0.2, eps_high=0.2,
                   clip_ratio_c=None, beta=0.0, kl_estimator="k3"):
  if adv.ndim == 1:
    adv = np.repeat(adv[:, None], logp.shape[1], axis=1)
  ratio = np.exp(logp - old_logp)
  pg = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))
  if clip_ratio_c is not None:
    pg = np.where(adv < 0, np.minimum(pg, -adv * clip_ratio_c), pg)
  if beta:
    pg = pg + beta * REF_KL[kl_estimator](logp, ref_logp)
  return pg


def ref_aggregate(values, mask, aggregation, max_len=MAX_LEN):
  """The mean over the batch, one sequence at a time."""
  if aggregation == "token_mean":
    return values[mask].sum() / max(mask.sum(), 1)
  per_sequence = []
  for row, row_mask in zip(values, mask):
    if not row_mask.any():
      continue
    if aggregation == "seq_mean_token_mean":
      per_sequence.append(row[row_mask].mean())
    else:
      per_sequence.append(row[row_mask].sum() / max_len)
  return np.mean(per_sequence) if per_sequence else 0.0


def random_batch(seed, batch=6, length=10, adv_per_token=False):
  rng = np.random.default_rng(seed)
  old_logp = -rng.exponential(1.0, (batch, length))
  logp = old_logp + rng.normal(0, 0.3, (batch, length))
  ref_logp = old_logp + rng.normal(0, 0.3, (batch, length))
  adv = rng.normal(size=(batch, length) if adv_per_token else batch)
  lengths = rng.integers(0, length + 1, batch)
  lengths[0] = length
  mask = np.arange(length)[None, :] < lengths[:, None]
  f32 = lambda x: x.astype(np.float32)
  return f32(logp), f32(old_logp), f32(ref_logp), f32(adv), mask


LOSS_CONFIGS = [
    dict(),
    dict(eps_high=0.28, beta=0.01, kl_estimator="k3"),
    dict(clip_ratio_c=3.0, beta=0.1, kl_estimator="k1"),
    dict(eps_low=0.1, eps_high=0.1, clip_ratio_c=2.0, beta=0.05, kl_estimator="k2"),
]


# --- loss values -----------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("config", LOSS_CONFIGS)
@pytest.mark.parametrize("adv_per_token", [False, True])
def test_loss_matches_numpy_reference(aggregation, config, adv_per_token):
  logp, old_logp, ref_logp, adv, mask = random_batch(0, adv_per_token=adv_per_token)
  loss_sum, denominator, _ = policy_loss(logp, old_logp, ref_logp, adv, mask,
                                         aggregation=aggregation, max_len=MAX_LEN, **config)
  want = ref_aggregate(
      ref_token_loss(*(x.astype(np.float64) for x in (logp, old_logp, ref_logp, adv)),
                     **config), mask, aggregation)
  np.testing.assert_allclose(finalize(loss_sum, denominator), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(REF_KL))
def test_kl_estimators_match_numpy(name):
  rng = np.random.default_rng(1)
  logp = -rng.exponential(1.0, 100)
  ref = logp + rng.normal(0, 1.0, 100)
  got = KL_ESTIMATORS[name](jnp.asarray(logp, jnp.float32), jnp.asarray(ref, jnp.float32))
  np.testing.assert_allclose(got, REF_KL[name](logp, ref), rtol=1e-5, atol=1e-6)


def test_kl_aliases_and_k3_properties():
  assert KL_ESTIMATORS["low_var_kl"] is KL_ESTIMATORS["k3"]
  assert KL_ESTIMATORS["kl"] is KL_ESTIMATORS["k1"]
  assert KL_ESTIMATORS["mse"] is KL_ESTIMATORS["k2"]
  x = jnp.linspace(-5, 5, 101)
  assert jnp.all(KL_ESTIMATORS["k3"](x, jnp.zeros_like(x)) >= 0)
  assert KL_ESTIMATORS["k3"](jnp.float32(-1.0), jnp.float32(-1.0)) == 0.0


def test_metrics_match_numpy():
  logp, old_logp, ref_logp, adv, mask = random_batch(2)
  rng = np.random.default_rng(2)
  entropy = rng.random(logp.shape).astype(np.float32)
  _, _, metrics = policy_loss(logp, old_logp, ref_logp, adv, mask, beta=0.01,
                              clip_ratio_c=1.5, entropy=entropy)
  got = finalize_metrics(metrics)
  a = np.repeat(adv[:, None], logp.shape[1], axis=1)
  ratio = np.exp(logp.astype(np.float64) - old_logp)
  clipped = -a * np.clip(ratio, 0.8, 1.2) > -a * ratio
  pg = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.2))
  dual = (a < 0) & (-a * 1.5 < pg)
  np.testing.assert_allclose(got["clip_frac"], clipped[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(got["dual_clip_frac"], dual[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(got["ratio"], ratio[mask].mean(), rtol=1e-5)
  np.testing.assert_allclose(got["kl"], REF_KL["k3"](logp, ref_logp)[mask].mean(), rtol=1e-4)
  np.testing.assert_allclose(got["entropy"], entropy[mask].mean(), rtol=1e-5)
  assert got["clip_frac"] > 0 and got["dual_clip_frac"] > 0  # the batch exercises both
  assert metrics["ratio"][1] == mask.sum()


def test_no_kl_metrics_without_reference():
  logp, old_logp, _, adv, mask = random_batch(3)
  _, _, metrics = policy_loss(logp, old_logp, None, adv, mask)
  assert "kl" not in metrics and "kl_loss" not in metrics and "entropy" not in metrics


# --- exact micro-batching --------------------------------------------------------------


def _loss_and_grad(logp, old_logp, ref_logp, adv, mask, aggregation, config):
  def loss_sum_fn(logp):
    loss_sum, denominator, metrics = policy_loss(
        logp, old_logp, ref_logp, adv, mask, aggregation=aggregation, max_len=MAX_LEN,
        **config)
    return loss_sum, (denominator, metrics)

  (loss_sum, (denominator, metrics)), grad = jax.value_and_grad(
      loss_sum_fn, has_aux=True)(jnp.asarray(logp))
  return loss_sum, denominator, metrics, grad


@pytest.mark.parametrize("aggregation", sorted(AGGREGATIONS))
@pytest.mark.parametrize("config", LOSS_CONFIGS[1:3])
def test_micro_batches_sum_to_full_batch_loss_and_grad(aggregation, config):
  batch = random_batch(4, batch=8, length=12)
  mask = batch[-1]
  mask[3] = False  # a fully padded sequence
  loss_sum, denominator, metrics, grad = _loss_and_grad(*batch, aggregation, config)
  full_loss = finalize(loss_sum, denominator)

  sums, denominators, grads, metric_sums = 0.0, 0.0, [], None
  for part in (slice(0, 3), slice(3, 4), slice(4, 8)):
    m_sum, m_den, m_metrics, m_grad = _loss_and_grad(*(x[part] for x in batch),
                                                     aggregation, config)
    sums, denominators = sums + m_sum, denominators + m_den
    grads.append(m_grad)
    metric_sums = m_metrics if metric_sums is None else jax.tree.map(
        jnp.add, metric_sums, m_metrics)

  np.testing.assert_allclose(denominators, denominator, rtol=0)
  np.testing.assert_allclose(finalize(sums, denominators), full_loss, rtol=1e-6, atol=1e-8)
  # Gradient accumulation: summed grads of the sums over the summed denominator.
  np.testing.assert_allclose(np.concatenate(grads) / denominators, grad / denominator,
                             rtol=1e-6, atol=1e-9)
  for name, value in finalize_metrics(metric_sums).items():
    np.testing.assert_allclose(value, finalize_metrics(metrics)[name], rtol=1e-6,
                               atol=1e-8, err_msg=name)


def test_aggregation_denominators():
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
  values = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [100.0] * 4])
  assert aggregate(values, mask, "token_mean") == pytest.approx((10.0, 4.0))
  assert aggregate(values, mask, "seq_mean_token_mean") == pytest.approx((6.0, 2.0))
  assert aggregate(values, mask, "seq_mean_token_sum_norm",
                   max_len=5) == pytest.approx((2.0, 2.0))


def test_empty_batch_gives_zero_not_nan():
  logp, old_logp, ref_logp, adv, mask = random_batch(5)
  for aggregation in AGGREGATIONS:
    loss_sum, denominator, metrics = policy_loss(
        logp, old_logp, ref_logp, adv, np.zeros_like(mask), beta=0.1,
        aggregation=aggregation, max_len=MAX_LEN)
    assert denominator == 0 and finalize(loss_sum, denominator) == 0.0
    assert all(np.isfinite(v) for v in finalize_metrics(metrics).values())


# --- clipping --------------------------------------------------------------------------


def _token_grads(log_ratio, adv, **config):
  log_ratio = np.asarray(log_ratio, np.float32)[None, :]
  old_logp = np.full_like(log_ratio, -1.0)
  mask = np.ones_like(log_ratio, bool)
  adv = np.asarray(adv, np.float32)[None, :]

  def loss(logp):
    loss_sum, denominator, _ = policy_loss(logp, old_logp, None, adv, mask, **config)
    return loss_sum / denominator

  value, grad = jax.value_and_grad(loss)(jnp.asarray(old_logp + log_ratio))
  return float(value), np.asarray(grad)[0]


def test_gradient_is_zero_where_clipped():
  # Ratios e^0.5 (above 1.2) and e^-0.5 (below 0.8), and 1.05 inside the trust region.
  log_ratio = [0.5, -0.5, 0.5, -0.5, np.log(1.05), np.log(1.05)]
  adv = [1.0, -1.0, -1.0, 1.0, 1.0, -1.0]
  _, grad = _token_grads(log_ratio, adv)
  ratio = np.exp(log_ratio)
  # Clipped: A > 0 and ratio above, or A < 0 and ratio below.
  assert grad[0] == 0.0 and grad[1] == 0.0
  # Not clipped: d(-A rho)/d logp = -A rho, over the 6 tokens of token_mean.
  expected = -np.asarray(adv) * ratio / 6
  np.testing.assert_allclose(grad[2:], expected[2:], rtol=1e-6)


def test_clip_higher_bounds_differ():
  # Ratio 1.25: clipped with eps_high 0.2, not with 0.28.
  log_ratio, adv = [np.log(1.25)], [1.0]
  assert _token_grads(log_ratio, adv, eps_high=0.2)[1][0] == 0.0
  assert _token_grads(log_ratio, adv, eps_high=0.28)[1][0] != 0.0


def test_dual_clip_caps_negative_advantage_loss():
  log_ratio = [2.0, 0.5, 2.0]  # ratio e^2 = 7.4 exceeds c = 3; e^0.5 = 1.65 does not
  adv = [-1.0, -1.0, 1.0]
  without, grad_without = _token_grads(log_ratio, adv)
  with_dual, grad_with = _token_grads(log_ratio, adv, clip_ratio_c=3.0)
  ratio = np.exp(log_ratio)
  # Token 0: -A rho = 7.4 without, -A c = 3 with, and no gradient once capped.
  # Token 2: A > 0 and clipped at 1.2: -1.2 either way.
  np.testing.assert_allclose(without, (ratio[0] + ratio[1] - 1.2) / 3, rtol=1e-6)
  np.testing.assert_allclose(with_dual, (3.0 + ratio[1] - 1.2) / 3, rtol=1e-6)
  assert grad_without[0] != 0.0 and grad_with[0] == 0.0
  np.testing.assert_allclose(grad_with[1:], grad_without[1:])


# --- masks -----------------------------------------------------------------------------

_B, _T = 3, 5


@functools.lru_cache(maxsize=None)
def _jitted_loss_and_grad(aggregation):
  def loss_fn(logp, old_logp, ref_logp, adv, mask):
    loss_sum, denominator, metrics = policy_loss(
        logp, old_logp, ref_logp, adv, mask, beta=0.1, clip_ratio_c=3.0,
        aggregation=aggregation, max_len=MAX_LEN, entropy=jnp.exp(logp))
    return finalize(loss_sum, denominator), finalize_metrics(metrics)

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(sorted(AGGREGATIONS)),
       hnp.arrays(np.bool_, (_B, _T)),
       hnp.arrays(np.float32, (3, _B, _T),
                  elements=st.floats(allow_nan=True, allow_infinity=True, width=32)),
       st.integers(0, 2**16))
def test_padding_values_do_not_change_loss_or_grad(aggregation, mask, padding, seed):
  logp, old_logp, ref_logp, adv, _ = random_batch(seed, batch=_B, length=_T,
                                                  adv_per_token=True)
  fn = _jitted_loss_and_grad(aggregation)
  (loss, metrics), grad = fn(logp, old_logp, ref_logp, adv, mask)
  padded = [np.where(mask, x, p) for x, p in zip((logp, old_logp, ref_logp), padding)]
  (loss_p, metrics_p), grad_p = fn(*padded, np.where(mask, adv, padding[0]), mask)
  assert np.isfinite(loss)
  np.testing.assert_array_equal(loss_p, loss)
  np.testing.assert_array_equal(grad_p, grad)
  assert np.all(np.asarray(grad)[~mask] == 0.0)
  for name in metrics:
    np.testing.assert_array_equal(metrics_p[name], metrics[name], err_msg=name)


# --- jit, entropy, errors --------------------------------------------------------------


def test_jit_with_static_names_and_traced_coefficients():
  logp, old_logp, ref_logp, adv, mask = random_batch(6)
  jitted = jax.jit(policy_loss, static_argnames=("kl_estimator", "aggregation"))
  for aggregation in AGGREGATIONS:
    got = jitted(logp, old_logp, ref_logp, adv, mask, eps_low=jnp.float32(0.2),
                 eps_high=jnp.float32(0.28), clip_ratio_c=jnp.float32(3.0),
                 beta=jnp.float32(0.01), kl_estimator="low_var_kl",
                 aggregation=aggregation, max_len=MAX_LEN)
    want = policy_loss(logp, old_logp, ref_logp, adv, mask, eps_high=0.28,
                       clip_ratio_c=3.0, beta=0.01, kl_estimator="low_var_kl",
                       aggregation=aggregation, max_len=MAX_LEN)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=0)


def test_bfloat16_inputs_are_computed_in_float32():
  logp, old_logp, ref_logp, adv, mask = random_batch(7)
  loss_sum, denominator, _ = policy_loss(jnp.asarray(logp, jnp.bfloat16), old_logp, ref_logp,
                                         adv, mask, beta=0.01)
  assert loss_sum.dtype == jnp.float32 and denominator.dtype == jnp.float32


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 512])
def test_entropy_from_logits_matches_numpy(chunk_size):
  rng = np.random.default_rng(8)
  logits = rng.normal(0, 3, (2, 7, 11)).astype(np.float32)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = -(probs * np.log(probs)).sum(-1)
  got = entropy_from_logits(logits, chunk_size=chunk_size)
  assert got.shape == (2, 7) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  got_bf16 = jax.jit(functools.partial(entropy_from_logits, chunk_size=chunk_size))(
      jnp.asarray(logits, jnp.bfloat16))
  assert got_bf16.dtype == jnp.float32
  np.testing.assert_allclose(got_bf16, want, rtol=0.05, atol=0.05)


def test_errors_are_clear():
  logp, old_logp, ref_logp, adv, mask = random_batch(9)
  call = functools.partial(policy_loss, logp, old_logp, ref_logp, adv, mask)
  with pytest.raises(ValueError, match=r"unknown loss aggregation 'mean'.*'token_mean'"):
    call(aggregation="mean")
  with pytest.raises(ValueError, match=r"unknown KL estimator 'k4'.*'low_var_kl'"):
    call(kl_estimator="k4", beta=0.1)
  with pytest.raises(ValueError, match="needs max_len"):
    call(aggregation="seq_mean_token_sum_norm")
  with pytest.raises(ValueError, match="max_len must be > 0"):
    call(aggregation="seq_mean_token_sum_norm", max_len=0)
  with pytest.raises(ValueError, match="needs ref_logp"):
    policy_loss(logp, old_logp, None, adv, mask, beta=0.1)
  with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
    call(clip_ratio_c=1.0)
  with pytest.raises(ValueError, match=r"eps_low must be in \[0, 1\)"):
    call(eps_low=1.0)
  with pytest.raises(ValueError, match=r"old_logp has shape \(6, 9\)"):
    policy_loss(logp, old_logp[:, :9], ref_logp, adv, mask)
  with pytest.raises(ValueError, match=r"advantages must be \[B\] or \[B, T\]"):
    policy_loss(logp, old_logp, ref_logp, adv[:4], mask)
  with pytest.raises(ValueError, match=r"logp must be \[B, T\]"):
    policy_loss(logp[0], old_logp[0], None, adv, mask[0])
  with pytest.raises(TypeError, match="mask must be a bool"):
    policy_loss(logp, old_logp, ref_logp, adv, mask.astype(np.float32))
  with pytest.raises(ValueError, match=r"logits must be \[B, T, V\]"):
    entropy_from_logits(np.zeros((3, 4)))
