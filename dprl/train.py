"""GRPO training entry point.

    python -m dprl.train --config configs/grpo.py:tiny --workdir runs/tiny \\
        [--config.total_steps=20] [--config.rl.beta=0.01] ...

The workdir receives `metrics.jsonl` (one row per step), TensorBoard events
(`tensorboard/`), Orbax checkpoints (`checkpoints/<step>/`) and `config.json`. Running
again with the same workdir resumes from its latest checkpoint: the restored train state,
reference and data-iterator state make the remaining steps identical to an uninterrupted
run. SIGTERM (preemption) saves a checkpoint after the current step and exits.

A step whose loss (or any other metric) is NaN or infinite stops the run with a
`NonFiniteMetricError` naming the step and the metric; that state is not saved, so the
latest checkpoint is the last good one.

Multi-host: every host runs the same command; `main` first joins the process group
(`dprl.parallel.distributed.initialize`), each host reads its shard of the data
(`data.rollout_batch_size` and `sft.batch_size` are global: each host takes its share),
every process writes its shards of each checkpoint, and only process 0 writes logs,
metrics, TensorBoard events, the progress bar and config.json. The workdir must be a
folder all hosts see. See launch/README.md.

`train(config, workdir)` is the same thing as a function (tests call it in-process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from absl import app, flags
from ml_collections import config_flags

from dprl import cli
from dprl import metrics as metrics_lib
from dprl.data import tokenizer as tokenizer_lib
from dprl.data.pipeline import Pipeline, PipelineConfig, bucket_lengths
from dprl.models import qwen2_5_vl
from dprl.models.config import ModelConfig, VisionConfig, from_hf_dict, get_preset, to_hf_dict
from dprl.parallel import batches as batches_lib
from dprl.parallel import distributed
from dprl.parallel.mesh import make_mesh
from dprl.rl import checkpointing
from dprl.rl import learner as learner_lib
from dprl.rl import train_state as train_state_lib
from dprl.rl.registry import Registry

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DATA_SOURCES = Registry("data source")
# Vocabulary sizes of randomly initialised models are rounded up to this, so the
# embedding and lm_head split evenly over tensor/fsdp axes.
VOCAB_MULTIPLE = 128


class NonFiniteMetricError(RuntimeError):
  """A step produced a NaN or infinite loss or metric."""


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


@DATA_SOURCES.register("synthetic")
def synthetic_records(data: ml_collections.ConfigDict) -> list:
  from dprl.data.synthetic import generate_split  # pylint: disable=g-import-not-at-top
  tasks = [t.strip() for t in data.tasks.split(",") if t.strip()]
  return generate_split(tasks, "train", data.num_items, data.seed, image_size=data.image_size,
                        language_prior_fraction=data.language_prior_fraction)


@DATA_SOURCES.register("jsonl")
def jsonl_records(data: ml_collections.ConfigDict) -> list:
  from dprl.data.readers import read_records  # pylint: disable=g-import-not-at-top
  if not data.path:
    raise ValueError("data.source = 'jsonl' needs data.path (a .jsonl or .json file)")
  if not os.path.exists(data.path):
    raise FileNotFoundError(f"data.path {data.path!r} does not exist")
  return read_records(data.path, layout=data.layout)


def held_out_evaluator(config: ml_collections.ConfigDict, tokenizer):
  """The `eval` section as PeriodicEvals on held-out items (greedy as "eval/*", and with
  eval.sampled_num_samples > 0 also sampled as "eval_sampled/*"), or None when
  eval.every = 0.

  Items: the synthetic benchmark's test split (disjoint from the training split) for a
  synthetic source, else `eval.path` read with `data.layout`.
  """
  if not config.eval.every:
    return None
  from dprl.evaluation.periodic import EvalSuite, PeriodicEval  # pylint: disable=g-import-not-at-top
  from dprl.data.templates import TemplateConfig  # pylint: disable=g-import-not-at-top
  ev, data = config.eval, config.data
  if ev.path:
    from dprl.data.readers import read_records  # pylint: disable=g-import-not-at-top
    records = read_records(ev.path, layout=data.layout)[:ev.num_items]
  elif data.source == "synthetic" or ev.synthetic_tasks:
    from dprl.data.synthetic import generate_split  # pylint: disable=g-import-not-at-top
    tasks = [t.strip() for t in (ev.synthetic_tasks or data.tasks).split(",") if t.strip()]
    records = generate_split(tasks, "test", ev.num_items, data.seed, image_size=data.image_size,
                             language_prior_fraction=ev.language_prior_fraction)
  else:
    raise ValueError("eval.every > 0 needs eval.path or eval.synthetic_tasks for a "
                     f"data.source = {data.source!r} run")
  reward_params = {k: v for k, v in config.rl.reward.to_dict().items() if v is not None}
  make = lambda num_samples, temperature, prefix: PeriodicEval(
      records, tokenizer, every=ev.every,
      template=TemplateConfig(names=data.template, system_prompt=data.system_prompt),
      max_new_tokens=config.sampling.max_new_tokens, batch_size=ev.batch_size,
      num_samples=num_samples, temperature=temperature, min_pixels=data.min_pixels,
      max_pixels=data.max_pixels, reward_fn=config.rl.reward_fn, reward_params=reward_params,
      seed=config.seed, prefix=prefix)
  evaluators = [make(ev.num_samples, ev.temperature, "eval/")]
  if ev.sampled_num_samples:
    # The policy RL trains, sampled as in training: its pass rate moves before the greedy
    # answers flip (a sharper distribution first raises the sampled accuracy toward the
    # greedy one), and K samples per item average out much of a greedy curve's swing.
    # The same seed every time, so checkpoints are compared on the same random draws.
    evaluators.append(make(ev.sampled_num_samples, ev.sampled_temperature, "eval_sampled/"))
  return EvalSuite(evaluators)


def make_pipeline(config: ml_collections.ConfigDict, records, tokenizer, *, batch_size: int,
                  seed: int, vision: VisionConfig) -> Pipeline:
  """Training batches; patches and image tokens are cut for `vision`, the model's tower
  (a preset may merge 1x1 instead of 2x2 patches)."""
  data = config.data
  pipeline_config = PipelineConfig(
      patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
      merge_size=vision.spatial_merge_size,
      batch_size=batch_size, seed=seed, shuffle=True, num_epochs=None, drop_remainder=True,
      template={"names": data.template, "system_prompt": data.system_prompt},
      min_pixels=data.min_pixels, max_pixels=data.max_pixels,
      max_prompt_length=data.max_prompt_length, num_threads=data.num_threads,
      length_buckets=parse_length_buckets(data.get("length_buckets", "")))
  return Pipeline(records, tokenizer, pipeline_config)


def prompt_buckets(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The widths the training pipeline pads prompts to (`make_pipeline`'s buckets)."""
  return bucket_lengths(config.data.max_prompt_length, parse_length_buckets(config.data.get("length_buckets", "")))


