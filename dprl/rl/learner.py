"""The GRPO step and the supervised warm-start step, as jitted pure functions plus a thin
host-side loop.

One GRPO step (`grpo_step`):

  1. rollout: take prompts from the data iterator, sample G responses per prompt
     (`dprl.sampling.generate`), decode and score them (`dprl.rl.rewards`), compute
     group-relative advantages (`dprl.rl.advantages`); with online filtering, drop groups
     whose accuracy is outside [filter_low, filter_high] and take more prompts until the
     batch is full (at most `filter_max_tries` batches);
  2. log-probs of the sampled tokens under the old policy (only when the step makes more
     than one optimizer update: for a single update the old policy is the current one) and
     under the frozen reference (only when beta > 0), micro-batch by micro-batch, with the
     vocabulary projection chunked (`dprl.rl.logprobs`);
  3. `num_iterations` passes over the rollout, each split into update batches of
     `update_batch_size` prompts (x G responses); each update batch is one optimizer update
     whose gradient is accumulated over micro-batches of `micro_batch_size` rows.

Accumulation is exact: each micro-batch contributes the gradient of its loss *sum* and its
*denominator* (`dprl.rl.losses`), and the update divides the summed gradient by the summed
denominator, so the gradient equals that of the whole update batch in one piece.

Jitted functions take the parameters and the train state as arguments (never closed over),
with explicit shardings on the mesh (`data`, `fsdp`, `tensor`): parameters by the partition
rules, batch rows over (`data`, `fsdp`), images replicated. The apply step donates the
train state and the gradient accumulator.

Images travel per row (`Rollout.images`), so any subset of rows can form a micro-batch;
`pack_images` concatenates a micro-batch's images and pads the patches with a dummy image
that no token refers to, to a power-of-two bucket, so jit sees few shapes.

Several processes (multi-host): each process holds the rollout of its own prompts (its
pipeline shard). The sampler gathers the prompts into one global batch and hands each
process back its samples; every count in the configs (prompts per step, rows per update
and per micro-batch) stays global, and each process contributes an equal share of rows
to each micro-batch, stitched by `dprl.parallel.batches.global_batch`. Images are
replicated, so every process packs the micro-batch's images of all processes
(`pack_images_across_processes`). Rollout statistics are taken over all processes, so
every process logs (and checks for NaN) the same metrics. With one process every one of
these steps is the identity.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dprl.models.config import ModelConfig
from dprl.models.qwen2_5_vl import frame_patch_bound
from dprl.parallel import batches as batches_lib
from dprl.rl import advantages as advantages_lib
from dprl.rl import losses as losses_lib
from dprl.rl import rewards as rewards_lib
from dprl.rl.logprobs import DEFAULT_CHUNK_SIZE, response_logprobs
from dprl.rl.registry import Registry
from dprl.rl.train_state import TrainState

log = logging.getLogger(__name__)

# Batch rows are split over both data-parallel axes; fsdp shards parameters as well.
ROW_AXES = ("data", "fsdp")
IMAGE_KEYS = ("pixel_values", "image_grid_thw")
MIN_PATCH_BUCKET = 64  # as the sampler, so rollout and update see the same image shapes

RowImages = tuple[np.ndarray, np.ndarray] | None  # (pixel_values [n, D], grid_thw [k, 3])


# ---------------------------------------------------------------------------------------
# Images per row
# ---------------------------------------------------------------------------------------


def split_images(pixel_values: np.ndarray | None, image_grid_thw: np.ndarray | None,
                 num_images: Sequence[int]) -> list[RowImages]:
  """Splits a batch's packed images into one (pixel_values, grid_thw) per row.

  Args:
    pixel_values: [sum_patches, D] patches of all images, row-major; or None.
    image_grid_thw: [num_images_total, 3]; or None.
    num_images: [B] images per row (the pipeline's `num_images`).

  Returns:
    B entries, None for rows without images.
  """
  num_images = [int(n) for n in num_images]
  if pixel_values is None or image_grid_thw is None or sum(num_images) == 0:
    return [None] * len(num_images)
  grid = np.asarray(image_grid_thw).reshape(-1, 3)
  if sum(num_images) != len(grid):
    raise ValueError(f"num_images sums to {sum(num_images)} but image_grid_thw has "
                     f"{len(grid)} images")
  patches = np.prod(grid, axis=1)
  if int(patches.sum()) != len(pixel_values):
    raise ValueError(f"pixel_values has {len(pixel_values)} patches but image_grid_thw "
                     f"implies {int(patches.sum())}")
  image_ends = np.cumsum(num_images)
  patch_ends = np.concatenate([[0], np.cumsum(patches)])
  rows: list[RowImages] = []
  for end, count in zip(image_ends, num_images):
    if count == 0:
      rows.append(None)
      continue
    start = end - count
    rows.append((pixel_values[patch_ends[start]:patch_ends[end]], grid[start:end]))
  return rows


def _pow2(n: int, minimum: int) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def pack_images(row_images: Sequence[RowImages], patch_dim: int, merge_size: int
                ) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
  """Concatenates rows' images and pads to power-of-two patch and image counts.

  The padding patches form one dummy image (grid (n / merge^2, merge, merge)) after the real
  ones, and the grid is padded with empty (0, 0, 0) images: the k-th image token takes the
  k-th feature row, so neither is ever read, and the real images' features are unchanged
  (attention in the vision tower stays within an image's windows).

  Returns:
    pixel_values [bucket, patch_dim] float32 and image_grid_thw [image_bucket, 3] int32,
    or (None, None) when no row has an image.
  """
  present = [images for images in row_images if images is not None]
  if not present:
    return None, None
  pixel_values = np.concatenate([np.asarray(pv, np.float32) for pv, _ in present])
  grid = np.concatenate([np.asarray(g, np.int32).reshape(-1, 3) for _, g in present])
  if pixel_values.shape[1] != patch_dim:
    raise ValueError(f"pixel_values rows have {pixel_values.shape[1]} values, the model "
                     f"expects {patch_dim}")
  extra = _pow2(len(pixel_values), MIN_PATCH_BUCKET) - len(pixel_values)
  unit = merge_size * merge_size
  if extra % unit:  # only if an image's patch count is not a multiple of merge^2
    extra += unit - extra % unit
  # One-merge-unit frames: no vision attention segment grows with the padding.
  dummy = [[extra // unit, merge_size, merge_size]] if extra else []
  pixel_values = np.concatenate([pixel_values, np.zeros((extra, patch_dim), np.float32)])
  num_grid_rows = _pow2(len(grid) + 1, 1)
  padding = np.zeros((num_grid_rows - len(grid) - len(dummy), 3), np.int32)
  grid = np.concatenate([grid, np.asarray(dummy, np.int32).reshape(-1, 3), padding])
  return pixel_values, grid


def pack_images_across_processes(row_images: Sequence[RowImages], patch_dim: int, merge_size: int,
                                 position: int) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
  """`pack_images` of the rows of every process, the same arrays on every process.

  Args:
    row_images: this process's rows of the micro-batch.
    position: where this process's rows sit in the global micro-batch (their first
      row), so that the k-th image token of the global batch meets the k-th image.
  """
  present = [images for images in row_images if images is not None]
  pixel_values = (np.concatenate([np.asarray(pv, np.float32) for pv, _ in present]) if present
                  else np.zeros((0, patch_dim), np.float32))
  grid = (np.concatenate([np.asarray(g, np.int32).reshape(-1, 3) for _, g in present]) if present
          else np.zeros((0, 3), np.int32))
  pixel_values = batches_lib.concat_across_processes(pixel_values, position)
  grid = batches_lib.concat_across_processes(grid, position)
  if not len(grid):
    return None, None
  return pack_images([(pixel_values, grid)], patch_dim, merge_size)


def pad_prompts_to_widest_process(rollout: Rollout) -> Rollout:
  """The rollout with its prompts left-padded to the widest of all processes' rollouts
  (`global_batch` needs equal shapes on every host); unchanged with one process."""
  if jax.process_count() == 1:
    return rollout
  width = int(batches_lib.every_process(rollout.prompt_ids.shape[1]).max())
  extra = width - rollout.prompt_ids.shape[1]
  if not extra:
    return rollout
  pad = lambda x: np.pad(x, ((0, 0), (extra, 0)))
  return dataclasses.replace(rollout, prompt_ids=pad(rollout.prompt_ids),
                             prompt_mask=pad(rollout.prompt_mask))


# ---------------------------------------------------------------------------------------
# The rollout: what the updates consume
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rollout:
  """B = P * G rows (prompt-major), on the host.

  Attributes:
    prompt_ids: [B, Tp] int32, left-padded.
    prompt_mask: [B, Tp] int32.
    response_ids: [B, N] int32, padding after EOS.
    response_mask: [B, N] int32, 1 up to and including EOS.
    advantages: [B] float32.
    images: B entries of (pixel_values, grid_thw) or None.
    old_logp: [B, N] float32 under the policy that sampled, or None (then the current
      policy, valid for the first update only).
    ref_logp: [B, N] float32 under the reference, or None (beta = 0).
  """

  prompt_ids: np.ndarray
  prompt_mask: np.ndarray
  response_ids: np.ndarray
  response_mask: np.ndarray
  advantages: np.ndarray
  images: list[RowImages]
  old_logp: np.ndarray | None = None
  ref_logp: np.ndarray | None = None

  def __post_init__(self):
    rows = self.prompt_ids.shape[0]
    for name in ("prompt_mask", "response_ids", "response_mask", "advantages", "old_logp",
                 "ref_logp"):
      value = getattr(self, name)
      if value is not None and value.shape[0] != rows:
        raise ValueError(f"Rollout.{name} has {value.shape[0]} rows, prompt_ids has {rows}")
    if len(self.images) != rows:
      raise ValueError(f"Rollout.images has {len(self.images)} rows, prompt_ids has {rows}")

  @property
  def num_rows(self) -> int:
    return self.prompt_ids.shape[0]

  def micro_batch(self, rows: slice, *, patch_dim: int, merge_size: int,
                  pack: Callable[..., tuple[Any, Any]] = pack_images) -> dict[str, np.ndarray]:
    """The arrays of `rows`, images packed by `pack(row_images, patch_dim, merge_size)`;
    only the fields that are set."""
    batch = {
        "prompt_ids": self.prompt_ids[rows].astype(np.int32),
        "prompt_mask": self.prompt_mask[rows].astype(np.int32),
        "response_ids": self.response_ids[rows].astype(np.int32),
        "response_mask": self.response_mask[rows].astype(np.int32),
        "advantages": self.advantages[rows].astype(np.float32),
    }
    if self.old_logp is not None:
      batch["old_logp"] = self.old_logp[rows].astype(np.float32)
    if self.ref_logp is not None:
      batch["ref_logp"] = self.ref_logp[rows].astype(np.float32)
    pixel_values, grid = pack(self.images[rows], patch_dim, merge_size)
    if pixel_values is not None:
      batch["pixel_values"], batch["image_grid_thw"] = pixel_values, grid
    return batch


# ---------------------------------------------------------------------------------------
# Micro-batch losses: (logp, entropy, micro_batch, config) -> (sum, denominator, metrics)
# ---------------------------------------------------------------------------------------

LOSSES = Registry("learner loss")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Static (hashable) loss settings; see `dprl.rl.losses.policy_loss`."""

  eps_low: float = 0.2
  eps_high: float = 0.2
  clip_ratio_c: float | None = None
  beta: float = 0.0
  kl_estimator: str = "k3"
  aggregation: str = "token_mean"
  max_len: int | None = None


@LOSSES.register("grpo")
def grpo_loss(logp, entropy, batch, config: LossConfig):
  """Clipped surrogate + beta KL; old log-probs default to the current ones (no grad)."""
  mask = batch["response_mask"].astype(bool)
  old_logp = batch["old_logp"] if "old_logp" in batch else jax.lax.stop_gradient(logp)
  return losses_lib.policy_loss(
      logp, old_logp, batch.get("ref_logp"), batch["advantages"], mask,
      eps_low=config.eps_low, eps_high=config.eps_high, clip_ratio_c=config.clip_ratio_c,
      beta=config.beta if "ref_logp" in batch else 0.0, kl_estimator=config.kl_estimator,
      aggregation=config.aggregation, max_len=config.max_len, entropy=entropy)


@LOSSES.register("sft")
def sft_loss(logp, entropy, batch, config: LossConfig):
  """Token-mean cross-entropy of the response tokens (the supervised warm start)."""
  del config
  mask = batch["response_mask"].astype(bool)
  nll_sum, count = losses_lib.token_mean(-logp, mask)
  metrics = {"nll": (nll_sum, count),
             "entropy": losses_lib.token_mean(entropy, mask)}
  return nll_sum, count, metrics


# ---------------------------------------------------------------------------------------
# The learner: jitted forward, accumulate and apply on one mesh
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
  """Static learner settings.

  Attributes:
    micro_batch_size: rows per forward/backward (a multiple of data * fsdp).
    logprob_micro_batch_size: rows per no-grad log-prob forward (0: micro_batch_size).
    chunk_size: positions projected to the vocabulary at once.
    temperature: the sampling temperature (log-probs are of logits / temperature).
    loss: LossConfig.
  """

  micro_batch_size: int = 8
  logprob_micro_batch_size: int = 0
  chunk_size: int = DEFAULT_CHUNK_SIZE
  temperature: float = 1.0
  loss: LossConfig = LossConfig()


class Learner:
  """Jitted functions of (params or train state, micro-batch) on one mesh.

  Args:
    graphdef: the model's graphdef from `train_state.split_params`.
    rest: the model's non-trainable state from the same split (usually empty).
    model_config: the model's ModelConfig (image patch layout).
    optimizer, schedule: from `train_state.make_optimizer`.
    mesh: the (data, fsdp, tensor) mesh.
    state_shardings: `train_state.train_state_shardings(...)` on `mesh`.
    config: LearnerConfig.
  """

  def __init__(self, graphdef: nnx.GraphDef, rest: nnx.State, model_config: ModelConfig,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, mesh: Mesh,
               state_shardings: TrainState, config: LearnerConfig):
    self.graphdef = graphdef
    self.rest = rest
    self.optimizer = optimizer
    self.schedule = schedule
    self.mesh = mesh
    self.state_shardings = state_shardings
    self.config = config
    self.patch_dim = model_config.vision.patch_dim
    self.merge_size = model_config.vision.spatial_merge_size
    row_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    for name in ("micro_batch_size", "logprob_micro_batch_size"):
      size = getattr(config, name) or config.micro_batch_size
      if size < 1 or size % row_devices:
        raise ValueError(f"rl.{name} = {size} must be a positive multiple of mesh.data * "
                         f"mesh.fsdp = {row_devices} (batch rows are split over both)")
    self._replicated = NamedSharding(mesh, P())
    self._rows = NamedSharding(mesh, P(ROW_AXES))
    # Several processes: each holds an equal block of every batch's rows, the block at
    # `_row_position` of `processes` (one process: the whole batch, at 0).
    self.processes = jax.process_count()
    self._row_position = 0
    if self.processes > 1:
      rows = batches_lib.process_rows(self._rows, row_devices)
      if row_devices % self.processes or rows.stop - rows.start != row_devices // self.processes:
        raise ValueError(
            f"mesh.data * mesh.fsdp = {row_devices} devices must split the batch rows evenly "
            f"over the {self.processes} processes (this one holds rows {rows.start}:{rows.stop} of "
            f"{row_devices}); keep mesh.tensor within a host")
      self._row_position = rows.start
    self._jitted: dict[Any, Callable] = {}
    self._abstract_accs: dict[Any, Any] = {}  # (batch keys, loss) -> accumulator shapes

  # -- shardings and placement -----------------------------------------------------------

  def batch_shardings(self, batch: Mapping[str, Any]) -> dict[str, NamedSharding]:
    return {key: self._replicated if key in IMAGE_KEYS else self._rows for key in batch}

  def put_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Device arrays of a host micro-batch; with several processes, `batch` holds this
    process's rows (and every process's images, as `host_batch` packs them)."""
    shardings = self.batch_shardings(batch)
    if self.processes > 1:
      return batches_lib.global_batch(batch, self.mesh, {k: s.spec for k, s in shardings.items()})
    return {key: jax.device_put(value, shardings[key]) for key, value in batch.items()}

  def host_batch(self, rollout: Rollout, rows: slice) -> dict[str, np.ndarray]:
    """The micro-batch of this process's `rows` of `rollout`, images packed."""
    if self.processes == 1:
      return rollout.micro_batch(rows, patch_dim=self.patch_dim, merge_size=self.merge_size)
    pack = functools.partial(pack_images_across_processes, position=self._row_position)
    return rollout.micro_batch(rows, patch_dim=self.patch_dim, merge_size=self.merge_size, pack=pack)

  # -- pure functions --------------------------------------------------------------------

  def _forward(self, params, batch, with_entropy: bool = True, frame_bound: int | None = None):
    model = nnx.merge(self.graphdef, params, self.rest)
    # The mesh in context lets the model constrain its activations (rows over data and
    # fsdp, `sharding.ACTIVATION_RULES`); traced, so it holds while jit traces.
    with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      return response_logprobs(
          model, batch["prompt_ids"], batch["prompt_mask"], batch["response_ids"],
          batch["response_mask"], batch.get("pixel_values"), batch.get("image_grid_thw"),
          temperature=self.config.temperature, chunk_size=self.config.chunk_size,
          with_entropy=with_entropy, max_frame_patches=frame_bound)

  def _loss_and_grad(self, params, batch, loss_name: str, frame_bound: int | None = None):
    loss_fn = LOSSES[loss_name]

    def objective(params):
      logp, entropy = self._forward(params, batch, frame_bound=frame_bound)
      loss_sum, denominator, metrics = loss_fn(logp, entropy, batch, self.config.loss)
      return loss_sum, (denominator, metrics)

    (loss_sum, (denominator, metrics)), grads = jax.value_and_grad(
        objective, has_aux=True)(params)
    return {"grads": grads, "loss_sum": loss_sum, "denominator": denominator,
            "metrics": metrics}

  def _accumulate(self, params, batch, acc, *, loss_name: str, frame_bound: int | None = None):
    micro = self._loss_and_grad(params, batch, loss_name, frame_bound)
    return jax.tree.map(jnp.add, acc, micro)

  def _apply(self, state: TrainState, acc) -> tuple[TrainState, dict[str, jax.Array]]:
    denominator = jnp.maximum(acc["denominator"], 1e-8)
    grads = jax.tree.map(lambda g: g / denominator, acc["grads"])
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    count = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
    metrics = {
        "loss": losses_lib.finalize(acc["loss_sum"], acc["denominator"]),
        "grad_norm": optax.tree.norm(grads),
        "lr": self.schedule(count[0][1]) if count else jnp.float32(0.0),
        **losses_lib.finalize_metrics(acc["metrics"]),
    }
    return state.replace(params=params, opt_state=opt_state), metrics

  # -- jitted entry points ---------------------------------------------------------------

  def acc_shardings(self, abstract_acc):
    """The accumulator's shardings: gradients as the parameters, sums replicated."""
    params = self.state_shardings.params
    return {"grads": params,
            **{k: jax.tree.map(lambda _: self._replicated, v)
               for k, v in abstract_acc.items() if k != "grads"}}

  def jitted(self, kind: str, keys: tuple[str, ...], loss_name: str | None = None,
             frame_bound: int | None = None):
    """The jitted `kind` function for batches with `keys`; `frame_bound` is the static
    `max_frame_patches` of the micro-batch's images (see `Qwen2_5_VL.__call__`).

      logprobs    (params, batch) -> (logp, entropy) [B, N] each
      accumulate  (params, batch, acc) -> acc + this micro-batch's (grads, sums)
      apply       (state, acc) -> (state after one optimizer update, metrics)

    "accumulate" and "apply" need the accumulator's shapes first (`abstract_acc`, or
    `zero_acc` which calls it). `.lower(...)` any of them with ShapeDtypeStructs to
    compile ahead of time (`dprl.plan`).
    """
    cache_key = (kind, keys, loss_name, frame_bound)
    if cache_key in self._jitted:
      return self._jitted[cache_key]
    params_sh = self.state_shardings.params
    batch_sh = {key: self._replicated if key in IMAGE_KEYS else self._rows for key in keys}
    if kind == "logprobs":
      fn = jax.jit(functools.partial(self._forward, with_entropy=True, frame_bound=frame_bound),
                   in_shardings=(params_sh, batch_sh),
                   out_shardings=(self._rows, self._rows))
    elif kind == "accumulate":
      abstract = self._abstract_acc(keys, loss_name)
      acc_sh = self.acc_shardings(abstract)
      fn = jax.jit(functools.partial(self._accumulate, loss_name=loss_name, frame_bound=frame_bound),
                   in_shardings=(params_sh, batch_sh, acc_sh), out_shardings=acc_sh,
                   donate_argnums=(2,))
    elif kind == "apply":
      acc_sh = self.acc_shardings(self._abstract_acc(keys, loss_name))
      # Only the state is donated: no output has the accumulator's shapes to reuse.
      fn = jax.jit(self._apply, in_shardings=(self.state_shardings, acc_sh),
                   out_shardings=(self.state_shardings, self._replicated),
                   donate_argnums=(0,))
    else:
      raise ValueError(f"unknown jitted function kind {kind!r}")
    self._jitted[cache_key] = fn
    return fn

  def _abstract_acc(self, keys, loss_name):
    if (keys, loss_name) not in self._abstract_accs:
      raise RuntimeError("abstract_acc (or zero_acc) must run before accumulate")
    return self._abstract_accs[keys, loss_name]

  def abstract_acc(self, params, batch, loss_name: str):
    """The accumulator's ShapeDtypeStructs for micro-batches like `batch` (arrays or
    ShapeDtypeStructs; nothing is allocated), kept for `jitted`."""
    keys = tuple(sorted(batch))
    if (keys, loss_name) not in self._abstract_accs:
      # The metrics a loss reports are only known from tracing it.
      self._abstract_accs[keys, loss_name] = jax.eval_shape(
          functools.partial(self._loss_and_grad, loss_name=loss_name), params, batch)
    return self._abstract_accs[keys, loss_name]

  def zero_acc(self, params, batch, loss_name: str):
    """A zero accumulator shaped like one micro-batch's (grads, sums, metrics)."""
    keys = tuple(sorted(batch))
    cache_key = ("zeros", keys, loss_name)
    if cache_key not in self._jitted:
      abstract = self.abstract_acc(params, batch, loss_name)
      self._jitted[cache_key] = jax.jit(
          lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract),
          out_shardings=self.acc_shardings(abstract))
    return self._jitted[cache_key]()

  # -- host-side loops -------------------------------------------------------------------

  def _row_slices(self, num_rows: int, size: int) -> list[slice]:
    if num_rows % size:
      raise ValueError(f"{num_rows} rows do not split into micro-batches of {size} rows; "
                       f"make the batch a multiple of rl.micro_batch_size")
    return [slice(i, i + size) for i in range(0, num_rows, size)]

  def logprobs(self, params, rollout: Rollout) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs and entropies of all responses under `params`: [B, N] each (host; this
    process's rows with several processes)."""
    size = self.config.logprob_micro_batch_size or self.config.micro_batch_size
    size = min(size, rollout.num_rows * self.processes) // self.processes  # rows of this process
    rollout = pad_prompts_to_widest_process(rollout)
    logps, entropies = [], []
    for rows in self._row_slices(rollout.num_rows, size):
      batch = self.host_batch(rollout, rows)
      batch.pop("old_logp", None), batch.pop("ref_logp", None), batch.pop("advantages")
      fn = self.jitted("logprobs", tuple(sorted(batch)), None, frame_patch_bound(batch.get("image_grid_thw")))
      logp, entropy = fn(params, self.put_batch(batch))
      logps.append(logp), entropies.append(entropy)
    return (np.concatenate([batches_lib.process_local(x) for x in logps]),
            np.concatenate([batches_lib.process_local(x) for x in entropies]))

  def update(self, state: TrainState, rollout: Rollout, *, loss_name: str = "grpo",
             num_iterations: int = 1, update_rows: int | None = None
             ) -> tuple[TrainState, list[dict[str, jax.Array]]]:
    """`num_iterations` passes over the rollout, one optimizer update per update batch.

    Args:
      state: donated.
      rollout: B rows (with several processes: this process's B / processes rows).
      loss_name: a name in `LOSSES`.
      num_iterations: passes over the rollout.
      update_rows: rows per optimizer update, of all processes (default: all B).

    Returns:
      the new state and one metrics dict (device scalars) per optimizer update.
    """
    total_rows = rollout.num_rows * self.processes
    update_rows = update_rows or total_rows
    if total_rows % update_rows:
      raise ValueError(f"the rollout's {total_rows} rows do not split into update "
                       f"batches of {update_rows} rows (rl.update_batch_size x G)")
    micro = min(self.config.micro_batch_size, update_rows)
    if update_rows % self.processes or micro % self.processes:
      raise ValueError(f"update batches of {update_rows} rows and micro-batches of {micro} rows "
                       f"must split over the {self.processes} processes (rl.update_batch_size x G, "
                       "rl.micro_batch_size)")
    num_updates = num_iterations * (total_rows // update_rows)
    # This process's rows of each update batch and micro-batch.
    local_update, local_micro = update_rows // self.processes, micro // self.processes
    rollout = pad_prompts_to_widest_process(rollout)
    if loss_name == "grpo" and rollout.old_logp is None and num_updates > 1:
      raise ValueError(f"{num_updates} optimizer updates on one rollout need its old "
                       "log-probs (Rollout.old_logp): after the first update the current "
                       "policy is no longer the one that sampled")
    metrics = []
    for _ in range(num_iterations):
      for update in self._row_slices(rollout.num_rows, local_update):
        acc = None
        for offset in range(update.start, update.stop, local_micro):
          rows = slice(offset, offset + local_micro)
          if (update_rows % micro) or offset + local_micro > update.stop:
            raise ValueError(f"update batches of {update_rows} rows do not split into "
                             f"micro-batches of {micro} rows (rl.micro_batch_size)")
          host_batch = self.host_batch(rollout, rows)
          bound = frame_patch_bound(host_batch.get("image_grid_thw"))
          batch = self.put_batch(host_batch)
          keys = tuple(sorted(batch))
          if acc is None:
            acc = self.zero_acc(state.params, batch, loss_name)
          acc = self.jitted("accumulate", keys, loss_name, bound)(state.params, batch, acc)
        state, update_metrics = self.jitted("apply", keys, loss_name)(state, acc)
        metrics.append(update_metrics)
    return state, metrics


# ---------------------------------------------------------------------------------------
# Rollouts: sample, score, advantages, online filtering
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How a GRPO step collects its rollout (static, from the config).

  Attributes:
    num_prompts: P, prompts (groups) per step.
    num_samples: G, responses per prompt.
    max_new_tokens, temperature, top_p, top_k, unstack_layers: sampling
      (`dprl.sampling.SamplingConfig`).
    prompt_buckets: the data pipeline's padded prompt widths, which the sampler keeps
      (`dprl.sampling.prompt_width`); () = its default widths.
    eos_token_ids: ids that end a response.
    pad_token_id: written after a response's end.
    vision_token_ids: image/video placeholder ids; a response ends at the first one it
      samples (`end_at_vision_tokens`).
    reward_fn: a name in `dprl.rl.rewards.REWARD_FNS`; reward_params its keyword
      arguments, as (name, value) pairs.
    estimator, difficulty_weighting, scale_by_std, advantage_params: see
      `dprl.rl.advantages.compute_advantages` (params as (name, value) pairs).
    filter_groups: online filtering (EasyR1): keep groups whose accuracy is in
      [filter_low, filter_high], and sample more prompts until P groups are kept.
    filter_max_tries: at most this many batches of prompts per step; if still short,
      the batch is filled with the most recently rejected groups (and a warning logged).
  """

  num_prompts: int
  num_samples: int
  max_new_tokens: int
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  unstack_layers: bool = True
  prompt_buckets: tuple[int, ...] = ()
  eos_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0
  vision_token_ids: tuple[int, ...] = ()
  reward_fn: str = "math"
  reward_params: tuple[tuple[str, Any], ...] = ()
  estimator: str = "grpo"
  difficulty_weighting: str = "none"
  scale_by_std: bool | None = None
  advantage_params: tuple[tuple[str, Any], ...] = ()
  filter_groups: bool = False
  filter_low: float = 0.01
  filter_high: float = 0.99
  filter_max_tries: int = 4


@dataclasses.dataclass
class Group:
  """One prompt and its G scored responses (host).

  Attributes:
    prompt_ids: [t] the prompt's real tokens (padding removed).
    width: the padded prompt length of the batch it came from.
    images: (pixel_values, grid_thw) of the prompt, or None.
    responses: [G, N] int32; response_mask: [G, N] int32.
    rewards: [G] float32; correct: [G] bool; advantages: [G] float32.
    answer, id: the record's reference answer and id.
  """

  prompt_ids: np.ndarray
  width: int
  images: RowImages
  responses: np.ndarray
  response_mask: np.ndarray
  rewards: np.ndarray
  correct: np.ndarray
  advantages: np.ndarray
  answer: str = ""
  id: str = ""

  @property
  def accuracy(self) -> float:
    return float(np.mean(self.correct))


def end_at_vision_tokens(tokens: np.ndarray, lengths: np.ndarray,
                         vision_token_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """Ends each response at its first image/video placeholder token (inclusive).

  The teacher-forced pass cannot feed such a token back as the sampler did (the model
  reads it as an image slot; see `dprl.rl.logprobs`), so what follows it is dropped from
  the loss and the reward, as if the placeholder were an end-of-sequence token.

  Args:
    tokens: [B, N] sampled ids; lengths: [B] valid lengths.
    vision_token_ids: the placeholder ids.

  Returns:
    (lengths [B], mask [B, N] int32).
  """
  is_vision = np.isin(tokens, np.asarray(vision_token_ids))
  first = np.where(is_vision.any(axis=1), np.argmax(is_vision, axis=1) + 1, tokens.shape[1])
  lengths = np.minimum(lengths, first)
  mask = (np.arange(tokens.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
  return lengths, mask


def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """Text of each response up to its length, special tokens (EOS) dropped."""
  return tokenizer.batch_decode([row[:n].tolist() for row, n in zip(tokens, lengths)],
                                skip_special_tokens=True)


def sample_groups(model, batch: Mapping[str, Any], key: jax.Array, config: RolloutConfig,
                  tokenizer, *, mesh: Mesh | None = None,
                  sample_fn: Callable | None = None) -> list[Group]:
  """Samples, decodes and scores G responses for each prompt of a pipeline batch.

  Args:
    model: the current policy (an nnx module whose state is the current params).
    batch: a `dprl.data.pipeline` batch (input_ids, attention_mask, pixel_values,
      image_grid_thw, num_images, answer, id).
    key: PRNG key of this sampling call.
    config: RolloutConfig.
    tokenizer: decodes responses for the reward.
    sample_fn: `dprl.sampling.generate` or a function with its signature.
  """
  if sample_fn is None:
    from dprl.sampling import generate as sample_fn  # pylint: disable=g-import-not-at-top
  input_ids = np.asarray(batch["input_ids"])
  attention_mask = np.asarray(batch["attention_mask"])
  num_prompts, width = input_ids.shape
  group = config.num_samples
  num_images = np.asarray(batch.get("num_images", np.zeros(num_prompts, np.int32)))
  has_images = int(num_images.sum()) > 0
  pixel_values = np.asarray(batch["pixel_values"]) if has_images else None
  grid = np.asarray(batch["image_grid_thw"]) if has_images else None
  out = sample_fn(model, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                  image_grid_thw=grid, max_new_tokens=config.max_new_tokens,
                  temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
                  seed=key, eos_token_id=list(config.eos_token_ids) or None,
                  num_samples=group, pad_token_id=config.pad_token_id, mesh=mesh,
                  unstack_layers=config.unstack_layers, prompt_buckets=config.prompt_buckets or None)
  tokens = np.asarray(out.tokens, np.int32)
  mask = np.asarray(out.mask, np.int32)
  lengths = np.asarray(out.lengths)
  if config.vision_token_ids:
    lengths, mask = end_at_vision_tokens(tokens, lengths, config.vision_token_ids)
  texts = decode_responses(tokenizer, tokens, lengths)
  answers = [str(a) for a in batch["answer"]]
  rewards, correct = rewards_lib.score_responses(
      texts, [a for a in answers for _ in range(group)], reward_fn=config.reward_fn,
      **dict(config.reward_params))
  rewards = rewards.reshape(num_prompts, group)
  correct = correct.reshape(num_prompts, group)
  advantages = np.asarray(advantages_lib.compute_advantages(
      rewards, config.estimator, config.difficulty_weighting,
      correct if config.difficulty_weighting != "none" else None,
      scale_by_std=config.scale_by_std, **dict(config.advantage_params)), np.float32)
  row_images = split_images(pixel_values, grid, num_images)
  ids = batch.get("id", [""] * num_prompts)
  groups = []
  for p in range(num_prompts):
    rows = slice(p * group, (p + 1) * group)
    groups.append(Group(
        prompt_ids=input_ids[p][attention_mask[p].astype(bool)], width=width,
        images=row_images[p], responses=tokens[rows], response_mask=mask[rows],
        rewards=rewards[p], correct=correct[p], advantages=advantages[p],
        answer=answers[p], id=str(ids[p])))
  return groups


def collect_groups(model, batches: Iterator[Mapping[str, Any]], key: jax.Array,
                   config: RolloutConfig, tokenizer, *, mesh: Mesh | None = None,
                   sample_fn: Callable | None = None
                   ) -> tuple[list[Group], dict[str, float]]:
  """P groups for one step, with online filtering if configured.

  With several processes each collects its share, P / processes groups, from its own
  batches; they sample together (the sampler is a collective) until every one has its
  share, so all take the same number of tries.

  Returns:
    the groups and statistics (over all processes): filter_tries (batches sampled),
    filter_kept_frac (of the groups sampled, the fraction that passed), filter_fallback
    (groups taken from the rejected ones because `filter_max_tries` ran out).
  """
  num_prompts = batches_lib.process_share(config.num_prompts, "data.rollout_batch_size")
  fewest_kept = lambda: int(batches_lib.every_process(len(kept)).min())
  kept: list[Group] = []
  rejected: list[Group] = []
  tries = 0
  sampled = 0
  while fewest_kept() < num_prompts:
    if tries >= max(config.filter_max_tries, 1):
      break
    try:
      batch = next(batches)
    except StopIteration:
      raise RuntimeError("the data iterator ran out while collecting a rollout; train with "
                         "data.num_epochs = None (repeat) or fewer total_steps") from None
    groups = sample_groups(model, batch, jax.random.fold_in(key, tries), config, tokenizer,
                           mesh=mesh, sample_fn=sample_fn)
    tries += 1
    sampled += len(groups)
    for group in groups:
      if (not config.filter_groups
          or config.filter_low <= group.accuracy <= config.filter_high):
        kept.append(group)
      else:
        rejected.append(group)
  fallback = max(num_prompts - len(kept), 0)
  # Decided together: a process that raised alone would leave the others waiting.
  if batches_lib.every_process(fallback > len(rejected)).any():
    raise RuntimeError(f"collected {len(kept) + len(rejected)} groups in {tries} batches, "
                       f"fewer than the {num_prompts} prompts a step needs (on a process)")
  if fallback:
    log.warning("online filtering kept %d of %d groups in %d tries (rl.filter_max_tries); "
                "filling the batch with %d rejected groups", len(kept), sampled, tries,
                fallback)
    kept.extend(rejected[-fallback:])
  kept = kept[:num_prompts]
  sampled, num_rejected, fallback = (
      int(v) for v in batches_lib.every_process(np.array([sampled, len(rejected), fallback])).sum(0))
  stats = {"filter_tries": float(tries),
           "filter_kept_frac": float(sampled - num_rejected) / max(sampled, 1),
           "filter_fallback": float(fallback)}
  return kept, stats


def rollout_from_groups(groups: Sequence[Group]) -> Rollout:
  """The prompt-major rollout of `groups` (each prompt repeated G times), left-padded to
  the widest source batch."""
  width = max(group.width for group in groups)
  prompt_ids, prompt_mask, images = [], [], []
  for group in groups:
    ids = np.zeros(width, np.int32)
    mask = np.zeros(width, np.int32)
    n = len(group.prompt_ids)
    ids[width - n:] = group.prompt_ids
    mask[width - n:] = 1
    g = len(group.rewards)
    prompt_ids.append(np.broadcast_to(ids, (g, width)))
    prompt_mask.append(np.broadcast_to(mask, (g, width)))
    images.extend([group.images] * g)
  return Rollout(
      prompt_ids=np.concatenate(prompt_ids), prompt_mask=np.concatenate(prompt_mask),
      response_ids=np.concatenate([g.responses for g in groups]),
      response_mask=np.concatenate([g.response_mask for g in groups]),
      advantages=np.concatenate([g.advantages for g in groups]).astype(np.float32),
      images=images)


def rollout_stats(groups: Sequence[Group], max_new_tokens: int) -> dict[str, float]:
  """Reward, accuracy, length and advantage statistics of the step's groups (of all
  processes: the groups of every process are gathered first)."""
  gather = batches_lib.concat_across_processes
  rewards = gather(np.concatenate([g.rewards for g in groups]))
  correct = gather(np.concatenate([g.correct for g in groups]))
  lengths = gather(np.concatenate([g.response_mask.sum(-1) for g in groups]))
  advantages = gather(np.concatenate([g.advantages for g in groups]))
  zero_advantage = gather(np.array([np.all(g.advantages == 0) for g in groups]))
  return {
      "reward_mean": float(rewards.mean()),
      "reward_std": float(rewards.std()),
      "accuracy": float(correct.mean()),
      "response_len": float(lengths.mean()),
      "response_truncated_frac": float(np.mean(lengths >= max_new_tokens)),
      "advantage_abs_mean": float(np.abs(advantages).mean()),
      "zero_advantage_group_frac": float(np.mean(zero_advantage)),
  }


# ---------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Per-step update settings: passes, update batch (in prompts), KL on/off."""

  num_iterations: int = 1
  update_batch_size: int = 0  # prompts per optimizer update; 0: the whole rollout
  beta: float = 0.0


def grpo_step(learner: Learner, state: TrainState, ref_params, batches: Iterator,
              rollout_config: RolloutConfig, step_config: StepConfig, tokenizer, *,
              sample_fn: Callable | None = None) -> tuple[TrainState, dict[str, float]]:
  """One GRPO step: rollout, old/reference log-probs, updates. `state` is donated.

  Args:
    learner: the Learner on the run's mesh.
    state: the train state; its step counts completed steps.
    ref_params: the frozen reference's params, or None (required when beta > 0).
    batches: the data iterator (pipeline batches of P prompts).
    rollout_config, step_config: see their docstrings.
    tokenizer: for decoding responses.
    sample_fn: the sampler (default `dprl.sampling.generate`).

  Returns:
    the new state (step + 1) and the step's metrics (host floats): the updates' mean of
    loss, pg_loss, kl_loss, kl (0 when beta = 0: no reference is run), clip_frac, ratio,
    entropy, grad_norm, lr; the rollout's reward_mean, accuracy, response_len, ...;
    timings and tokens_per_s (prompt + response tokens trained on per second).
  """
  start = time.perf_counter()
  key = jax.random.fold_in(state.rng, state.step)
  model = nnx.merge(learner.graphdef, state.params, learner.rest)
  groups, stats = collect_groups(model, batches, key, rollout_config, tokenizer,
                                 mesh=learner.mesh, sample_fn=sample_fn)
  rollout = rollout_from_groups(groups)
  sampled = time.perf_counter()

  group = rollout_config.num_samples
  update_rows = (step_config.update_batch_size or rollout_config.num_prompts) * group
  num_rows = rollout.num_rows * learner.processes  # of all processes
  num_updates = step_config.num_iterations * max(num_rows // update_rows, 1)
  if num_updates > 1:
    rollout.old_logp, _ = learner.logprobs(state.params, rollout)
  if step_config.beta > 0:
    if ref_params is None:
      raise ValueError(f"rl.beta = {step_config.beta} needs reference params")
    rollout.ref_logp, _ = learner.logprobs(ref_params, rollout)
  state, update_metrics = learner.update(state, rollout, loss_name="grpo",
                                         num_iterations=step_config.num_iterations,
                                         update_rows=update_rows)
  state = state.replace(step=state.step + 1)
  metrics = mean_metrics(update_metrics)  # waits for the device
  end = time.perf_counter()

  metrics.setdefault("kl", 0.0)
  metrics.update(stats)
  metrics.update(rollout_stats(groups, rollout_config.max_new_tokens))
  tokens = int(batches_lib.every_process(rollout.prompt_mask.sum() + rollout.response_mask.sum()).sum())
  metrics.update({"sample_time_s": sampled - start, "update_time_s": end - sampled,
                  "step_time_s": end - start, "tokens": float(tokens),
                  "tokens_per_s": tokens / max(end - start, 1e-9)})
  return state, metrics


def sft_rollout(batch: Mapping[str, Any], tokenizer, response_format: str,
                max_new_tokens: int, eos_token_id: int) -> Rollout:
  """Supervised targets for a pipeline batch: `response_format.format(answer=...)` + EOS.

  Targets longer than max_new_tokens - 1 are an error naming the record, not truncated
  (a truncated target would teach an answer without its end).
  """
  input_ids = np.asarray(batch["input_ids"], np.int32)
  num_prompts = input_ids.shape[0]
  responses = np.full((num_prompts, max_new_tokens), eos_token_id, np.int32)
  mask = np.zeros((num_prompts, max_new_tokens), np.int32)
  for row, answer in enumerate(batch["answer"]):
    text = response_format.format(answer=answer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_token_id]
    if len(ids) > max_new_tokens:
      record = batch.get("id", ["?"] * num_prompts)[row]
      raise ValueError(f"record {record!r}: the warm-start target {text!r} has {len(ids)} "
                       f"tokens with EOS, above sampling.max_new_tokens = {max_new_tokens}")
    responses[row, :len(ids)] = ids
    mask[row, :len(ids)] = 1
  num_images = np.asarray(batch.get("num_images", np.zeros(num_prompts, np.int32)))
  images = split_images(batch.get("pixel_values"), batch.get("image_grid_thw"), num_images)
  return Rollout(prompt_ids=input_ids, prompt_mask=np.asarray(batch["attention_mask"]),
                 response_ids=responses, response_mask=mask,
                 advantages=np.zeros(num_prompts, np.float32), images=images)


def sft_step(learner: Learner, state: TrainState, rollout: Rollout
             ) -> tuple[TrainState, dict[str, float]]:
  """One supervised update: token-mean cross-entropy of the responses, the whole rollout
  as one optimizer update accumulated over micro-batches. `state` is donated.

  Returns the new state (step + 1) and metrics: loss (= nll), entropy, grad_norm, lr,
  step_time_s, tokens_per_s.
  """
  start = time.perf_counter()
  state, update_metrics = learner.update(state, rollout, loss_name="sft", num_iterations=1)
  state = state.replace(step=state.step + 1)
  metrics = mean_metrics(update_metrics)
  elapsed = time.perf_counter() - start
  tokens = int(batches_lib.every_process(rollout.prompt_mask.sum() + rollout.response_mask.sum()).sum())
  metrics.update({"step_time_s": elapsed, "tokens_per_s": tokens / max(elapsed, 1e-9)})
  return state, metrics


def mean_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """The mean over optimizer updates of each metric, on the host."""
  metrics = jax.device_get(list(metrics))
  keys = sorted({key for m in metrics for key in m})
  return {key: float(np.mean([m[key] for m in metrics if key in m])) for key in keys}
