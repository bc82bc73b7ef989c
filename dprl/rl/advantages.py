"""Group-relative advantages and the difficulty-prior weighting (arXiv 2505.13261).

Everything works on a `[P, G]` block (P prompts, a group of G responses each) at once, in
pure jittable functions:

    adv = compute_advantages(rewards, "grpo")                              # [P, G]
    adv = compute_advantages(rewards, "dr_grpo", "exp", correct=correct, alpha=2.0)

    jitted = jax.jit(compute_advantages,
                     static_argnames=("estimator", "difficulty_weighting"))

Estimators (`ESTIMATORS`, one scalar per response, broadcast to its tokens by the loss):
  grpo     (r_i - mean_g r) / (std_g r + eps), std with ddof=1 (as torch.std in the
           GRPO reference code).
  dr_grpo  r_i - mean_g r (Dr. GRPO drops the std division, which over-weights groups
           that are nearly all right or all wrong).
  rloo     r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - mean_g r).
Each takes `scale_by_std`; only grpo divides by the std by default.

Difficulty weightings (`DIFFICULTY_WEIGHTINGS`): `w(p)` of the group's accuracy p (the
mean of its `correct` flags: the online estimate of how easy the prompt is), positive and
non-increasing in p, multiplying the group's advantages so hard prompts (low p) move the
policy more. As in the paper, a weighting takes the place of GRPO's std division: with a
weighting other than "none", `scale_by_std` defaults to False (pass True to keep both).

All weightings are normalised so that w(0.5) = 1: a prompt solved half the time keeps the
plain (Dr. GRPO) advantage, easier prompts are damped and harder ones amplified. Anchoring
the middle rather than an end keeps the average update size, and with it a learning rate
tuned without weighting, about the same over the moderate prompts that curation keeps.
Note that a group with p = 0 or p = 1 has equal accuracy rewards, so only a format term
can give it non-zero advantages for w to scale.

Groups whose rewards are all equal get exactly zero advantage (floating-point means need
not reproduce a constant exactly), and G = 1 or std = 0 never produce NaN.
"""

from __future__ import annotations

import inspect
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from dprl.rl.registry import Registry

ESTIMATORS = Registry("advantage estimator")
DIFFICULTY_WEIGHTINGS = Registry("difficulty weighting")
register_estimator = ESTIMATORS.register
register_difficulty_weighting = DIFFICULTY_WEIGHTINGS.register

DEFAULT_EPS = 1e-6


# ---------------------------------------------------------------------------------------
# Group statistics
# ---------------------------------------------------------------------------------------


def group_accuracy(correct: jax.Array) -> jax.Array:
  """The fraction of correct responses in each group.

  Args:
    correct: [P, G] bool.

  Returns:
    [P] float32, in [0, 1].
  """
  correct = jnp.asarray(correct)
  if correct.ndim != 2:
    raise ValueError(f"correct must be [P, G] (prompts x group), got shape {correct.shape}")
  if correct.dtype != jnp.bool_:
    raise TypeError(f"correct must be a bool array, got {correct.dtype}; "
                    "pass e.g. `correct.astype(bool)`")
  return jnp.mean(correct.astype(jnp.float32), axis=-1)


def _group_mean(rewards: jax.Array) -> jax.Array:
  return jnp.mean(rewards, axis=-1, keepdims=True)  # [P, 1]


def _group_std(rewards: jax.Array) -> jax.Array:
  """Sample std (ddof=1) over the group, [P, 1]; 0 rather than NaN when G = 1."""
  group_size = rewards.shape[-1]
  centered = rewards - _group_mean(rewards)
  variance = jnp.sum(centered**2, axis=-1, keepdims=True) / max(group_size - 1, 1)
  return jnp.sqrt(variance)


def _is_constant(rewards: jax.Array) -> jax.Array:
  """Whether all rewards of a group are equal, [P, 1] bool."""
  return (jnp.max(rewards, axis=-1, keepdims=True)
          == jnp.min(rewards, axis=-1, keepdims=True))


def _finish(rewards: jax.Array, advantages: jax.Array, scale_by_std,
            eps: float) -> jax.Array:
  """Optional std division, then exact zeros for groups with nothing to learn."""
  # jnp.where rather than `if` so scale_by_std may be a traced bool too.
  scale = jnp.where(scale_by_std, _group_std(rewards) + eps, 1.0)
  advantages = advantages / scale
  return jnp.where(_is_constant(rewards), jnp.zeros_like(advantages), advantages)


# ---------------------------------------------------------------------------------------
# Estimators: rewards [P, G] -> advantages [P, G]
# ---------------------------------------------------------------------------------------