def parse_length_buckets(text: str) -> tuple[int, ...] | None:
  """config.data.length_buckets ("40,64,128") -> (40, 64, 128); "" -> None."""
  parts = [p.strip() for p in str(text or "").split(",") if p.strip()]
  try:
    return tuple(int(p) for p in parts) or None
  except ValueError:
    raise ValueError(f"config.data.length_buckets={text!r}: expected comma-separated "
                     "integers, e.g. '40,64,128'") from None


def load_tokenizer(name: str, workdir: str):
  return tokenizer_lib.load_named(name, os.path.join(workdir, "tokenizer"))


def token_ids(tokenizer, names: str, field: str) -> tuple[int, ...]:
  """Ids of comma-separated single-token strings the tokenizer has (others skipped)."""
  ids = []
  for name in (n.strip() for n in names.split(",")):
    if not name:
      continue
    encoded = tokenizer.encode(name, add_special_tokens=False)
    if len(encoded) == 1:
      ids.append(encoded[0])
  if not ids:
    raise ValueError(f"{field} = {names!r}: none is a single token of the tokenizer")
  return tuple(ids)


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


def _dtype(name: str, field: str):
  if name not in DTYPES:
    raise ValueError(f"{field} = {name!r}; known: {sorted(DTYPES)}")
  return DTYPES[name]


