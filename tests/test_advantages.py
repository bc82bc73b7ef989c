"""Tests for dprl.rl.advantages against NumPy transcriptions of the published formulas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dprl.rl.advantages import (DIFFICULTY_WEIGHTINGS, ESTIMATORS, compute_advantages,
                                difficulty_weight, group_accuracy,
                                register_difficulty_weighting)

EPS = 1e-6

# --- NumPy references: one group at a time, straight from the formulas -----------------


def ref_grpo(r):
  if np.all(r == r[0]):
    return np.zeros_like(r)
  return (r - r.mean()) / (r.std(ddof=1) + EPS)


def ref_dr_grpo(r):
  if np.all(r == r[0]):
    return np.zeros_like(r)
  return r - r.mean()


def ref_rloo(r):
  if np.all(r == r[0]):
    return np.zeros_like(r)
  g = len(r)
  return np.array([r[i] - (r.sum() - r[i]) / (g - 1) for i in range(g)])


REF_ESTIMATORS = {"grpo": ref_grpo, "dr_grpo": ref_dr_grpo, "rloo": ref_rloo}

# w(p) as written in the module docstrings, before normalisation, divided by w(0.5).
_RAW_WEIGHTS = {
    "none": lambda p: 1.0,
    "linear": lambda p, alpha=1.0: 1 + alpha * (1 - p),
    "exp": lambda p, alpha=2.0: np.exp(alpha * (1 - p)),
    "steep_exp": lambda p, alpha=3.0, gamma=2.0: np.exp(alpha * (1 - p)**gamma),
    "inverse": lambda p, offset=0.1: 1 / (p + offset),
    "sigmoid": lambda p, sharpness=6.0: 1 / (1 + np.exp(-sharpness * (0.5 - p))),
}


def ref_weight(name, p, **params):
  raw = _RAW_WEIGHTS[name]
  return raw(p, **params) / raw(0.5, **params)


def ref_advantages(rewards, estimator, weighting="none", correct=None, scale_by_std=None,
                   **params):
  if scale_by_std is None:
    scale_by_std = estimator == "grpo" and weighting == "none"
  out = np.zeros_like(rewards)
  for i, r in enumerate(rewards):
    a = ref_dr_grpo(r) if estimator in ("grpo", "dr_grpo") else ref_rloo(r)
    if scale_by_std and not np.all(r == r[0]):
      a = a / (r.std(ddof=1) + EPS)
    if weighting != "none":
      a = a * ref_weight(weighting, correct[i].mean(), **params)
    out[i] = a
  return out


# --- strategies ------------------------------------------------------------------------

SHAPES = [(1, 1), (3, 1), (1, 2), (4, 5), (2, 8), (8, 8)]


@st.composite
def reward_blocks(draw):
  """[P, G] rewards: binary-ish (with ties, the usual case) or arbitrary floats."""
  shape = draw(st.sampled_from(SHAPES))
  elements = draw(st.sampled_from([
      st.sampled_from([0.0, 0.1, 0.9, 1.0]),
      st.floats(-10, 10, width=32),
  ]))
  return draw(hnp.arrays(np.float32, shape, elements=elements))


def _rounding_atol(rewards, estimator):
  """[P, 1] absolute tolerance for float32 vs float64: centring loses about 1e-7 of the
  largest reward, and grpo then divides that error by the std along with everything."""
  atol = 1e-5 * np.maximum(1.0, np.abs(rewards).max(axis=-1, keepdims=True))
  if estimator == "grpo" and rewards.shape[1] > 1:
    atol = atol / (rewards.astype(np.float64).std(axis=-1, ddof=1, keepdims=True) + EPS)
  return atol


# --- estimators ------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", sorted(REF_ESTIMATORS))
def test_estimator_matches_numpy_reference(estimator):
  rng = np.random.default_rng(0)
  rewards = rng.choice([0.0, 0.1, 0.9, 1.0], size=(16, 8)).astype(np.float32)
  rewards[0] = 1.0  # all equal
  rewards[1] = rng.normal(size=8)
  got = np.asarray(compute_advantages(rewards, estimator))
  want = np.stack([REF_ESTIMATORS[estimator](r) for r in rewards.astype(np.float64)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_grpo_known_values():
  rewards = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
  std = np.std([1, 0, 0, 0], ddof=1)
  np.testing.assert_allclose(compute_advantages(rewards, "grpo"),
                             [[0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std]],
                             rtol=1e-5)
  np.testing.assert_allclose(compute_advantages(rewards, "rloo"),
                             [[1.0, -1 / 3, -1 / 3, -1 / 3]], rtol=1e-6)


@settings(max_examples=60, deadline=None)
@given(reward_blocks(), st.sampled_from(["grpo", "dr_grpo"]))
def test_grpo_advantages_sum_to_zero_over_group(rewards, estimator):
  adv = np.asarray(compute_advantages(rewards, estimator))
  group_size = rewards.shape[1]
  atol = group_size * _rounding_atol(rewards, estimator)
  assert np.all(np.abs(adv.sum(axis=-1, keepdims=True)) <= atol), (adv, rewards)


@settings(max_examples=60, deadline=None)
@given(reward_blocks(), st.sampled_from(sorted(REF_ESTIMATORS)))
def test_estimators_match_reference_property(rewards, estimator):
  got = np.asarray(compute_advantages(rewards, estimator))
  assert np.all(np.isfinite(got))
  want = np.stack([REF_ESTIMATORS[estimator](r) for r in rewards.astype(np.float64)])
  assert np.all(np.abs(got - want) <= _rounding_atol(rewards, estimator) + 1e-5 * np.abs(want))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SHAPES), st.floats(-5, 5, width=32),
       st.sampled_from(sorted(REF_ESTIMATORS)), st.sampled_from(sorted(_RAW_WEIGHTS)))
def test_all_equal_groups_give_exactly_zero(shape, value, estimator, weighting):
  rewards = np.full(shape, value, np.float32)
  correct = np.zeros(shape, bool)
  adv = np.asarray(compute_advantages(rewards, estimator, weighting, correct=correct))
  assert np.all(adv == 0.0)


def test_awkward_constant_group_is_exactly_zero():
  # 0.1 + 0.1 + 0.1 != 0.3 in floating point, so a computed mean is not exactly 0.1.
  rewards = np.full((1, 3), 0.1, np.float32)
  for estimator in ESTIMATORS:
    assert np.all(np.asarray(compute_advantages(rewards, estimator)) == 0.0)


def test_group_size_one_gives_zero_not_nan():
  rewards = np.array([[0.3], [1.0]], np.float32)
  for estimator in ESTIMATORS:
    for scale_by_std in (True, False):
      adv = np.asarray(compute_advantages(rewards, estimator, scale_by_std=scale_by_std))
      assert np.all(adv == 0.0), estimator


# --- difficulty weightings -------------------------------------------------------------

WEIGHT_PARAMS = {
    "none": st.just({}),
    "linear": st.fixed_dictionaries({"alpha": st.floats(0, 10)}),
    "exp": st.fixed_dictionaries({"alpha": st.floats(0, 10)}),
    "steep_exp": st.fixed_dictionaries({"alpha": st.floats(0, 10),
                                        "gamma": st.floats(0.1, 4)}),
    "inverse": st.fixed_dictionaries({"offset": st.floats(1e-3, 2)}),
    "sigmoid": st.fixed_dictionaries({"sharpness": st.floats(0, 30)}),
}


@st.composite
def weighting_and_params(draw):
  name = draw(st.sampled_from(sorted(WEIGHT_PARAMS)))
  return name, draw(WEIGHT_PARAMS[name])


@settings(max_examples=80, deadline=None)
@given(weighting_and_params(),
       hnp.arrays(np.float32, 16, elements=st.floats(0, 1, width=32)))
def test_weights_positive_and_non_increasing_in_accuracy(weighting, p):
  name, params = weighting
  p = np.sort(p)
  w = np.asarray(difficulty_weight(jnp.asarray(p), name, **params))
  assert np.all(w > 0), (w, params)
  assert np.all(np.diff(w) <= 1e-6 * np.abs(w[:-1])), (w, params)


@pytest.mark.parametrize("name", sorted(_RAW_WEIGHTS))
def test_weights_match_reference_and_are_one_at_half(name):
  p = np.linspace(0, 1, 9)
  got = np.asarray(difficulty_weight(jnp.asarray(p, jnp.float32), name))
  np.testing.assert_allclose(got, [ref_weight(name, x) for x in p], rtol=1e-5)
  np.testing.assert_allclose(got[4], 1.0, rtol=1e-6)


def test_every_registered_weighting_is_tested():
  assert set(DIFFICULTY_WEIGHTINGS) == set(_RAW_WEIGHTS) == set(WEIGHT_PARAMS)


def test_group_accuracy():
  correct = np.array([[True, False, True, True], [False] * 4])
  np.testing.assert_allclose(group_accuracy(correct), [0.75, 0.0])


@pytest.mark.parametrize("estimator", sorted(REF_ESTIMATORS))
@pytest.mark.parametrize("weighting, params", [
    ("exp", {}), ("exp", {"alpha": 1.0}), ("steep_exp", {"gamma": 3.0}),
    ("linear", {}), ("inverse", {"offset": 0.2}), ("sigmoid", {}),
])
def test_weighted_advantages_match_reference(estimator, weighting, params):
  rng = np.random.default_rng(1)
  correct = rng.random((6, 8)) < rng.random((6, 1))
  rewards = (0.9 * correct + 0.1 * (rng.random((6, 8)) < 0.7)).astype(np.float32)
  got = compute_advantages(rewards, estimator, weighting, correct=correct, **params)
  want = ref_advantages(rewards.astype(np.float64), estimator, weighting, correct, **params)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_weighting_replaces_std_by_default_and_scale_by_std_keeps_both():
  rng = np.random.default_rng(2)
  correct = rng.random((5, 6)) < 0.5
  rewards = correct.astype(np.float32)
  w = np.asarray(difficulty_weight(group_accuracy(correct), "exp"))[:, None]
  plain_grpo = np.asarray(compute_advantages(rewards, "grpo"))
  centered = np.asarray(compute_advantages(rewards, "dr_grpo"))
  np.testing.assert_allclose(
      compute_advantages(rewards, "grpo", "exp", correct=correct), centered * w, rtol=1e-6)
  np.testing.assert_allclose(
      compute_advantages(rewards, "grpo", "exp", correct=correct, scale_by_std=True),
      plain_grpo * w, rtol=1e-6)
  np.testing.assert_allclose(
      compute_advantages(rewards, "grpo", scale_by_std=False), centered, rtol=1e-6)


# --- jit, registries, errors -----------------------------------------------------------


def test_jit_with_static_names_and_traced_params():
  jitted = jax.jit(compute_advantages, static_argnames=("estimator", "difficulty_weighting"))
  rng = np.random.default_rng(3)
  correct = rng.random((4, 8)) < 0.5
  rewards = correct.astype(np.float32)
  for estimator in ESTIMATORS:
    for weighting in DIFFICULTY_WEIGHTINGS:
      np.testing.assert_allclose(
          jitted(rewards, estimator, weighting, correct),
          compute_advantages(rewards, estimator, weighting, correct), rtol=1e-6)
  # Weighting parameters and scale_by_std may be traced.
  got = jitted(rewards, "rloo", "exp", correct, alpha=jnp.float32(3.0),
               scale_by_std=jnp.array(True))
  want = compute_advantages(rewards, "rloo", "exp", correct, alpha=3.0, scale_by_std=True)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got.dtype == jnp.float32 and got.shape == (4, 8)


def test_integer_and_bool_rewards_are_promoted_to_float():
  rewards = np.array([[1, 0, 0, 1]])
  assert compute_advantages(rewards, "dr_grpo").dtype == jnp.float32
  assert compute_advantages(rewards.astype(bool), "dr_grpo").dtype == jnp.float32


def test_register_new_weighting_is_usable_by_name():
  name = "test_constant_two"
  try:
    @register_difficulty_weighting(name)
    def constant_two(p):
      return 2.0 * jnp.ones_like(p)

    rewards = np.array([[1.0, 0.0]], np.float32)
    np.testing.assert_allclose(
        compute_advantages(rewards, "dr_grpo", name, correct=rewards > 0), [[1.0, -1.0]])
  finally:
    DIFFICULTY_WEIGHTINGS.pop(name, None)


def test_errors_are_clear():
  rewards = np.zeros((2, 4), np.float32)
  correct = np.zeros((2, 4), bool)
  with pytest.raises(ValueError, match=r"unknown advantage estimator 'gpro'.*'dr_grpo'"):
    compute_advantages(rewards, "gpro")
  with pytest.raises(ValueError, match=r"unknown difficulty weighting 'expo'.*'steep_exp'"):
    compute_advantages(rewards, "grpo", "expo", correct=correct)
  with pytest.raises(ValueError, match="needs `correct`"):
    compute_advantages(rewards, "grpo", "exp")
  with pytest.raises(ValueError, match=r"correct has shape \(2, 3\)"):
    compute_advantages(rewards, "grpo", "exp", correct=correct[:, :3])
  with pytest.raises(TypeError, match="bool"):
    compute_advantages(rewards, "grpo", "exp", correct=correct.astype(np.float32))
  with pytest.raises(ValueError, match=r"rewards must be \[P, G\].*\(8,\)"):
    compute_advantages(np.zeros(8), "grpo")
  with pytest.raises(TypeError, match="rewards must be real"):
    compute_advantages(np.zeros((2, 2), np.complex64), "grpo")
  with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['beta'\].*\['alpha'\]"):
    compute_advantages(rewards, "grpo", "exp", correct=correct, beta=1.0)
  with pytest.raises(ValueError, match="unknown parameter"):
    compute_advantages(rewards, "grpo", alpha=1.0)
  with pytest.raises(ValueError, match="alpha must be >= 0"):
    compute_advantages(rewards, "grpo", "exp", correct=correct, alpha=-1.0)
  with pytest.raises(ValueError, match="offset must be > 0"):
    compute_advantages(rewards, "grpo", "inverse", correct=correct, offset=0.0)
  with pytest.raises(ValueError, match=r"correct must be \[P, G\]"):
    group_accuracy(np.zeros(3, bool))
