"""Capacity planning without the hardware: per-device memory of a GRPO run, from XLA.

    python -m dprl.plan --config configs/grpo.py:qwen2_5_vl_7b --num_devices 16 \\
        --device_memory_gib 16 [--config.mesh.fsdp=16 ...] [--config.data.rollout_batch_size=64 ...] \\
        [--image_pixels 262144] [--images_per_prompt 1] [--json plan.json]

On `--num_devices` virtual CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count,
set here before JAX starts) it builds the recipe's model abstractly (`nnx.eval_shape`: no
weights exist at any point), places the abstract parameters, AdamW state and gradient
accumulator with the partition rules on the config's mesh, and lowers and compiles ahead
of time the run's jitted functions for the shapes the config implies:

  sampling   `dprl.sampling` prefill + decode of one rollout batch: data.rollout_batch_size
             prompts x sampling.num_samples, data.max_prompt_length prompt tokens (the
             longest bucket) + sampling.max_new_tokens, images_per_prompt images each;
  log-probs  the no-grad forward of rl.logprob_micro_batch_size rows (old policy, reference);
  update     forward + backward of rl.micro_batch_size rows, added into the accumulator;
  apply      the AdamW step on the accumulated gradient.

Per device it reports the bytes of the parameters, reference parameters (rl.beta > 0),
optimizer state and accumulator (from the shardings of the abstract arrays: exact), the
KV cache (from its shape and sharding), and each function's temporaries
(`compiled.memory_analysis()`). A phase's total is everything that lives through the step
(parameters, reference, optimizer state) plus that function's arguments, outputs and
temporaries; the peak phase is compared with --device_memory_gib.

XLA compiles for the CPU here. TPU and GPU compilers fuse, lay out and rematerialise
differently (and CPU may keep bfloat16 intermediates in float32), so temporaries are an
estimate to within tens of percent; the state bytes are exact.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags
from ml_collections import config_flags

GIB = 1024**3
PHASES = ("sampling", "log-probs", "update", "apply")


class PlanError(ValueError):
  """The config, mesh or flags cannot describe a run; the message names the flag or field."""


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, argv: Sequence[str] | None = None) -> None:
  config_flags.DEFINE_config_file(
      "config", None, "a training config and variant, e.g. configs/grpo.py:qwen2_5_vl_7b",
      flag_values=flag_values, lock_config=True, sys_argv=None if argv is None else list(argv))
  flags.DEFINE_integer("num_devices", None, "devices of the planned run (all hosts together); "
                       "default: the product of --config.mesh.* when none is -1", flag_values=flag_values)
  flags.DEFINE_float("device_memory_gib", 16.0, "memory of one device, GiB", flag_values=flag_values)
  flags.DEFINE_integer("image_pixels", None, "pixels of each prompt image before resizing to the "
                       "patch grid (default: data.min_pixels)", flag_values=flag_values)
  flags.DEFINE_integer("images_per_prompt", 1, "images in each prompt (0: text only)",
                       flag_values=flag_values)
  flags.DEFINE_string("json", None, "also write the plan here as JSON", flag_values=flag_values)


# ---------------------------------------------------------------------------------------
# The run's shapes, from the config (no JAX)
# ---------------------------------------------------------------------------------------


def mesh_sizes(config, num_devices: int | None) -> tuple[tuple[int, int, int], int]:
  """((data, fsdp, tensor), devices) with a -1 size resolved; errors name the flags."""
  sizes = (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  named = " x ".join(f"--config.mesh.{a}={s}" for a, s in zip(("data", "fsdp", "tensor"), sizes))
  if any(s == 0 or s < -1 for s in sizes):
    raise PlanError(f"{named}: sizes must be positive (or one of them -1)")
  if sizes.count(-1) > 1:
    raise PlanError(f"{named}: at most one of --config.mesh.data/fsdp/tensor may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices is None:
    if -1 in sizes:
      raise PlanError(f"{named} has a -1 size: give --num_devices (the devices of the planned run)")
    return sizes, known
  if num_devices < 1:
    raise PlanError(f"--num_devices={num_devices} must be >= 1")
  if -1 in sizes:
    if num_devices % known:
      raise PlanError(f"{named}: --num_devices={num_devices} is not a multiple of {known}")
    sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
  elif known != num_devices:
    raise PlanError(f"{named} = {known} devices, but --num_devices={num_devices}")
  return sizes, num_devices


@dataclasses.dataclass(frozen=True)
class Shapes:
  """What one GRPO step of the config processes (global counts)."""

  prompts: int  # P, prompts per sampler call (data.rollout_batch_size)
  samples: int  # G
  prompt_len: int  # padded prompt length of the learner (the longest pipeline bucket)
  sampler_prompt_len: int  # the sampler's width for it (the pipeline's largest bucket)
  new_tokens: int  # N
  image_grid: tuple[int, int, int] | None  # (t, h, w) patches of each image, or None
  images_per_prompt: int
  micro_batch: int  # rows per update micro-batch
  logprob_micro_batch: int
  updates_per_step: int
  beta: float

  @property
  def rows(self) -> int:
    return self.prompts * self.samples


def run_shapes(config, cfg, image_pixels: int | None, images_per_prompt: int) -> Shapes:
  """The step's shapes; errors name the field or flag that makes them impossible."""
  from dprl.data import image_processing  # pylint: disable=g-import-not-at-top
  from dprl.sampling.sampler import prompt_width  # pylint: disable=g-import-not-at-top
  from dprl.train import prompt_buckets  # pylint: disable=g-import-not-at-top
  data, rl = config.data, config.rl
  if images_per_prompt < 0:
    raise PlanError(f"--images_per_prompt={images_per_prompt} must be >= 0")
  grid = None
  if images_per_prompt:
    pixels = image_pixels or data.min_pixels
    vision = cfg.vision
    side = max(int(math.isqrt(pixels)), 1)
    h, w = image_processing.smart_resize(side, side, factor=vision.patch_size * vision.spatial_merge_size,
                                         min_pixels=data.min_pixels, max_pixels=data.max_pixels)
    grid = (1, h // vision.patch_size, w // vision.patch_size)
    tokens = images_per_prompt * math.prod(grid) // vision.spatial_merge_size**2
    if tokens >= data.max_prompt_length:
      raise PlanError(f"{images_per_prompt} image(s) of {h}x{w} pixels (--image_pixels, --images_per_prompt) "
                      f"take {tokens} tokens, more than data.max_prompt_length = {data.max_prompt_length}")
  update_prompts = rl.update_batch_size or data.rollout_batch_size
  updates = rl.num_iterations * max(data.rollout_batch_size // update_prompts, 1)
  rows = data.rollout_batch_size * config.sampling.num_samples
  micro = min(rl.micro_batch_size, update_prompts * config.sampling.num_samples)
  logprob_micro = min(rl.logprob_micro_batch_size or rl.micro_batch_size, rows)
  return Shapes(prompts=data.rollout_batch_size, samples=config.sampling.num_samples,
                prompt_len=data.max_prompt_length, sampler_prompt_len=prompt_width(data.max_prompt_length, prompt_buckets(config)),
                new_tokens=config.sampling.max_new_tokens, image_grid=grid,
                images_per_prompt=images_per_prompt, micro_batch=micro, logprob_micro_batch=logprob_micro,
                updates_per_step=updates, beta=rl.beta)


# ---------------------------------------------------------------------------------------
# Abstract arrays and their bytes per device
# ---------------------------------------------------------------------------------------


def device_bytes(tree) -> int:
  """Bytes one device holds of a tree of arrays or ShapeDtypeStructs with shardings (the
  most-loaded device's shard: uneven shardings are padded by XLA to equal shards)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _with_shardings(tree, shardings):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _images(shapes: Shapes, rows: int, patch_dim: int, merge: int, pad):
  """(pixel_values, image_grid_thw) ShapeDtypeStructs of `rows` rows' images, padded by
  `pad(row_images, merge)` exactly as the run pads them (run on zero-width patch arrays, so
  nothing is allocated), and the frame bound the jitted functions take."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dprl.models.qwen2_5_vl import frame_patch_bound  # pylint: disable=g-import-not-at-top
  if shapes.image_grid is None:
    return None, None, None
  grid = np.asarray([shapes.image_grid] * shapes.images_per_prompt, np.int32)
  row_images = [(np.zeros((int(np.prod(grid, axis=1).sum()), 0), np.float32), grid)] * rows
  pixel_values, grid = pad(row_images, merge)
  return (jax.ShapeDtypeStruct((pixel_values.shape[0], patch_dim), np.float32),
          jax.ShapeDtypeStruct(grid.shape, np.int32), frame_patch_bound(grid))


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  out = {name: int(getattr(stats, f"{name}_size_in_bytes")) for name in ("argument", "output", "alias", "temp")}
  out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


def _model_config(config):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dprl.models.config import get_preset  # pylint: disable=g-import-not-at-top
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
  for field in ("dtype", "param_dtype"):
    if config.model[field] not in dtypes:
      raise PlanError(f"model.{field} = {config.model[field]!r}; known: {sorted(dtypes)}")
  try:
    cfg = get_preset(config.model.preset)
  except KeyError as e:
    raise PlanError(f"model.preset: {e.args[0]}") from None
  return cfg.replace(dtype=dtypes[config.model.dtype], param_dtype=dtypes[config.model.param_dtype],
                     remat_policy=config.model.remat_policy)


def plan(config, *, num_devices: int | None = None, device_memory_gib: float = 16.0,
         image_pixels: int | None = None, images_per_prompt: int = 1,
         compile_functions: bool = True) -> dict[str, Any]:
  """The per-device memory plan of `config` (a grpo.py config) on `num_devices` devices.

  Uses the first `num_devices` of `jax.devices()` (the CLI makes that many CPU devices).
  Returns a JSON-ready dict: settings, `bytes` (per device, by item), `phases` (per-device
  total of each phase), `peak_phase`, `peak_bytes`, `fits`, and `compiled` (XLA's memory
  analysis of each function: argument, output, alias, temp, total bytes). With
  `compile_functions=False` only the state (parameters, reference, optimizer state,
  accumulator, KV cache) is sized, from shardings alone: no temporaries, phases or verdict.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from dprl import train as train_lib  # pylint: disable=g-import-not-at-top
  from dprl.models import qwen2_5_vl  # pylint: disable=g-import-not-at-top
  from dprl.models.sharding import state_shardings  # pylint: disable=g-import-not-at-top
  from dprl.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from dprl.rl import learner as learner_lib  # pylint: disable=g-import-not-at-top
  from dprl.rl import train_state as train_state_lib  # pylint: disable=g-import-not-at-top
  from dprl.sampling import sampler as sampler_lib  # pylint: disable=g-import-not-at-top

  try:
    train_lib.validate(config)  # the checks `python -m dprl.train` makes first
  except (ValueError, KeyError) as e:
    raise PlanError(str(e)) from None
  (data, fsdp, tensor), num_devices = mesh_sizes(config, num_devices)
  devices = jax.devices()
  if len(devices) < num_devices:
    raise PlanError(f"--num_devices={num_devices} but JAX has {len(devices)} devices: run "
                    "`python -m dprl.plan`, which makes that many virtual CPU devices, in a fresh process")
  mesh = make_mesh(data, fsdp, tensor, devices=devices[:num_devices])
  cfg = _model_config(config)
  shapes = run_shapes(config, cfg, image_pixels, images_per_prompt)
  if shapes.prompts % data:
    raise PlanError(f"data.rollout_batch_size = {shapes.prompts} prompts must split over "
                    f"--config.mesh.data={data} (the sampler shards prompts over data)")
  if cfg.text.num_key_value_heads % tensor:
    raise PlanError(f"--config.mesh.tensor={tensor} must divide the {cfg.text.num_key_value_heads} key/value "
                    f"heads of {config.model.preset} (the sampler shards its KV cache over tensor)")

  # The model, abstractly: ShapeDtypeStructs with the partition rules' shardings.
  model = qwen2_5_vl.abstract(cfg)
  graphdef, params, rest = train_state_lib.split_params(model)
  params = _with_shardings(params, train_state_lib.param_shardings(params, mesh))
  updates_total = max(config.total_steps * shapes.updates_per_step, 1)
  optimizer, schedule = train_state_lib.make_optimizer(config.optim.to_dict(), updates_total)
  state = train_state_lib.abstract_train_state(params, optimizer)
  state_shardings_ = train_state_lib.train_state_shardings(state, optimizer, mesh)
  state = _with_shardings(state, state_shardings_)
  try:
    learner = learner_lib.Learner(graphdef, rest, cfg, optimizer, schedule, mesh, state_shardings_,
                                  train_lib.learner_config(config))
  except ValueError as e:
    raise PlanError(str(e)) from None
  patch_dim, merge = cfg.vision.patch_dim, cfg.vision.spatial_merge_size
  compiled: dict[str, dict[str, int]] = {}

  def compile_memory(name: str, fn, *args) -> None:
    if compile_functions:
      compiled[name] = _memory(fn.lower(*args).compile())

  # Sampling: the whole rollout batch in one call, as `grpo_step` samples it.
  full_graphdef, full_state = nnx.split(model)
  full_state = _with_shardings(full_state, state_shardings(full_state, mesh))
  rows_sharding = NamedSharding(mesh, P("data"))
  prompt = jax.ShapeDtypeStruct((shapes.prompts, shapes.sampler_prompt_len), np.int32, sharding=rows_sharding)
  pixel_values, grid, bound = _images(
      shapes, shapes.prompts, patch_dim, merge,
      lambda rows, m: sampler_lib.bucket_images(np.concatenate([pv for pv, _ in rows]),
                                                np.concatenate([g for _, g in rows]), m))
  key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
  eos = cfg.text.eos_token_id
  sampling = sampler_lib.SamplingConfig(
      max_new_tokens=shapes.new_tokens, temperature=config.sampling.temperature,
      top_p=config.sampling.top_p, top_k=config.sampling.top_k, num_samples=shapes.samples,
      unstack_layers=config.sampling.unstack_layers,
      eos_token_ids=tuple(np.atleast_1d(eos if eos is not None else 0).tolist()), pad_token_id=0)
  sample_fn = sampler_lib.jitted(full_graphdef, sampling, mesh, bound)
  compile_memory("sampling", sample_fn, full_state, prompt, prompt, pixel_values, grid, key)

  # The learner's micro-batches.
  def micro_batch(rows: int, with_loss_inputs: bool):
    row = lambda *shape, dtype=np.int32: jax.ShapeDtypeStruct((rows,) + shape, dtype)
    batch = {"prompt_ids": row(shapes.prompt_len), "prompt_mask": row(shapes.prompt_len),
             "response_ids": row(shapes.new_tokens), "response_mask": row(shapes.new_tokens)}
    if with_loss_inputs:
      batch["advantages"] = row(dtype=np.float32)
      if shapes.updates_per_step > 1:
        batch["old_logp"] = row(shapes.new_tokens, dtype=np.float32)
      if shapes.beta > 0:
        batch["ref_logp"] = row(shapes.new_tokens, dtype=np.float32)
    pv, g, frame_bound = _images(shapes, rows, patch_dim, merge,
                                 lambda rows_, m: learner_lib.pack_images(rows_, 0, m))
    if pv is not None:
      batch["pixel_values"], batch["image_grid_thw"] = pv, g
    return batch, tuple(sorted(batch)), frame_bound

  lp_batch, lp_keys, lp_bound = micro_batch(shapes.logprob_micro_batch, with_loss_inputs=False)
  compile_memory("log-probs", learner.jitted("logprobs", lp_keys, None, lp_bound), params, lp_batch)
  batch, keys, frame_bound = micro_batch(shapes.micro_batch, with_loss_inputs=True)
  acc = learner.abstract_acc(params, batch, "grpo")
  acc = _with_shardings(acc, learner.acc_shardings(acc))
  compile_memory("update", learner.jitted("accumulate", keys, "grpo", frame_bound), params, batch, acc)
  compile_memory("apply", learner.jitted("apply", keys, "grpo"), state, acc)

  # State that lives through the whole step, by item.
  # text.KVCache's keys, layers stacked; the values hold as many bytes.
  kv_shape = (cfg.text.num_hidden_layers, shapes.rows, cfg.text.num_key_value_heads, cfg.text.head_dim,
              shapes.sampler_prompt_len + shapes.new_tokens)
  kv = jax.ShapeDtypeStruct(kv_shape, cfg.dtype, sharding=NamedSharding(mesh, P(None, "data", "tensor", None, None)))
  items = {
      "parameters": device_bytes(state.params),
      "reference_parameters": device_bytes(state.params) if shapes.beta > 0 else 0,
      "optimizer_state": device_bytes(state.opt_state),
      "gradient_accumulator": device_bytes(acc),
      "kv_cache": 2 * device_bytes(kv),  # keys and values
      **{f"temporaries_{name}": compiled[name]["temp"] for name in compiled},
  }
  # What a phase's function does not take as an argument but still lives on the device.
  beside = {
      "sampling": items["optimizer_state"] + items["reference_parameters"],
      "log-probs": items["optimizer_state"] + items["reference_parameters"],
      "update": items["optimizer_state"] + items["reference_parameters"],
      "apply": items["reference_parameters"],
  }
  phases = {name: compiled[name]["total"] + beside[name] for name in compiled}
  peak_phase = max(phases, key=phases.get) if phases else None
  budget = int(device_memory_gib * GIB)
  return {
      "config": config.model.preset,
      "mesh": {"data": data, "fsdp": fsdp, "tensor": tensor},
      "num_devices": num_devices,
      "device_memory_bytes": budget,
      "parameter_count": int(sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))),
      "settings": dataclasses.asdict(shapes),
      "dtype": {"compute": config.model.dtype, "parameters": config.model.param_dtype,
                "remat_policy": config.model.remat_policy},
      "bytes": items,
      "phases": phases,
      "peak_phase": peak_phase,
      "peak_bytes": phases.get(peak_phase),
      "fits": None if peak_phase is None else phases[peak_phase] <= budget,
      "compiled": compiled,
  }


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def _count(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def table(result: dict[str, Any]) -> str:
  """The plan as a Markdown table: GiB per device (MiB for plans under 1 GiB)."""
  s, b = result["settings"], result["bytes"]
  mesh = result["mesh"]
  unit, scale = ("GiB", GIB) if max(result["phases"].values()) >= GIB else ("MiB", 1024**2)
  _gib = lambda n: f"{n / scale:.2f}"
  image = "no images"
  if s["image_grid"]:
    t, h, w = s["image_grid"]
    image = f"{s['images_per_prompt']} image(s) of {h * 14}x{w * 14} px ({t * h * w} patches) per prompt"
  lines = [
      f"{result['config']}: {_count(result['parameter_count'])} parameters "
      f"({result['dtype']['parameters']}, compute {result['dtype']['compute']}, remat "
      f"{result['dtype']['remat_policy']}); mesh data={mesh['data']} fsdp={mesh['fsdp']} "
      f"tensor={mesh['tensor']} on {result['num_devices']} devices",
      f"rollout {s['prompts']} prompts x {s['samples']} samples, prompts {s['prompt_len']} + "
      f"responses {s['new_tokens']} tokens, {image}; update micro-batches of {s['micro_batch']} rows, "
      f"log-prob micro-batches of {s['logprob_micro_batch']}, {s['updates_per_step']} update(s) a step",
      "",
      f"| per device | {unit} |",
      "|---|---:|",
      f"| parameters | {_gib(b['parameters'])} |",
      f"| reference parameters (rl.beta > 0) | {_gib(b['reference_parameters'])} |",
      f"| optimizer state (AdamW mu, nu) | {_gib(b['optimizer_state'])} |",
      f"| gradient accumulator | {_gib(b['gradient_accumulator'])} |",
      f"| KV cache ({s['prompts'] * s['samples']} rows x {s['sampler_prompt_len'] + s['new_tokens']} slots) "
      f"| {_gib(b['kv_cache'])} |",
      f"| temporaries: sampling (prefill + decode, KV cache included) | {_gib(b['temporaries_sampling'])} |",
      f"| temporaries: log-probs micro-batch | {_gib(b['temporaries_log-probs'])} |",
      f"| temporaries: update micro-batch (forward + backward) | {_gib(b['temporaries_update'])} |",
      f"| temporaries: optimizer step | {_gib(b['temporaries_apply'])} |",
  ]
  for name in PHASES:
    lines.append(f"| **total while {name}** | {_gib(result['phases'][name])} |")
  verdict = "fits" if result["fits"] else "does not fit"
  lines.append(f"| **peak ({result['peak_phase']}) of {_gib(result['device_memory_bytes'])} {unit}** | "
               f"**{_gib(result['peak_bytes'])}: {verdict}** |")
  return "\n".join(lines)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if flag_values.config is None:
    raise app.UsageError("--config is required, e.g. --config configs/grpo.py:qwen2_5_vl_7b")
  try:
    _, num_devices = mesh_sizes(flag_values.config, flag_values.num_devices)
  except PlanError as e:
    raise app.UsageError(str(e)) from None
  # Before the backend starts (importing jax does not start it): the planned run's
  # devices, as virtual CPU devices, whatever accelerator this machine has.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={num_devices}").strip()
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  try:
    result = plan(flag_values.config, num_devices=num_devices,
                  device_memory_gib=flag_values.device_memory_gib,
                  image_pixels=flag_values.image_pixels, images_per_prompt=flag_values.images_per_prompt)
  except PlanError as e:
    raise app.UsageError(str(e)) from None
  print(table(result))
  if flag_values.json:
    with open(flag_values.json, "w") as f:
      json.dump(result, f, indent=1)


def run(argv: Sequence[str] | None = None) -> None:
  """`python -m dprl.plan`."""
  from dprl import cli  # pylint: disable=g-import-not-at-top
  define_flags(argv=argv)
  app.run(main, argv=argv, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