def preset_for_tokenizer(config: ml_collections.ConfigDict, tokenizer) -> ModelConfig:
  """The preset with the tokenizer's vocabulary size and special-token ids."""
  special = tokenizer_lib.SpecialTokenIds.from_tokenizer(tokenizer)
  cfg = get_preset(config.model.preset)
  vocab = max(cfg.text.vocab_size, len(tokenizer))
  vocab = -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  text = dataclasses.replace(cfg.text, vocab_size=vocab, eos_token_id=special.eos,
                             pad_token_id=special.pad, bos_token_id=None)
  return cfg.replace(text=text, image_token_id=special.image_pad,
                     video_token_id=special.video_pad,
                     vision_start_token_id=special.vision_start,
                     vision_end_token_id=special.vision_end)


def _runtime(cfg: ModelConfig, config: ml_collections.ConfigDict) -> ModelConfig:
  return cfg.replace(dtype=_dtype(config.model.dtype, "model.dtype"),
                     param_dtype=_dtype(config.model.param_dtype, "model.param_dtype"),
                     remat_policy=config.model.remat_policy)


def _abstract_params(cfg: ModelConfig, mesh):
  graphdef, params, rest = train_state_lib.split_params(qwen2_5_vl.abstract(cfg))
  shardings = train_state_lib.param_shardings(params, mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, shardings)
  return graphdef, abstract, rest


def init_model(config: ml_collections.ConfigDict, tokenizer, mesh, resume_meta: dict | None):
  """(model config, graphdef, params placed on the mesh, rest), from wherever it starts.

  With `resume_meta` (a checkpoint of this run exists) only the shapes are built here;
  the caller restores the weights.
  """
  path = config.model.init_checkpoint
  if resume_meta is not None:
    cfg = _runtime(from_hf_dict(resume_meta["model_config"], "checkpoint meta"), config)
    graphdef, abstract, rest = _abstract_params(cfg, mesh)
    return cfg, graphdef, abstract, rest
  if not path:
    if config.model.preset != "tiny":
      log.warning("model.init_checkpoint is empty: random init of preset %r",
                  config.model.preset)
    cfg = _runtime(preset_for_tokenizer(config, tokenizer), config)
    model = qwen2_5_vl.init(cfg, seed=config.seed)
    graphdef, params, rest = train_state_lib.split_params(model)
    params = train_state_lib.place(params, train_state_lib.param_shardings(params, mesh))
    return cfg, graphdef, params, rest
  if not os.path.exists(path):
    raise FileNotFoundError(f"model.init_checkpoint {path!r} does not exist")
  found = checkpointing.find_checkpoint(path)
  if found is not None:
    directory, step = found
    meta = checkpointing.read_meta(directory, step)
    if "model_config" not in meta:
      raise checkpointing.CheckpointError(f"{directory}/{step}: no model_config in meta")
    cfg = _runtime(from_hf_dict(meta["model_config"], f"{directory}/{step}"), config)
    graphdef, abstract, rest = _abstract_params(cfg, mesh)
    params = checkpointing.load_params(directory, step, abstract)
    log.info("initialised from the Orbax checkpoint %s/%d", directory, step)
    return cfg, graphdef, params, rest
  if os.path.exists(os.path.join(path, "config.json")):
    model = qwen2_5_vl.from_pretrained(
        path, dtype=_dtype(config.model.dtype, "model.dtype"),
        param_dtype=_dtype(config.model.param_dtype, "model.param_dtype"), mesh=mesh,
        remat_policy=config.model.remat_policy)
    graphdef, params, rest = train_state_lib.split_params(model)
    return model.config, graphdef, params, rest
  raise ValueError(f"model.init_checkpoint {path!r} is neither a Hugging Face folder "
                   "(config.json) nor an Orbax checkpoint of a dprl run")


# ---------------------------------------------------------------------------------------
# Config -> component settings
# ---------------------------------------------------------------------------------------