@register_estimator("grpo")
def grpo(rewards: jax.Array, *, scale_by_std=True, eps: float = DEFAULT_EPS) -> jax.Array:
  """GRPO: `(r_i - mean) / (std + eps)`; with scale_by_std=False it is `dr_grpo`."""
  return _finish(rewards, rewards - _group_mean(rewards), scale_by_std, eps)


@register_estimator("dr_grpo")
def dr_grpo(rewards: jax.Array, *, scale_by_std=False,
            eps: float = DEFAULT_EPS) -> jax.Array:
  """Dr. GRPO (arXiv 2503.20783): `r_i - mean`, no std division."""
  return _finish(rewards, rewards - _group_mean(rewards), scale_by_std, eps)


@register_estimator("rloo")
def rloo(rewards: jax.Array, *, scale_by_std=False, eps: float = DEFAULT_EPS) -> jax.Array:
  """REINFORCE leave-one-out: `r_i - mean_{j != i} r_j`."""
  group_size = rewards.shape[-1]
  if group_size == 1:
    # No other sample to form a baseline from; a lone response teaches nothing.
    return jnp.zeros_like(rewards)
  leave_one_out_mean = (jnp.sum(rewards, axis=-1, keepdims=True) - rewards) / (group_size - 1)
  return _finish(rewards, rewards - leave_one_out_mean, scale_by_std, eps)


# ---------------------------------------------------------------------------------------
# Difficulty weightings: group accuracy p [P] -> weight [P], w(0.5) = 1
# ---------------------------------------------------------------------------------------


def _check_param(name: str, value, *, minimum: float, strict: bool = False):
  """Rejects a bad Python-number parameter early; traced values cannot be checked."""
  if isinstance(value, numbers.Real) or (isinstance(value, np.ndarray) and value.ndim == 0):
    bad = value <= minimum if strict else value < minimum
    if bad:
      bound = ">" if strict else ">="
      raise ValueError(f"{name} must be {bound} {minimum} (so the weight stays positive and "
                       f"non-increasing in accuracy), got {value}")


@register_difficulty_weighting("none")
def no_weighting(p: jax.Array) -> jax.Array:
  """w = 1: plain estimator."""
  return jnp.ones_like(p)


@register_difficulty_weighting("linear")
def linear_weighting(p: jax.Array, *, alpha: float = 1.0) -> jax.Array:
  """w = (1 + alpha (1 - p)) / (1 + alpha / 2); alpha >= 0 sets the slope.

  alpha = 1 gives w(0) = 4/3, w(1) = 2/3; positive for every alpha >= 0.
  """
  _check_param("alpha", alpha, minimum=0.0)
  return (1.0 + alpha * (1.0 - p)) / (1.0 + 0.5 * alpha)


@register_difficulty_weighting("exp")
def exp_weighting(p: jax.Array, *, alpha: float = 2.0) -> jax.Array:
  """w = exp(alpha (0.5 - p)), i.e. exp(alpha (1 - p)) normalised at p = 0.5; alpha >= 0.

  alpha = 2 gives w(0) = e, w(1) = 1/e.
  """
  _check_param("alpha", alpha, minimum=0.0)
  return jnp.exp(alpha * (0.5 - p))


@register_difficulty_weighting("steep_exp")
def steep_exp_weighting(p: jax.Array, *, alpha: float = 3.0,
                        gamma: float = 2.0) -> jax.Array:
  """w = exp(alpha ((1 - p)^gamma - 0.5^gamma)); alpha >= 0, gamma > 0.

  The exponent is convex in the error rate for gamma > 1, so the weight rises faster
  the harder the prompt: alpha = 3, gamma = 2 gives w(0) = e^2.25 ~ 9.5, w(0.25) ~ 2.1,
  w(0.75) ~ 0.57, w(1) = e^-0.75 ~ 0.47 (slope at p = 0.5 is -3, vs -2 for "exp").
  The paper's "steep exponential" formula is not public; this is dprl's.
  """
  _check_param("alpha", alpha, minimum=0.0)
  _check_param("gamma", gamma, minimum=0.0, strict=True)
  return jnp.exp(alpha * ((1.0 - p)**gamma - 0.5**gamma))


@register_difficulty_weighting("inverse")
def inverse_weighting(p: jax.Array, *, offset: float = 0.1) -> jax.Array:
  """w = (0.5 + offset) / (p + offset); offset > 0 bounds w(0) at (0.5 + offset) / offset.

  offset = 0.1 gives w(0) = 6, w(1) = 0.55.
  """
  _check_param("offset", offset, minimum=0.0, strict=True)
  return (0.5 + offset) / (p + offset)


