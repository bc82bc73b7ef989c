"""The train state (a pytree), its optimizer, and where each of its leaves lives on a mesh.

    optimizer, schedule = make_optimizer(config.optim, total_updates)
    state = create_train_state(params, optimizer, seed)       # step 0
    shardings = train_state_shardings(state, optimizer, mesh)  # same structure

`TrainState` holds everything a resumed run needs besides the data iterator: the step
(completed training steps), the trainable parameters (an `nnx.State` of `nnx.Param`s,
from `nnx.split(model, nnx.Param, ...)`), the optax state, and a raw PRNG key (uint32[2],
which Orbax saves like any array). The model's graphdef is static and kept outside.

Optimizer: global-norm clipping, then AdamW with a learning-rate schedule from
`SCHEDULES` (linear warm-up, then constant or cosine decay), counted in optimizer
updates (several per training step when the rollout batch is split into update batches).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dprl.models import sharding as sharding_lib
from dprl.rl.registry import Registry

SCHEDULES = Registry("learning-rate schedule")
register_schedule = SCHEDULES.register


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as one pytree.

  Attributes:
    step: [] int32, training steps completed (rollout + updates); 0 before the first.
    params: nnx.State of the trainable parameters.
    opt_state: the optax state (its own update count drives the schedule).
    rng: [2] uint32 raw PRNG key; per-step keys are `fold_in(rng, step)`.
  """

  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


# ---------------------------------------------------------------------------------------
# Schedules: (peak, warmup_steps, total_steps, final_ratio) -> optax schedule
# ---------------------------------------------------------------------------------------


def _warmup(peak: float, warmup_steps: int) -> optax.Schedule:
  # Starts above zero so the first update moves the weights (EasyR1's warm-up does too).
  return optax.linear_schedule(peak / max(warmup_steps, 1), peak, max(warmup_steps - 1, 0))


@register_schedule("constant")
def constant_schedule(peak: float, warmup_steps: int, total_steps: int,
                      final_ratio: float) -> optax.Schedule:
  """Linear warm-up to `peak`, then constant."""
  del total_steps, final_ratio
  if warmup_steps <= 0:
    return optax.constant_schedule(peak)
  return optax.join_schedules([_warmup(peak, warmup_steps), optax.constant_schedule(peak)],
                              [warmup_steps])


@register_schedule("cosine")
def cosine_schedule(peak: float, warmup_steps: int, total_steps: int,
                    final_ratio: float) -> optax.Schedule:
  """Linear warm-up to `peak`, then cosine decay to `final_ratio * peak` at total_steps."""
  decay_steps = max(total_steps - warmup_steps, 1)
  cosine = optax.cosine_decay_schedule(peak, decay_steps, alpha=final_ratio)
  if warmup_steps <= 0:
    return cosine
  return optax.join_schedules([_warmup(peak, warmup_steps), cosine], [warmup_steps])


def make_schedule(optim: Mapping[str, Any], total_updates: int) -> optax.Schedule:
  """The schedule named by `optim.schedule`, over `total_updates` optimizer updates."""
  if optim["learning_rate"] < 0:
    raise ValueError(f"optim.learning_rate must be >= 0, got {optim['learning_rate']}")
  if optim["warmup_steps"] < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {optim['warmup_steps']}")
  return SCHEDULES[optim["schedule"]](float(optim["learning_rate"]), int(optim["warmup_steps"]),
                                      int(total_updates), float(optim["final_lr_ratio"]))


def make_optimizer(optim: Mapping[str, Any], total_updates: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Clip by global norm, then AdamW on the schedule.

  Args:
    optim: the config's `optim` section: learning_rate, schedule, warmup_steps,
      final_lr_ratio, weight_decay, b1, b2, eps, max_grad_norm (0 = no clipping).
    total_updates: optimizer updates in the whole run (for the cosine decay).

  Returns:
    (optimizer, schedule); `schedule(count)` is the learning rate of update `count`.
  """
  schedule = make_schedule(optim, total_updates)
  adamw = optax.adamw(schedule, b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                      weight_decay=optim["weight_decay"])
  if optim["max_grad_norm"] and optim["max_grad_norm"] > 0:
    return optax.chain(optax.clip_by_global_norm(optim["max_grad_norm"]), adamw), schedule
  return adamw, schedule


def create_train_state(params: nnx.State, optimizer: optax.GradientTransformation,
                       seed: int) -> TrainState:
  """Step 0 for `params`, a fresh optimizer state and the PRNG key of `seed`."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    rng=jax.random.PRNGKey(seed))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, everything else) of a model."""
  return nnx.split(model, nnx.Param, ...)


# ---------------------------------------------------------------------------------------
# Shardings
# ---------------------------------------------------------------------------------------


def param_shardings(params: nnx.State, mesh: Mesh) -> nnx.State:
  """The partition rules' NamedSharding for every parameter (concrete or abstract)."""
  return sharding_lib.state_shardings(params, mesh)


def train_state_shardings(state: TrainState, optimizer: optax.GradientTransformation,
                          mesh: Mesh) -> TrainState:
  """Shardings for every leaf of `state` (concrete or abstract): optimizer moments follow
  their parameter (so FSDP shards Adam's mu and nu too), everything else is replicated."""
  replicated = NamedSharding(mesh, P())
  params = param_shardings(state.params, mesh)
  opt_state = optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, state.opt_state, params,
      transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated)


def abstract_train_state(params: nnx.State, optimizer: optax.GradientTransformation
                         ) -> TrainState:
  """The ShapeDtypeStructs of the train state of `params` (nothing allocated)."""
  return jax.eval_shape(lambda p: create_train_state(p, optimizer, 0), params)


def place(tree, shardings):
  """device_put every leaf of `tree` into the matching sharding.

  A sharding over several processes' devices takes each process's own copy of the leaf
  (host values, so every process must hold the same: e.g. the same seeded init).
  """

  def one(x, sharding):
    if sharding.is_fully_addressable:
      return jax.device_put(x, sharding)
    return jax.device_put(np.asarray(x), sharding)

  return jax.tree.map(one, tree, shardings)


def tree_copy(tree, shardings=None) -> Any:
  """A copy that does not share buffers with `tree` (so donating one leaves the other)."""
  copy: Callable = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)
  return copy(tree)