def _optim_section(config, sft: bool = False) -> dict[str, Any]:
  optim = dict(config.optim.to_dict())
  if sft:
    optim.update(learning_rate=config.sft.learning_rate, schedule=config.sft.schedule,
                 warmup_steps=config.sft.warmup_steps,
                 final_lr_ratio=config.sft.final_lr_ratio)
  return optim


def rollout_config(config, tokenizer) -> learner_lib.RolloutConfig:
  special = tokenizer_lib.SpecialTokenIds.from_tokenizer(tokenizer)
  reward_params = {k: v for k, v in config.rl.reward.to_dict().items() if v is not None}
  weighting = {k: v for k, v in config.rl.weighting.to_dict().items() if v is not None}
  return learner_lib.RolloutConfig(
      num_prompts=config.data.rollout_batch_size, num_samples=config.sampling.num_samples,
      max_new_tokens=config.sampling.max_new_tokens,
      temperature=config.sampling.temperature, top_p=config.sampling.top_p,
      top_k=config.sampling.top_k, unstack_layers=config.sampling.unstack_layers,
      prompt_buckets=prompt_buckets(config),
      eos_token_ids=token_ids(tokenizer, config.sampling.eos_tokens, "sampling.eos_tokens"),
      pad_token_id=special.pad, vision_token_ids=(special.image_pad, special.video_pad),
      reward_fn=config.rl.reward_fn,
      reward_params=tuple(sorted(reward_params.items())), estimator=config.rl.estimator,
      difficulty_weighting=config.rl.difficulty_weighting,
      scale_by_std=config.rl.scale_by_std, advantage_params=tuple(sorted(weighting.items())),
      filter_groups=config.rl.filter_groups, filter_low=config.rl.filter_low,
      filter_high=config.rl.filter_high, filter_max_tries=config.rl.filter_max_tries)


def learner_config(config) -> learner_lib.LearnerConfig:
  rl = config.rl
  return learner_lib.LearnerConfig(
      micro_batch_size=rl.micro_batch_size,
      logprob_micro_batch_size=rl.logprob_micro_batch_size, chunk_size=rl.chunk_size,
      temperature=config.sampling.temperature,
      loss=learner_lib.LossConfig(
          eps_low=rl.eps_low, eps_high=rl.eps_high, clip_ratio_c=rl.clip_ratio_c,
          beta=rl.beta, kl_estimator=rl.kl_estimator, aggregation=rl.aggregation,
          max_len=config.sampling.max_new_tokens))


def validate_processes(config) -> None:
  """Checks of a multi-host run (nothing to check on one process); errors name the field."""
  processes = jax.process_count()
  if processes == 1:
    return
  batches_lib.process_share(config.data.rollout_batch_size, "data.rollout_batch_size")
  if config.eval.every:
    raise ValueError(f"eval.every = {config.eval.every}: held-out evaluation during training runs on "
                     f"one process only, and this run has {processes}; set --config.eval.every=0 "
                     "and evaluate the checkpoints with python -m dprl.eval")


def _progress(config) -> bool:
  """Whether to show the progress bar: as configured, on process 0 only."""
  return bool(config.logging.progress) and batches_lib.is_primary()


def load_tokenizer_once(name: str, workdir: str):
  """`load_tokenizer`; with several processes, process 0 first, the others after a barrier:
  a tokenizer written into the (shared) workdir must not be written by all at once."""
  if jax.process_count() > 1:
    if batches_lib.is_primary():
      load_tokenizer(name, workdir)
    batches_lib.sync_global_devices("dprl_train_tokenizer_written")
  return load_tokenizer(name, workdir)