@register_difficulty_weighting("sigmoid")
def sigmoid_weighting(p: jax.Array, *, sharpness: float = 6.0) -> jax.Array:
  """w = 2 sigmoid(sharpness (0.5 - p)): a bounded step in (0, 2) centred on p = 0.5.

  sharpness = 6 gives w(0) ~ 1.91, w(1) ~ 0.095; sharpness >= 0.
  """
  _check_param("sharpness", sharpness, minimum=0.0)
  return 2.0 * jax.nn.sigmoid(sharpness * (0.5 - p))


def difficulty_weight(p: jax.Array, difficulty_weighting: str = "none",
                      **params) -> jax.Array:
  """The weight of each group from its accuracy.

  Args:
    p: [P] group accuracies in [0, 1].
    difficulty_weighting: a name in `DIFFICULTY_WEIGHTINGS`.
    **params: the weighting's own parameters (e.g. `alpha`).

  Returns:
    [P] positive weights, non-increasing in p, w(0.5) = 1.
  """
  fn = DIFFICULTY_WEIGHTINGS[difficulty_weighting]
  _check_params(fn, params, f"difficulty weighting {difficulty_weighting!r}")
  return fn(p, **params)


def _check_params(fn, params: dict, what: str):
  accepted = [name for name, parameter in inspect.signature(fn).parameters.items()
              if parameter.kind == inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(params) - set(accepted))
  if unknown:
    raise ValueError(f"{what} got unknown parameter(s) {unknown}; it accepts {accepted}")


# ---------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------


def compute_advantages(rewards: jax.Array,
                       estimator: str = "grpo",
                       difficulty_weighting: str = "none",
                       correct: jax.Array | None = None,
                       *,
                       scale_by_std: bool | None = None,
                       eps: float = DEFAULT_EPS,
                       **weighting_params) -> jax.Array:
  """Advantages of each response relative to its group, optionally difficulty-weighted.

  Args:
    rewards: [P, G] scalar rewards, P prompts x G responses each.
    estimator: a name in `ESTIMATORS` (static under jit).
    difficulty_weighting: a name in `DIFFICULTY_WEIGHTINGS` (static under jit).
    correct: [P, G] bool, whether each response was right; required unless
      difficulty_weighting is "none" (the group accuracy p is its mean).
    scale_by_std: divide by the group's std + eps. None: the estimator's default (only
      grpo) when difficulty_weighting is "none", else False, since the weighting takes
      the std division's place (arXiv 2505.13261).
    eps: added to the std before dividing.
    **weighting_params: the weighting's parameters, e.g. `alpha=2.0` for "exp".

  Returns:
    [P, G] advantages (float32 unless rewards are a wider float); exactly 0 for groups
    whose rewards are all equal.
  """
  rewards = jnp.asarray(rewards)
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be [P, G] (prompts x group), got shape {rewards.shape}")
  if not (jnp.issubdtype(rewards.dtype, jnp.floating)
          or jnp.issubdtype(rewards.dtype, jnp.integer)
          or rewards.dtype == jnp.bool_):
    raise TypeError(f"rewards must be real numbers, got dtype {rewards.dtype}")
  if not jnp.issubdtype(rewards.dtype, jnp.floating):
    rewards = rewards.astype(jnp.float32)

  estimator_fn = ESTIMATORS[estimator]
  weighting_fn = DIFFICULTY_WEIGHTINGS[difficulty_weighting]
  _check_params(weighting_fn, weighting_params,
                f"difficulty weighting {difficulty_weighting!r}")

  if difficulty_weighting != "none":
    if correct is None:
      raise ValueError(f"difficulty weighting {difficulty_weighting!r} needs `correct` "
                       f"([P, G] bool) to compute each group's accuracy")
    correct = jnp.asarray(correct)
    if correct.shape != rewards.shape:
      raise ValueError(f"correct has shape {correct.shape} but rewards have shape "
                       f"{rewards.shape}; they must match")
    if scale_by_std is None:
      scale_by_std = False

  estimator_kwargs = {"eps": eps}
  if scale_by_std is not None:
    estimator_kwargs["scale_by_std"] = scale_by_std
  advantages = estimator_fn(rewards, **estimator_kwargs)

  if difficulty_weighting == "none":
    return advantages
  weight = difficulty_weight(group_accuracy(correct), difficulty_weighting,
                             **weighting_params)  # [P]
  return advantages * weight[:, None].astype(advantages.dtype)