def validate(config) -> None:
  """Checks that need no model or data; each error names the field."""
  from dprl.rl import advantages, losses, rewards  # pylint: disable=g-import-not-at-top
  rewards.REWARD_FNS[config.rl.reward_fn]  # pylint: disable=pointless-statement
  advantages.ESTIMATORS[config.rl.estimator]  # pylint: disable=pointless-statement
  advantages.DIFFICULTY_WEIGHTINGS[config.rl.difficulty_weighting]  # pylint: disable=pointless-statement
  losses.AGGREGATIONS[config.rl.aggregation]  # pylint: disable=pointless-statement
  losses.KL_ESTIMATORS[config.rl.kl_estimator]  # pylint: disable=pointless-statement
  train_state_lib.SCHEDULES[config.optim.schedule]  # pylint: disable=pointless-statement
  DATA_SOURCES[config.data.source]  # pylint: disable=pointless-statement
  checks = [
      (config.total_steps >= 0, "total_steps must be >= 0"),
      (config.data.rollout_batch_size >= 1, "data.rollout_batch_size must be >= 1"),
      (config.sampling.num_samples >= 1, "sampling.num_samples must be >= 1"),
      (config.rl.num_iterations >= 1, "rl.num_iterations must be >= 1"),
      (config.rl.beta >= 0, "rl.beta must be >= 0"),
      (0 <= config.rl.filter_low <= config.rl.filter_high <= 1,
       "rl.filter_low <= rl.filter_high must both be in [0, 1]"),
      (config.rl.update_batch_size == 0
       or config.data.rollout_batch_size % config.rl.update_batch_size == 0,
       f"rl.update_batch_size = {config.rl.update_batch_size} must divide "
       f"data.rollout_batch_size = {config.data.rollout_batch_size}"),
      (config.sampling.temperature > 0, "sampling.temperature must be > 0 for GRPO "
       "(log-probs of logits / temperature)"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunResult:
  step: int  # steps completed
  preempted: bool
  metrics: list[dict[str, Any]]  # rows written by this call
  state: Any = None  # the final TrainState


def _check_finite(step: int, metrics: dict[str, Any], checkpointer) -> None:
  bad = metrics_lib.non_finite(metrics)
  if not bad:
    return
  first = "loss" if "loss" in bad else bad[0]
  checkpointer.wait()
  latest = checkpointer.latest_step()
  kept = (f"the last good checkpoint is step {latest} in {checkpointer.directory}"
          if latest is not None else "no checkpoint was saved before it")
  raise NonFiniteMetricError(
      f"step {step}: {first} is {metrics[first]} (non-finite metrics: {', '.join(bad)}); "
      f"stopping without saving this state; {kept}")


def warm_start(config, learner_factory, params, records, tokenizer, workdir, vision):
  """`sft.steps` supervised steps from `params`; returns the new params."""
  batch_size = batches_lib.process_share(config.sft.batch_size or config.data.rollout_batch_size,
                                         "sft.batch_size (or data.rollout_batch_size)")
  optimizer, schedule = train_state_lib.make_optimizer(_optim_section(config, sft=True),
                                                       config.sft.steps)
  learner, state = learner_factory(params, optimizer, schedule)
  pipeline = make_pipeline(config, records, tokenizer, batch_size=batch_size,
                           seed=config.data.seed + 1, vision=vision)
  batches = iter(pipeline)
  eos = token_ids(tokenizer, config.sampling.eos_tokens, "sampling.eos_tokens")[0]
  with metrics_lib.MetricsWriter(workdir, tensorboard=config.logging.tensorboard,
                                 resume_step=0, prefix="sft/",
                                 jsonl_name="sft_metrics.jsonl") as writer:
    bar = metrics_lib.progress_bar(config.sft.steps, enabled=_progress(config),
                                   description="warm start")
    for _ in range(config.sft.steps):
      rollout = learner_lib.sft_rollout(next(batches), tokenizer, config.sft.response_format,
                                        config.sampling.max_new_tokens, eos)
      state, metrics = learner_lib.sft_step(learner, state, rollout)
      step = int(state.step)
      writer.write(step, metrics)
      if metrics_lib.non_finite(metrics):
        raise NonFiniteMetricError(f"warm-start step {step}: non-finite "
                                   f"{metrics_lib.non_finite(metrics)}")
      bar.update(1)
      bar.set_postfix(metrics_lib.postfix(metrics, ("loss",)))
    bar.close()
  return state.params


def train(config: ml_collections.ConfigDict, workdir: str, *,
          sample_fn: Callable | None = None) -> RunResult:
  """Trains (or resumes) up to `config.total_steps`; see the module docstring."""
  validate(config)
  validate_processes(config)
  os.makedirs(workdir, exist_ok=True)
  if batches_lib.is_primary():
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  tokenizer = load_tokenizer_once(config.tokenizer, workdir)
  checkpointer = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), save_every=config.checkpoint.every,
      max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save)
  try:
    return _train(config, workdir, mesh, tokenizer, checkpointer, sample_fn)
  finally:
    checkpointer.close()


@dataclasses.dataclass
class _Run:
  """What the step loop needs, however the run started."""

  learner: learner_lib.Learner
  state: train_state_lib.TrainState
  ref_params: Any
  batches: Any  # the grain iterator
  meta: dict[str, Any]


def _start(config, workdir, mesh, tokenizer, checkpointer) -> _Run:
  """Resumes from the workdir's latest checkpoint, or starts from model.init_checkpoint
  (after the optional warm start)."""
  resume_step = checkpointer.latest_step()
  resume_meta = None
  if resume_step is not None:
    resume_meta = checkpointing.read_meta(checkpointer.directory, resume_step)
    if config.model.init_checkpoint:
      log.info("resuming %s: model.init_checkpoint is not read", checkpointer.directory)
  model_config, graphdef, params, rest = init_model(config, tokenizer, mesh, resume_meta)
  meta = {"model_config": to_hf_dict(model_config)}
  records = DATA_SOURCES[config.data.source](config.data)
  prompts_per_update = config.rl.update_batch_size or config.data.rollout_batch_size
  updates_per_step = (config.rl.num_iterations * config.data.rollout_batch_size
                      // prompts_per_update)
  optimizer, schedule = train_state_lib.make_optimizer(
      _optim_section(config), max(config.total_steps * updates_per_step, 1))

  def learner_factory(params, optimizer, schedule):
    """A learner and a fresh train state (step 0) for `params`."""
    abstract = train_state_lib.abstract_train_state(params, optimizer)
    shardings = train_state_lib.train_state_shardings(abstract, optimizer, mesh)
    learner = learner_lib.Learner(graphdef, rest, model_config, optimizer, schedule, mesh,
                                  shardings, learner_config(config))
    state = jax.jit(lambda p: train_state_lib.create_train_state(p, optimizer, config.seed),
                    out_shardings=shardings)(params)
    return learner, state

  use_reference = config.rl.beta > 0
  batches = iter(make_pipeline(config, records, tokenizer,
                               batch_size=batches_lib.process_share(
                                   config.data.rollout_batch_size, "data.rollout_batch_size"),
                               seed=config.data.seed, vision=model_config.vision))
  if resume_step is not None:
    abstract = train_state_lib.abstract_train_state(params, optimizer)
    shardings = train_state_lib.train_state_shardings(abstract, optimizer, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    restored = checkpointer.restore(abstract, abstract_ref=params if use_reference else None)
    learner = learner_lib.Learner(graphdef, rest, model_config, optimizer, schedule, mesh,
                                  shardings, learner_config(config))
    if restored.data_state is not None:
      batches.set_state(restored.data_state)
    log.info("resumed from %s at step %d", checkpointer.directory, restored.step)
    return _Run(learner, restored.state, restored.ref_params, batches, meta)

  if config.sft.steps > 0:
    params = warm_start(config, learner_factory, params, records, tokenizer, workdir,
                        model_config.vision)
  learner, state = learner_factory(params, optimizer, schedule)
  # The reference is the policy RL starts from, frozen (its own buffers: the state is
  # donated every step).
  ref_params = (train_state_lib.tree_copy(state.params, learner.state_shardings.params)
                if use_reference else None)
  if config.sft.steps > 0:
    # The warm start is not resumable mid-way; a checkpoint at step 0 makes a restart
    # after it go straight to RL.
    checkpointer.save(0, state, ref_params=ref_params, data_state=batches.get_state(),
                      meta=meta, force=True)
  return _Run(learner, state, ref_params, batches, meta)


def _train(config, workdir, mesh, tokenizer, checkpointer, sample_fn) -> RunResult:
  run = _start(config, workdir, mesh, tokenizer, checkpointer)
  rollout_cfg = rollout_config(config, tokenizer)
  step_cfg = learner_lib.StepConfig(num_iterations=config.rl.num_iterations,
                                    update_batch_size=config.rl.update_batch_size,
                                    beta=config.rl.beta)
  state, ref_params = run.state, run.ref_params
  step = int(state.step)
  rows = []
  preempted = False
  evaluator = held_out_evaluator(config, tokenizer)
  current_model = lambda: nnx.merge(run.learner.graphdef, state.params, run.learner.rest)
  with checkpointing.PreemptionWatcher() as watcher, metrics_lib.MetricsWriter(
      workdir, tensorboard=config.logging.tensorboard, resume_step=step) as writer:
    if evaluator is not None and step == 0:
      # The starting point (after any warm start), so the curves begin before RL.
      writer.write(0, evaluator(0, current_model()))
    bar = metrics_lib.progress_bar(config.total_steps, initial=step, enabled=_progress(config))
    while step < config.total_steps:
      state, metrics = learner_lib.grpo_step(run.learner, state, ref_params, run.batches,
                                             rollout_cfg, step_cfg, tokenizer,
                                             sample_fn=sample_fn)
      step = int(state.step)
      if evaluator is not None:
        metrics.update(evaluator(step, current_model(), final=step >= config.total_steps))
      writer.write(step, metrics)
      rows.append({"step": step, **metrics})
      _check_finite(step, metrics, checkpointer)  # before saving: never save a NaN state
      if ref_params is not None and config.rl.ref_sync_every and (
          step % config.rl.ref_sync_every == 0):
        ref_params = train_state_lib.tree_copy(state.params,
                                               run.learner.state_shardings.params)
      # A SIGTERM reaching some hosts only: all must save (a collective) and stop together.
      stop = bool(batches_lib.every_process(watcher.requested).any())
      checkpointer.save(step, state, ref_params=ref_params,
                        data_state=run.batches.get_state(), meta=run.meta,
                        force=step >= config.total_steps or stop)
      bar.update(1)
      bar.set_postfix(metrics_lib.postfix(metrics))
      if stop:
        preempted = True
        log.warning("preempted: saved step %d to %s; exiting", step, checkpointer.directory)
        break
    bar.close()
  checkpointer.wait()
  return RunResult(step=step, preempted=preempted, metrics=rows, state=state)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 argv: Sequence[str] | None = None) -> None:
  """--config and --workdir, defined by `run` rather than on import, so that importing
  this module next to another entry point (with its own --config) does not clash.

  `argv`: where config_flags reads the --config.a.b overrides from (None: sys.argv).
  """
  config_flags.DEFINE_config_file(
      "config", None, "a config file and variant, e.g. configs/grpo.py:tiny",
      flag_values=flag_values, lock_config=True,
      sys_argv=None if argv is None else list(argv))
  flags.DEFINE_string("workdir", None, "run folder: metrics, checkpoints (resumed if any)",
                      flag_values=flag_values)


parse_flags = cli.parse_flags  # the entry point's parser (tests call it)


def train_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> RunResult:
  """`train` on parsed --config and --workdir flags."""
  if flag_values.config is None:
    raise app.UsageError("--config is required, e.g. --config configs/grpo.py:tiny")
  if not flag_values.workdir:
    raise app.UsageError("--workdir is required")
  return train(flag_values.config, flag_values.workdir)


def main(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cli.setup_logging(logging.INFO, with_time=True)
  # The program's first JAX call: joins a multi-host run's process group (else a no-op).
  distributed.initialize()
  if not batches_lib.is_primary():
    logging.getLogger().setLevel(logging.WARNING)  # the run log is process 0's
  result = train_from_flags(flag_values)
  if batches_lib.is_primary():
    print(json.dumps({"step": result.step, "preempted": result.preempted}))


def run(argv: Sequence[str] | None = None) -> None:
  """`python -m dprl.train` and the `dprl-train` console script."""
  define_flags(argv=argv)
  app.run(main, argv=argv, flags_parser=cli.parse_flags)


if __name__ == "__main__":
  run()
