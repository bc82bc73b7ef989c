"""Experiment sweeps: arms x seeds of training runs from one shared base checkpoint.

    python -m dprl.sweep --config configs/experiments/difficulty_prior.py:cpu_demo \\
        --workdir runs/exp_dp [--config.seeds=0,1,2] [--config.arm_order=all_data,curated] \\
        [--config.dry_run=True] [--config.arms.<arm>.phases.<phase>.train.<key>=value ...]

A sweep config (`get_config()` of a file under configs/experiments/, `base_config()` here
for its keys) names:
  base    the shared starting point, prepared once into WORKDIR/base/ and reused:
          `checkpoint`, or else the supervised warm start of `warm_start` (a training
          config, run with `dprl.demo.warm_start_config`); optionally the training pool
          written as JSONL (`pool_items`), its difficulty curation with the base model
          (`curate`, `dprl.demo.run_curation`) and its RAP selection (`select`,
          `python -m dprl.select`) with a random subset of the same size;
  seeds   "0,1,2": each sets `seed_keys` ("seed,data.seed": parameter init and sampling,
          data shuffling, and the held-out items) of every phase of every arm, so within a
          seed all arms are evaluated on the same items;
  arms    name -> a curriculum (`dprl.curriculum.runner`: phase_order, phases each with
          start_from and a whole training config, eval); "{workdir}" in any string is the
          sweep's workdir (the prepared data: "{workdir}/base/curate/kept.jsonl").

Each arm x seed runs in WORKDIR/<arm>/seed<k>/ through `run_curriculum`, so a killed
sweep resumes: finished runs (RUN.json done) are skipped, an interrupted one resumes its
unfinished phase from its last checkpoint. A run whose settings changed since it was
made is an error naming the keys (delete its folder to rerun it).

Results, from every finished run's metrics.jsonl:
  per run  the held-out eval curve across phases (x: steps, and rollouts = steps x
           prompts x samples per step, nominal), the final accuracy as the mean of the
           last `last_evals` evaluations (single checkpoints of tiny models swing 10-25
           points), the same by difficulty level, the gain over the base checkpoint's
           step-0 evaluation of the same seed, with-images and text-only accuracy at the
           end (the runner's end-of-phase evaluation), wall time;
  per arm  mean and sample standard deviation (n - 1) over seeds of each.
Written to WORKDIR/results.json, results.md (tables) and curves.png (accuracy vs
rollouts: per-run moving average, mean over seeds, +-1 std band).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Held-out metric families a run logs (dprl.evaluation.periodic): "<prefix>/accuracy" and
# "<prefix>/accuracy_level_<k>".
METRIC_LABELS = {"eval": "greedy", "eval_sampled": "sampled (T=1)"}
RUN_FILE = "RUN.json"  # a run's marker: attempts, wall time, done
RUN_CONFIG_FILE = "curriculum.json"  # the resolved curriculum a run was made with
BASE_DIR = "base"
BASE_DONE_FILE = "DONE.json"
WORKDIR_TOKEN = "{workdir}"
# Settings that may change between a run and its resumption (how it reports, not what it trains).
IGNORED_SETTINGS = ("logging.",)

log = logging.getLogger(__name__)


class SweepError(ValueError):
  """A sweep config or workdir that cannot be run; the message names the key or file."""


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def base_config(warm_start: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The keys of every sweep config; an experiment file adds `arms` and sets the rest.

  Args:
    warm_start: the training config of the base's supervised warm start (its `sft`
      section; `total_steps` and `eval.every` are zeroed); its `data` section also
      describes the training pool.
  """
  c = ml_collections.ConfigDict()
  c.title = "sweep"
  c.seeds = "0,1,2"
  c.seed_keys = "seed,data.seed"  # training-config keys each seed sets, in every phase
  c.arm_order = ""  # comma-separated: the arms to run, in table order; "" = all, sorted
  c.arms = ml_collections.ConfigDict()
  # The arm whose step-0 evaluation, per seed, is the base accuracy that gains are taken
  # against (it must start from the base with the evaluation template); "" = each run's
  # own first evaluation.
  c.baseline_arm = ""
  c.last_evals = 3  # final accuracy: the mean of this many last evaluations
  c.smoothing = 3  # curves.png: moving-average window, in evaluations
  # The held-out metrics summarised, comma-separated: the first into results.json/.md and
  # curves.png, each other one (where the runs logged it) into results.<metric>.json/.md
  # and curves.<metric>.png. eval_sampled (T = 1) moves before greedy does (demo.py).
  c.metrics = "eval,eval_sampled"
  c.dry_run = False  # print the plan (runs, steps, rollouts) and exit
  # JAX's persistent compilation cache in WORKDIR/jax_cache: the runs after the first of
  # each shape skip XLA compilation (a tiny run: ~55 s -> ~12 s). Off if one is set already.
  c.compilation_cache = True

  c.base = ml_collections.ConfigDict()
  c.base.checkpoint = ""  # an existing checkpoint; "" = the warm start into WORKDIR/base
  c.base.warm_start = warm_start
  # The warm start is probed as the demo's is (dprl.demo.run_warm_start: greedy accuracy on
  # training prompts must beat the most common answer by the margin, else the next seed):
  # from a random init it may learn only the answer prior, and every arm would then start
  # from a model that ignores the image (measured: the RAP experiment's first base).
  c.base.warm_start_tries = 4
  c.base.warm_start_margin = 0.05
  c.base.pool_items = 0  # > 0: WORKDIR/base/pool.jsonl, this many items of warm_start.data
  c.base.pool_language_prior_fraction = config_dict.placeholder(float)  # None: warm_start's
  c.base.curate = False  # difficulty curation of the pool -> WORKDIR/base/curate/
  c.base.curate_samples = 8  # K samples per prompt
  c.base.select = ml_collections.ConfigDict()
  c.base.select.enabled = False  # RAP selection of the pool -> WORKDIR/base/rap/
  c.base.select.random_seed = 0  # WORKDIR/base/rap/random.jsonl: the same size, uniformly
  c.base.select.config = rap_config(warm_start)
  return c


def rap_config(train: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """configs/rap.py with the prompt, sampling and image settings of training config `train`
  (`select_command` adds the pool as its data and the base checkpoint as its model)."""
  from dprl.cli import load_config  # pylint: disable=g-import-not-at-top
  c = load_config(f"{CONFIGS / 'rap.py'}:tiny")
  data = train.data
  c.tokenizer = train.tokenizer
  c.progress = bool(train.logging.progress)
  c.model.preset = train.model.preset
  c.model.dtype = train.model.dtype
  c.data.task = "+".join(t.strip() for t in data.tasks.split(",") if t.strip())
  c.template.names = data.template
  c.template.system_prompt = data.system_prompt or ""
  c.rollout.num_samples = 5
  c.rollout.max_new_tokens = train.sampling.max_new_tokens
  c.rollout.batch_size = 32
  c.rollout.min_pixels = data.min_pixels
  c.rollout.max_pixels = data.max_pixels
  c.rollout.max_prompt_length = data.max_prompt_length
  c.ace.batch_size = 16
  c.ace.score_every = 64
  c.output.tfds = False  # the JSONL is what the runs read
  return c


def curriculum_eval(train: ml_collections.ConfigDict, num_items: int) -> ml_collections.ConfigDict:
  """The runner's end-of-phase evaluation (with images and text only) on the held-out
  split of the training config's own tasks and template."""
  c = ml_collections.ConfigDict()
  c.num_items = num_items
  c.tasks = train.eval.synthetic_tasks or train.data.tasks
  c.template = train.data.template
  c.batch_size = train.eval.batch_size
  c.max_prompt_length = train.data.max_prompt_length
  return c


def one_phase_arm(train: ml_collections.ConfigDict, eval_items: int,
                  phase: str = "grpo") -> ml_collections.ConfigDict:
  """A curriculum of one phase, `train`, from the base checkpoint."""
  c = ml_collections.ConfigDict()
  c.base_checkpoint = ""  # the sweep's base
  c.phase_order = (phase,)
  c.phases = ml_collections.ConfigDict({phase: {"start_from": "base", "train": train}})
  c.eval = curriculum_eval(train, eval_items)
  return c


def jsonl_data(train: ml_collections.ConfigDict, path: str) -> None:
  """Trains `train` on a `dprl`-layout JSONL file (a prepared pool or subset); held-out
  evaluation stays on the synthetic test split of its `data.tasks`."""
  train.eval.synthetic_tasks = train.eval.synthetic_tasks or train.data.tasks
  train.data.source = "jsonl"
  train.data.layout = "dprl"
  train.data.path = path


def tiny_sizes(train: ml_collections.ConfigDict) -> None:
  """The sizes of the experiments' `tiny` variants (configs/grpo.py:tiny runs): held-out
  evaluation of 8 items every step, a checkpoint every step, no progress bars or events."""
  train.eval.every = 1
  train.eval.num_items = 8
  train.eval.batch_size = 8
  train.checkpoint.every = 1
  train.logging.progress = False
  train.logging.tensorboard = False


VARIANTS = ("tiny", "cpu_demo")


def grpo_config(configs_dir: str, variant: str) -> ml_collections.ConfigDict:
  """`configs/grpo.py:<variant>`, with the tiny experiments' sizes for "tiny"."""
  from dprl.cli import load_config  # pylint: disable=g-import-not-at-top
  train = load_config(f"{configs_dir}/grpo.py:{variant}")
  if variant == "tiny":
    tiny_sizes(train)
  return train


def experiment_base(configs_dir: str, experiment: str, arg: str | None, title: str
                    ) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict, str]:
  """What every experiment file starts from: its variant checked (default cpu_demo), the
  warm-start config (`grpo.py:<variant>`) and the titled base config around it.

  Returns (config, warm-start config, variant)."""
  variant = arg or "cpu_demo"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/experiments/{experiment}.py; "
                     f"known: {', '.join(VARIANTS)}")
  warm_start = grpo_config(configs_dir, variant)
  if variant == "tiny":
    tiny_warm_start(warm_start)
  c = base_config(warm_start)
  if variant == "tiny":
    c.base.warm_start_margin = -1.0  # the tiny preset does not read its images
  c.title = f"{title}, {variant}"
  return c, warm_start, variant


def tiny_warm_start(train: ml_collections.ConfigDict) -> None:
  """A warm start long enough for the tiny preset to write answers in the response
  format, so curation and selection see some right and some wrong answers."""
  tiny_sizes(train)
  train.sft.steps = 60  # the loss is ~0.17 by then (6.0 at the start)
  train.sft.batch_size = 16
  train.sft.learning_rate = 3e-3


def parse_seeds(seeds: str) -> list[int]:
  try:
    values = [int(s) for s in str(seeds).split(",") if s.strip()]
  except ValueError:
    raise SweepError(f"config.seeds = {seeds!r}: not comma-separated integers") from None
  if not values or len(set(values)) != len(values):
    raise SweepError(f"config.seeds = {seeds!r}: give distinct integers, e.g. '0,1,2'")
  return values


def arm_names(config: ml_collections.ConfigDict) -> list[str]:
  """The arms to run, in order; an unknown name is an error naming it."""
  known = sorted(config.arms.keys())
  names = [n.strip() for n in config.arm_order.split(",") if n.strip()] or known
  unknown = [n for n in names if n not in config.arms]
  if unknown:
    raise SweepError(f"config.arm_order names {unknown}, not in config.arms (its keys: {known})")
  if len(set(names)) != len(names):
    raise SweepError(f"config.arm_order = {config.arm_order!r} names an arm twice")
  if config.baseline_arm and config.baseline_arm not in config.arms:
    raise SweepError(f"config.baseline_arm = {config.baseline_arm!r} is not in config.arms "
                     f"(its keys: {known})")
  return names


def _substitute(node: ml_collections.ConfigDict, token: str, value: str) -> None:
  for key in list(node.keys()):
    item = node[key]
    if isinstance(item, ml_collections.ConfigDict):
      _substitute(item, token, value)
    elif isinstance(item, str) and token in item:
      node[key] = item.replace(token, value)


def _set_path(node: ml_collections.ConfigDict, path: str, value: Any, where: str) -> None:
  parts = path.split(".")
  for part in parts[:-1]:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise SweepError(f"config.seed_keys: {where} has no {path!r}")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or parts[-1] not in node:
    raise SweepError(f"config.seed_keys: {where} has no {path!r}")
  node[parts[-1]] = value


def base_checkpoint(config: ml_collections.ConfigDict, root: pathlib.Path) -> str:
  return config.base.checkpoint or str(root / BASE_DIR / "warm_start" / "checkpoints")


def run_config(config: ml_collections.ConfigDict, arm: str, seed: int,
               root: pathlib.Path) -> ml_collections.ConfigDict:
  """The curriculum of one run: the arm, "{workdir}" resolved, the base checkpoint and the
  seed set in every phase."""
  c = config.arms[arm].copy_and_resolve_references()
  _substitute(c, WORKDIR_TOKEN, str(root))
  for key in ("phase_order", "phases", "eval"):
    if key not in c:
      raise SweepError(f"config.arms.{arm} has no {key!r}: an arm is a curriculum config "
                       "(dprl.curriculum.runner)")
  with c.unlocked():
    c.base_checkpoint = base_checkpoint(config, root)
  unknown = [n for n in c.phase_order if n not in c.phases]
  if unknown:
    raise SweepError(f"config.arms.{arm}.phase_order names {unknown}, not in "
                     f"config.arms.{arm}.phases ({sorted(c.phases.keys())})")
  keys = [k.strip() for k in config.seed_keys.split(",") if k.strip()]
  for name in c.phase_order:
    for key in keys:
      _set_path(c.phases[name].train, key, seed, f"config.arms.{arm}.phases.{name}.train")
  return c


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


def rollouts_per_step(train: Mapping[str, Any] | ml_collections.ConfigDict) -> int:
  """Nominal rollouts of one GRPO step: prompts x samples (online filtering samples more)."""
  return int(train["data"]["rollout_batch_size"]) * int(train["sampling"]["num_samples"])


def eval_steps(steps: int, every: int) -> list[int]:
  """The steps a phase evaluates at: 0, every `every`, and the last."""
  if not every:
    return []
  return sorted(set(range(0, steps + 1, every)) | {steps})


def run_plan(config: ml_collections.ConfigDict, root: pathlib.Path) -> list[dict[str, Any]]:
  """One entry per arm x seed: name, seed, folder, resolved curriculum and its sizes."""
  plan = []
  for arm in arm_names(config):
    for seed in parse_seeds(config.seeds):
      curriculum = run_config(config, arm, seed, root)
      phases = []
      for name in curriculum.phase_order:
        train = curriculum.phases[name].train
        phases.append({
            "name": name, "steps": int(train.total_steps),
            "start_from": curriculum.phases[name].start_from,
            "rollouts_per_step": rollouts_per_step(train), "template": train.data.template,
            "estimator": train.rl.estimator, "weighting": train.rl.difficulty_weighting,
            "data": train.data.path if train.data.source == "jsonl" else
                    f"synthetic {train.data.tasks} x {train.data.num_items}",
            "eval_steps": eval_steps(int(train.total_steps), int(train.eval.every)),
            "eval_items": int(train.eval.num_items) if train.eval.every else 0})
      plan.append({"arm": arm, "seed": seed, "dir": root / arm / f"seed{seed}",
                   "curriculum": curriculum, "phases": phases,
                   "steps": sum(p["steps"] for p in phases),
                   "rollouts": sum(p["steps"] * p["rollouts_per_step"] for p in phases),
                   "end_eval_items": 2 * int(curriculum.eval.num_items) * len(phases)})
  return plan


def validate_plan(plan: Sequence[Mapping[str, Any]]) -> None:
  """The training configs' own checks (registry names, sizes); errors name the run."""
  from dprl import train as train_lib  # pylint: disable=g-import-not-at-top
  for run in plan:
    for name in run["curriculum"].phase_order:
      train = run["curriculum"].phases[name].train
      if train.total_steps < 1:  # a phase without steps saves no checkpoint to go on from
        raise SweepError(f"config.arms.{run['arm']}.phases.{name}.train.total_steps = "
                         f"{train.total_steps}: a phase needs at least one step")
      try:
        train_lib.validate(train)
      except (ValueError, KeyError) as e:
        raise SweepError(f"config.arms.{run['arm']}.phases.{name}.train: {e}") from None


def is_done(run_dir: pathlib.Path) -> bool:
  marker = run_dir / RUN_FILE
  return marker.exists() and json.loads(marker.read_text()).get("done", False)


def format_plan(config: ml_collections.ConfigDict, root: pathlib.Path,
                plan: Sequence[Mapping[str, Any]]) -> str:
  seeds = parse_seeds(config.seeds)
  arms = arm_names(config)
  lines = [f"{config.title}: {len(arms)} arms x {len(seeds)} seeds = {len(plan)} runs "
           f"(seeds {','.join(map(str, seeds))}; each sets {config.seed_keys}) in {root}", ""]
  lines.append("base (prepared once, shared):")
  for line in base_plan(config, root):
    lines.append(f"  {line}")
  lines.append("")
  lines.append(f"{'arm':<22}{'phases (steps, estimator/weighting, template, data)':<70}"
               f"{'steps':>7}{'rollouts':>10}{'evals':>7}")
  for arm in arms:
    run = next(r for r in plan if r["arm"] == arm)
    for i, p in enumerate(run["phases"]):
      start = "" if p["start_from"] in ("base", "previous") else f" from {p['start_from']}"
      text = (f"{p['name']}: {p['steps']}, {p['estimator']}/{p['weighting']}, {p['template']}, "
              f"{_short(p['data'], root)}{start}")
      if i == 0:
        evals = sum(len(q["eval_steps"]) for q in run["phases"])
        lines.append(f"{arm:<22}{text:<70}{run['steps']:>7}{run['rollouts']:>10}{evals:>7}")
      else:
        lines.append(f"{'':<22}{'-> ' + text:<70}")
  steps = sum(r["steps"] for r in plan)
  rollouts = sum(r["rollouts"] for r in plan)
  eval_items = sum(len(p["eval_steps"]) * p["eval_items"] for r in plan for p in r["phases"])
  eval_items += sum(r["end_eval_items"] for r in plan)
  done = sum(is_done(r["dir"]) for r in plan)
  lines += ["", f"total: {steps} GRPO steps, {rollouts} rollouts (prompts x samples), "
            f"{eval_items} held-out greedy evaluations; {done}/{len(plan)} runs finished"]
  return "\n".join(lines)


def _short(path: str, root: pathlib.Path) -> str:
  return path.replace(str(root), "WORKDIR") if isinstance(path, str) else str(path)


def base_plan(config: ml_collections.ConfigDict, root: pathlib.Path) -> list[str]:
  b, base_dir = config.base, root / BASE_DIR
  ws = b.warm_start
  lines = []
  if b.checkpoint:
    lines.append(f"checkpoint {b.checkpoint}")
  else:
    batch = ws.sft.batch_size or ws.data.rollout_batch_size
    lines.append(f"warm start: {ws.sft.steps} supervised steps x {batch} prompts "
                 f"({ws.model.preset}, {ws.data.tasks}) -> {base_dir / 'warm_start'}")
  if b.pool_items:
    lines.append(f"pool: {b.pool_items} training items -> {base_dir / 'pool.jsonl'}")
  if b.curate:
    lines.append(f"curation: {b.curate_samples} samples x {b.pool_items} prompts -> "
                 f"{base_dir / 'curate'}/kept.jsonl, stage1.jsonl, stage2.jsonl")
  if b.select.enabled:
    m = b.select.config.rollout.num_samples
    lines.append(f"RAP selection: {m} + {m} rollouts x {b.pool_items} prompts and ACE -> "
                 f"{base_dir / 'rap'}/selected.jsonl; random.jsonl of the same size")
  if (base_dir / BASE_DONE_FILE).exists():
    lines.append("(prepared)")
  return lines


# ---------------------------------------------------------------------------------------
# The base: warm start, pool, curation, selection
# ---------------------------------------------------------------------------------------


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(value, Mapping):
    out = {}
    for key, item in value.items():
      out.update(_flat(item, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def changed_keys(stored: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
  """Dotted keys whose values differ (settings in IGNORED_SETTINGS aside).

  A key `stored` lacks is not a change: it was added to dprl after the run or base was
  made (so a sweep resumes across an upgrade); a key `now` lacks is one.
  """
  a, b = _flat(stored), _flat(now)
  ignored = lambda key: any(f".{section}" in f".{key}" for section in IGNORED_SETTINGS)
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
          if k in a and a.get(k) != b.get(k) and not ignored(k)]


def _settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def check_unchanged(path: pathlib.Path, settings: Mapping[str, Any], what: str) -> None:
  """Writes `settings` to `path`, or checks them against what it holds."""
  if path.exists():
    changed = changed_keys(json.loads(path.read_text()), settings)
    if changed:
      shown = "; ".join(changed[:8])
      if len(changed) > 8:
        shown += f"; ... ({len(changed)} in all)"
      raise SweepError(f"{what} in {path.parent} was made with other settings ({shown}); "
                       f"delete {path.parent} to redo it, or restore the settings")
  else:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2))


def random_subset(records: Sequence[Any], size: int, seed: int) -> list[Any]:
  """`size` records drawn uniformly without replacement, in pool order; the same
  arguments always give the same subset."""
  if not 0 <= size <= len(records):
    raise SweepError(f"a random subset of {size} from a pool of {len(records)}")
  chosen = np.sort(np.random.default_rng(seed).choice(len(records), size=size, replace=False))
  return [records[i] for i in chosen]


def write_random_subset(pool: str | os.PathLike, size: int, seed: int,
                        out: str | os.PathLike) -> pathlib.Path:
  """Writes `random_subset` of the `dprl`-layout JSONL `pool` to `out` (same layout)."""
  from dprl.data import readers  # pylint: disable=g-import-not-at-top
  records = readers.read_records(str(pool), layout="dprl")
  return readers.write_jsonl(random_subset(records, size, seed), out)


def _count_lines(path: pathlib.Path) -> int:
  with open(path) as f:
    return sum(1 for line in f if line.strip())


def prepare_base(config: ml_collections.ConfigDict, root: pathlib.Path) -> dict[str, Any]:
  """Runs the base steps the config asks for, once; returns WORKDIR/base/DONE.json."""
  from dprl import demo  # pylint: disable=g-import-not-at-top
  from dprl import train as train_lib  # pylint: disable=g-import-not-at-top
  from dprl.data import readers  # pylint: disable=g-import-not-at-top
  b = config.base
  base_dir = root / BASE_DIR
  done_path = base_dir / BASE_DONE_FILE
  check_unchanged(base_dir / "settings.json", _settings(b), "the base")
  if done_path.exists():
    return json.loads(done_path.read_text())
  if (b.curate or b.select.enabled) and not b.pool_items:
    raise SweepError("config.base.curate / config.base.select.enabled need "
                     "config.base.pool_items > 0 (the pool they score)")
  if b.curate and b.checkpoint:
    raise SweepError("config.base.curate needs the sweep's own warm start "
                     "(config.base.checkpoint = ''): dprl.demo.run_curation reads it")
  info: dict[str, Any] = {"checkpoint": base_checkpoint(config, root), "wall_s": {}}
  min_prompts = b.warm_start.data.rollout_batch_size
  pool_config = b.warm_start.copy_and_resolve_references()
  with pool_config.unlocked():
    if b.pool_items:
      pool_config.data.num_items = b.pool_items
    if b.pool_language_prior_fraction is not None:
      pool_config.data.language_prior_fraction = b.pool_language_prior_fraction

  def step(name: str, message: str, fn):
    print(f"[sweep] base: {message}", flush=True)
    start = time.time()
    result = fn()
    info["wall_s"][name] = round(time.time() - start, 1)
    return result

  if not b.checkpoint:
    step("warm_start", f"warm start ({b.warm_start.sft.steps} supervised steps) -> "
         f"{base_dir / 'warm_start'}",
         lambda: demo.run_warm_start(b.warm_start, base_dir, b.warm_start_tries,
                                     b.warm_start_margin))
  if b.pool_items:
    def write_pool():
      records = train_lib.DATA_SOURCES[pool_config.data.source](pool_config.data)
      readers.write_jsonl(records, base_dir / "pool.jsonl")
      return records
    pool = step("pool", f"pool of {b.pool_items} training items -> {base_dir / 'pool.jsonl'}",
                write_pool)
    info["pool"] = {"path": str(base_dir / "pool.jsonl"), "size": len(pool)}
  if b.curate:
    kept = step("curate", f"difficulty curation ({b.curate_samples} samples x {b.pool_items} "
                f"prompts) -> {base_dir / 'curate'}",
                lambda: demo.run_curation(pool_config.copy_and_resolve_references(), base_dir,
                                          b.pool_items, b.curate_samples))
    if kept is None:
      raise SweepError(f"curation in {base_dir / 'curate'} kept fewer than "
                       f"data.rollout_batch_size = {min_prompts} prompts: the base model is "
                       "right on too few or too many (a longer warm start, or a larger pool)")
    info["curate"] = {name: {"path": str(base_dir / "curate" / f"{name}.jsonl"),
                             "size": _count_lines(base_dir / "curate" / f"{name}.jsonl")}
                      for name in ("kept", "stage1", "stage2")
                      if (base_dir / "curate" / f"{name}.jsonl").exists()}
  if b.select.enabled:
    info["select"] = step("select", f"RAP selection of the {b.pool_items}-item pool -> "
                          f"{base_dir / 'rap'}", lambda: _select(config, root))
    if info["select"]["selected"]["size"] < min_prompts:
      raise SweepError(f"RAP selected {info['select']['selected']['size']} samples, fewer than "
                       f"data.rollout_batch_size = {min_prompts}; see "
                       f"{base_dir / 'rap' / 'report.json'}")
  done_path.write_text(json.dumps(info, indent=2))
  return info


RAP_BASE_CONFIG = f"{CONFIGS / 'rap.py'}:tiny"  # what select_command's overrides are relative to


def _override(key: str, value: Any) -> str:
  if value is None:
    raise SweepError(f"config.base.select.config.{key} = None cannot be passed to dprl.select")
  return f"--config.{key}={repr(value) if isinstance(value, (tuple, list)) else value}"


def select_command(config: ml_collections.ConfigDict, root: pathlib.Path) -> list[str]:
  """`python -m dprl.select` on the pool with the base model and base.select.config.

  A subprocess, not a call: dprl.select and dprl.demo each define absl's --config when
  imported, so one process cannot import both.
  """
  from dprl.cli import load_config  # pylint: disable=g-import-not-at-top
  base_dir = root / BASE_DIR
  wanted = _flat(_settings(config.base.select.config))
  default = _flat(_settings(load_config(RAP_BASE_CONFIG)))
  overrides = {k: v for k, v in wanted.items() if k not in default or default[k] != v}
  overrides.update({"init_checkpoint": base_checkpoint(config, root), "data.source": "file",
                    "data.path": str(base_dir / "pool.jsonl"), "data.layout": "dprl",
                    "data.max_items": 0})
  return [sys.executable, "-m", "dprl.select", f"--config={RAP_BASE_CONFIG}",
          f"--workdir={base_dir / 'rap'}", *(_override(k, v) for k, v in sorted(overrides.items())),
          "--verbosity=-1"]  # absl logs warnings only (Orbax logs every file at INFO)


def _select(config: ml_collections.ConfigDict, root: pathlib.Path) -> dict[str, Any]:
  import subprocess  # pylint: disable=g-import-not-at-top
  out = root / BASE_DIR / "rap"
  command = select_command(config, root)
  print("[sweep] base: " + " ".join(command), flush=True)
  proc = subprocess.run(command, cwd=ROOT, check=False)
  if proc.returncode:
    raise SweepError(f"RAP selection failed (exit {proc.returncode}); its command is printed "
                     f"above, its outputs are in {out}")
  report = json.loads((out / "report.json").read_text())
  size = _count_lines(out / "selected.jsonl")
  write_random_subset(root / BASE_DIR / "pool.jsonl", size, config.base.select.random_seed,
                      out / "random.jsonl")
  return {"selected": {"path": str(out / "selected.jsonl"), "size": size},
          "random": {"path": str(out / "random.jsonl"), "size": size,
                     "seed": config.base.select.random_seed},
          "counts": report["counts"], "command": command}


def check_data(run: Mapping[str, Any]) -> None:
  """Every JSONL a phase trains on exists and fills a rollout batch (a smaller file
  would never yield one)."""
  curriculum = run["curriculum"]
  for name in curriculum.phase_order:
    data = curriculum.phases[name].train.data
    if data.source != "jsonl":
      continue
    where = f"config.arms.{run['arm']}.phases.{name}.train.data.path"
    if not os.path.exists(data.path):
      raise SweepError(f"{where} = {data.path!r} does not exist")
    if data.path.endswith(".jsonl") and (
        _count_lines(pathlib.Path(data.path)) < data.rollout_batch_size):
      raise SweepError(f"{where} = {data.path!r} has fewer records than "
                       f"data.rollout_batch_size = {data.rollout_batch_size}")


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def execute_run(run: Mapping[str, Any], index: int, total: int,
                last: int = 3) -> dict[str, Any] | None:
  """Runs (or resumes) one arm x seed; returns its RUN.json, None if it failed."""
  from dprl.curriculum.runner import run_curriculum  # pylint: disable=g-import-not-at-top
  run_dir: pathlib.Path = run["dir"]
  label = f"[sweep] run {index}/{total} {run['arm']} seed {run['seed']}"
  check_unchanged(run_dir / RUN_CONFIG_FILE, _settings(run["curriculum"]),
                  f"run {run['arm']} seed {run['seed']}")
  marker = run_dir / RUN_FILE
  state = json.loads(marker.read_text()) if marker.exists() else {"attempts": [], "done": False}
  if state["done"]:
    print(f"{label}: finished before, skipped", flush=True)
    return state
  check_data(run)
  resumed = " (resuming)" if state["attempts"] else ""
  print(f"{label}: start{resumed}: {len(run['phases'])} phase(s), {run['steps']} steps, "
        f"{run['rollouts']} rollouts -> {run_dir}", flush=True)
  start = time.time()
  error = None
  try:
    run_curriculum(run["curriculum"], str(run_dir))
    state["done"] = True
  except (KeyboardInterrupt, SystemExit):
    state["attempts"].append(round(time.time() - start, 1))
    marker.write_text(json.dumps(state, indent=2))
    print(f"{label}: interrupted after {(time.time() - start) / 60:.1f} min; rerun the "
          "sweep to resume it", flush=True)
    raise
  except Exception as e:  # pylint: disable=broad-except  (the other runs go on)
    error = f"{type(e).__name__}: {e}"
    log.exception("%s failed", label)
  state["attempts"].append(round(time.time() - start, 1))
  state["wall_s"] = round(sum(state["attempts"]), 1)
  state["error"] = error
  marker.write_text(json.dumps(state, indent=2))
  if error:
    print(f"{label}: FAILED after {(time.time() - start) / 60:.1f} min: {error}", flush=True)
    return None
  summary = summarize_run(load_run(run_dir, run["curriculum"].phase_order), last)
  print(f"{label}: finished in {state['wall_s'] / 60:.1f} min: final accuracy "
        f"{summary['final_accuracy']:.3f} (mean of the evaluations at steps "
        f"{summary['final_steps']})", flush=True)
  return state


@contextlib.contextmanager
def compilation_cache(path: str | None):
  """JAX's persistent compilation cache in `path` for the duration (nothing when `path` is
  None or a cache directory is configured already, e.g. by JAX_COMPILATION_CACHE_DIR)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import (  # pylint: disable=g-import-not-at-top
      compilation_cache as cache_lib)
  if path is None or jax.config.jax_compilation_cache_dir:
    yield
    return
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  try:
    yield
  finally:
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    cache_lib.reset_cache()


def run_sweep(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Prepares the base, runs every arm x seed (resuming), writes and returns the results;
  with `dry_run`, prints the plan and returns it instead."""
  root = pathlib.Path(workdir).resolve()
  plan = run_plan(config, root)
  validate_plan(plan)
  if config.dry_run:
    print(format_plan(config, root, plan))
    return {"plan": [{k: v for k, v in r.items() if k != "curriculum"} | {"dir": str(r["dir"])}
                     for r in plan]}
  root.mkdir(parents=True, exist_ok=True)
  print(format_plan(config, root, plan), flush=True)
  failed = []
  with compilation_cache(str(root / "jax_cache") if config.compilation_cache else None):
    base = prepare_base(config, root)
    for i, run in enumerate(plan, 1):
      if execute_run(run, i, len(plan), int(config.last_evals)) is None:
        failed.append(f"{run['arm']} seed {run['seed']}")
  main_metric, *other_metrics = metric_names(config)
  results = collect_results(config, root, plan, main_metric)
  results["base"]["prepared"] = base
  written = write_results(results, root, config)
  for metric in other_metrics:
    extra = collect_results(config, root, plan, metric)
    if any(r["curve"] for arm in extra["arms"].values() for r in arm["runs"]):
      extra["base"]["prepared"] = base
      written += write_results(extra, root, config, suffix=f".{metric}")
  print(f"[sweep] wrote {', '.join(str(p) for p in written)}")
  print((root / "results.md").read_text())
  if failed:
    raise SystemExit(f"[sweep] {len(failed)} run(s) failed: {', '.join(failed)}; see their "
                     f"{RUN_FILE}; rerun the sweep to retry them")
  return results


# ---------------------------------------------------------------------------------------
# Aggregation (pure functions of metrics rows)
# ---------------------------------------------------------------------------------------


def _level_key(level: str) -> tuple:
  return (0, int(level), "") if level.isdigit() else (1, 0, level)


def eval_curve(phases: Sequence[Mapping[str, Any]], metric: str = "eval") -> list[dict[str, Any]]:
  """The held-out evaluations of a run's phases on one axis.

  Args:
    phases: in order, each {"name", "rows" (metrics.jsonl rows), "steps" (the phase's
      steps), "rollouts_per_step"}.
    metric: the metric family ("eval": greedy, "eval_sampled": T = 1).

  Returns:
    [{"phase", "step", "rollouts", "accuracy", "by_level"}]: steps and rollouts offset by
    those of the earlier phases. A phase's step-0 evaluation (the previous phase's final
    model, measured with this phase's prompts) replaces the previous phase's last one at
    the same step.
  """
  key, level_prefix = f"{metric}/accuracy", f"{metric}/accuracy_level_"
  curve: list[dict[str, Any]] = []
  step_offset = rollout_offset = 0
  for phase in phases:
    per_step = int(phase["rollouts_per_step"])
    for row in phase["rows"]:
      if row.get(key) is None:
        continue
      point = {"phase": phase["name"], "step": step_offset + int(row["step"]),
               "rollouts": rollout_offset + int(row["step"]) * per_step,
               "accuracy": float(row[key]),
               "by_level": {k[len(level_prefix):]: float(v) for k, v in row.items()
                            if k.startswith(level_prefix) and v is not None}}
      if curve and curve[-1]["step"] == point["step"]:
        curve[-1] = point
      else:
        curve.append(point)
    step_offset += int(phase["steps"])
    rollout_offset += int(phase["steps"]) * per_step
  return curve


def final_accuracy(curve: Sequence[Mapping[str, Any]], last: int) -> dict[str, Any]:
  """The mean of the last `last` evaluations, overall and per level."""
  if not curve:
    return {"accuracy": None, "steps": [], "by_level": {}}
  points = curve[-last:]
  levels = sorted({lv for p in points for lv in p["by_level"]}, key=_level_key)
  return {"accuracy": float(np.mean([p["accuracy"] for p in points])),
          "steps": [p["step"] for p in points],
          "by_level": {lv: float(np.mean([p["by_level"][lv] for p in points
                                          if lv in p["by_level"]]))
                       for lv in levels}}


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
  """{"n", "mean", "std" (sample, n - 1; None for n < 2), "values"} of the non-None values."""
  kept = [float(v) for v in values if v is not None]
  if not kept:
    return {"n": 0, "mean": None, "std": None, "values": []}
  return {"n": len(kept), "mean": float(np.mean(kept)),
          "std": float(np.std(kept, ddof=1)) if len(kept) > 1 else None, "values": kept}


def load_run(run_dir: pathlib.Path, phase_order: Sequence[str]) -> dict[str, Any]:
  """A finished run's phases (metrics rows, steps, rollouts per step, end evaluation) and
  its RUN.json, read from its folder."""
  from dprl import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  phases = []
  for name in phase_order:
    phase_dir = run_dir / name
    done = json.loads((phase_dir / "DONE.json").read_text())
    train = json.loads((phase_dir / "config.json").read_text())
    phases.append({"name": name, "rows": metrics_lib.read_metrics(str(phase_dir)),
                   "steps": done["steps"], "rollouts_per_step": rollouts_per_step(train),
                   "end_eval": done.get("eval") or {}})
  marker = run_dir / RUN_FILE
  state = json.loads(marker.read_text()) if marker.exists() else {}
  return {"phases": phases, "wall_s": state.get("wall_s")}


def summarize_run(run: Mapping[str, Any], last: int, base_accuracy: float | None = None,
                  metric: str = "eval") -> dict[str, Any]:
  """One run's curve of `metric`, final accuracy (mean of the last `last` evaluations),
  gain over `base_accuracy` (default: the run's own step-0 evaluation) and end-of-run
  accuracies."""
  curve = eval_curve(run["phases"], metric)
  final = final_accuracy(curve, last)
  if base_accuracy is None and curve and curve[0]["step"] == 0:
    base_accuracy = curve[0]["accuracy"]
  end = run["phases"][-1]["end_eval"] if run["phases"] else {}
  gain = (final["accuracy"] - base_accuracy
          if final["accuracy"] is not None and base_accuracy is not None else None)
  return {"curve": curve, "final_accuracy": final["accuracy"], "final_steps": final["steps"],
          "final_by_level": final["by_level"], "base_accuracy": base_accuracy, "gain": gain,
          "accuracy_with_images": end.get("accuracy_with_images"),
          "accuracy_text_only": end.get("accuracy_text_only"),
          "steps": sum(int(p["steps"]) for p in run["phases"]),
          "rollouts": sum(int(p["steps"]) * int(p["rollouts_per_step"]) for p in run["phases"]),
          "wall_s": run.get("wall_s")}


def aggregate_arm(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Mean and std over an arm's runs (seeds) of each run summary's numbers."""
  levels = sorted({lv for r in runs for lv in r["final_by_level"]}, key=_level_key)
  out = {key: mean_std([r[key] for r in runs])
         for key in ("final_accuracy", "gain", "base_accuracy", "accuracy_with_images",
                     "accuracy_text_only", "wall_s")}
  out["by_level"] = {lv: mean_std([r["final_by_level"].get(lv) for r in runs]) for lv in levels}
  out["n_seeds"] = len(runs)
  out["rollouts"] = max((r["rollouts"] for r in runs), default=0)
  out["steps"] = max((r["steps"] for r in runs), default=0)
  return out


def collect_results(config: ml_collections.ConfigDict, root: pathlib.Path,
                    plan: Sequence[Mapping[str, Any]], metric: str = "eval") -> dict[str, Any]:
  """results.json's contents for held-out `metric` from the finished runs of `plan`
  (unfinished ones listed)."""
  last = int(config.last_evals)
  loaded, missing = {}, []
  for run in plan:
    if is_done(run["dir"]):
      loaded[(run["arm"], run["seed"])] = load_run(run["dir"], run["curriculum"].phase_order)
    else:
      missing.append({"arm": run["arm"], "seed": run["seed"], "dir": str(run["dir"])})
  # The base accuracy of each seed: the baseline arm's step-0 evaluation, else (no
  # baseline arm, or it did not run) the first arm's in order with a finished run.
  base_by_seed: dict[int, float] = {}
  for arm in [config.baseline_arm] * bool(config.baseline_arm) + arm_names(config):
    for (run_arm, seed), run in loaded.items():
      curve = eval_curve(run["phases"][:1], metric)
      if run_arm == arm and curve and curve[0]["step"] == 0:
        base_by_seed.setdefault(seed, curve[0]["accuracy"])
  arms: dict[str, Any] = {}
  for arm in arm_names(config):
    runs = []
    for run in plan:
      if run["arm"] != arm or (arm, run["seed"]) not in loaded:
        continue
      base = base_by_seed.get(run["seed"]) if config.baseline_arm in arm_names(config) else None
      summary = summarize_run(loaded[(arm, run["seed"])], last, base, metric)
      runs.append({"seed": run["seed"], "dir": str(run["dir"]), **summary})
    phases = next((r["phases"] for r in plan if r["arm"] == arm), [])
    arms[arm] = {"phases": [{k: p[k] for k in ("name", "steps", "start_from", "estimator",
                                               "weighting", "template", "data")}
                            for p in phases],
                 **aggregate_arm(runs), "runs": runs}
  return {"title": config.title, "workdir": str(root), "metric": metric,
          "seeds": parse_seeds(config.seeds),
          "seed_keys": config.seed_keys, "last_evals": last,
          "base": {"checkpoint": base_checkpoint(config, root),
                   "baseline_arm": config.baseline_arm or None,
                   "accuracy_by_seed": {str(k): v for k, v in sorted(base_by_seed.items())},
                   "accuracy": mean_std(list(base_by_seed.values()))},
          "arms": arms, "missing": missing}


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def _pm(stat: Mapping[str, Any], digits: int = 3, sign: bool = False, scale: float = 1.0) -> str:
  if stat["mean"] is None:
    return "-"
  fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
  text = fmt.format(stat["mean"] * scale)
  if stat["std"] is not None:
    text += f" ± {stat['std'] * scale:.{digits}f}"
  return text


def results_table(results: Mapping[str, Any]) -> str:
  """results.md: the arms table, the by-level table, and how the numbers were made."""
  arms = results["arms"]
  base = results["base"]["accuracy"]
  label = METRIC_LABELS.get(results.get("metric", "eval"), results.get("metric"))
  lines = [f"# {results['title']}", "",
           f"Held-out {label} accuracy. Final = mean of each run's last {results['last_evals']} "
           f"evaluations; ± = standard deviation over seeds (n - 1); gain = final minus the base "
           f"checkpoint's step-0 evaluation of the same seed (base: {_pm(base)}, "
           f"{base['n']} seeds); text-only / with images = the end-of-run evaluation without / "
           "with the image; rollouts = steps x prompts x samples per step. "
           f"Seeds {','.join(map(str, results['seeds']))} (each sets {results['seed_keys']}).", "",
           "| arm | seeds | final accuracy | gain over base | text-only | with images (end) "
           "| rollouts | wall time (min) |",
           "|---|---|---|---|---|---|---|---|"]
  for name, arm in arms.items():
    lines.append(f"| {name} | {arm['n_seeds']} | {_pm(arm['final_accuracy'])} | "
                 f"{_pm(arm['gain'], sign=True)} | {_pm(arm['accuracy_text_only'])} | "
                 f"{_pm(arm['accuracy_with_images'])} | {arm['rollouts']} | "
                 f"{_pm(arm['wall_s'], digits=1, scale=1 / 60)} |")
  levels = sorted({lv for arm in arms.values() for lv in arm["by_level"]}, key=_level_key)
  if levels:
    lines += ["", "Final accuracy by difficulty level:", "",
              "| arm | " + " | ".join(f"level {lv}" for lv in levels) + " |",
              "|---|" + "---|" * len(levels)]
    for name, arm in arms.items():
      cells = [_pm(arm["by_level"][lv]) if lv in arm["by_level"] else "-" for lv in levels]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "Arms:", ""]
  for name, arm in arms.items():
    phases = " -> ".join(f"{p['name']} ({p['steps']} steps, {p['estimator']}/{p['weighting']}, "
                         f"{p['template']}, {_short(p['data'], pathlib.Path(results['workdir']))})"
                         for p in arm["phases"])
    lines.append(f"- {name}: {phases}")
  if results["missing"]:
    lines += ["", "Not finished (not in the tables): " +
              ", ".join(f"{m['arm']} seed {m['seed']}" for m in results["missing"])]
  return "\n".join(lines) + "\n"


def _mean_curve(runs: Sequence[Mapping[str, Any]], window: int):
  """(x, mean, std) over runs of each run's moving-averaged accuracy, on the first run's
  rollout axis (other runs interpolated when their evaluation points differ)."""
  from dprl.plots import moving_average  # pylint: disable=g-import-not-at-top
  curves = [r["curve"] for r in runs if r["curve"]]
  if not curves:
    return None
  x = np.asarray([p["rollouts"] for p in curves[0]], np.float64)
  ys = []
  for curve in curves:
    cx = np.asarray([p["rollouts"] for p in curve], np.float64)
    cy = moving_average([p["accuracy"] for p in curve], min(window, len(curve)))
    ys.append(cy if np.array_equal(cx, x) else np.interp(x, cx, cy))
  ys = np.stack(ys)
  return x, ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros_like(x)


def plot_curves(results: Mapping[str, Any], path: str, window: int) -> str:
  """Accuracy vs rollouts per arm (mean over seeds of the smoothed curves, +-1 std band),
  and the final accuracy by level."""
  from dprl.plots import plt  # pylint: disable=g-import-not-at-top  (Agg backend set there)
  fig, (ax, ax_levels) = plt.subplots(1, 2, figsize=(11, 4))
  arms = results["arms"]
  for i, (name, arm) in enumerate(arms.items()):
    curve = _mean_curve(arm["runs"], window)
    if curve is None:
      continue
    x, mean, std = curve
    ax.plot(x, mean, color=f"C{i % 10}", lw=2, label=f"{name} (n={arm['n_seeds']})")
    ax.fill_between(x, mean - std, mean + std, color=f"C{i % 10}", alpha=0.15, lw=0)
  base = results["base"]["accuracy"]
  if base["mean"] is not None:
    ax.axhline(base["mean"], color="k", ls=":", lw=1, label="base")
  ax.set_xlabel("rollouts (prompts x samples)")
  ax.set_ylabel(f"held-out {METRIC_LABELS.get(results.get('metric', 'eval'), 'eval')} accuracy")
  ax.set_title(f"moving average over {window} evaluations; mean ± std over seeds", fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  levels = sorted({lv for arm in arms.values() for lv in arm["by_level"]}, key=_level_key)
  width = 0.8 / max(len(arms), 1)
  for i, (name, arm) in enumerate(arms.items()):
    stats = [arm["by_level"].get(lv, {"mean": None, "std": None}) for lv in levels]
    ax_levels.bar(np.arange(len(levels)) + (i - (len(arms) - 1) / 2) * width,
                  [s["mean"] or 0.0 for s in stats], width,
                  yerr=[s["std"] or 0.0 for s in stats], color=f"C{i % 10}", label=name,
                  capsize=2)
  ax_levels.set_xticks(range(len(levels)), [f"level {lv}" for lv in levels])
  ax_levels.set_ylabel(f"final accuracy (mean of last {results['last_evals']} evaluations)")
  ax_levels.grid(alpha=0.3, axis="y")
  fig.suptitle(results["title"])
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def metric_names(config: ml_collections.ConfigDict) -> list[str]:
  names = [m.strip() for m in str(config.metrics).split(",") if m.strip()]
  if not names:
    raise SweepError("config.metrics is empty; e.g. 'eval' (greedy) or 'eval,eval_sampled'")
  return names


def write_results(results: Mapping[str, Any], root: pathlib.Path,
                  config: ml_collections.ConfigDict, suffix: str = "") -> list[pathlib.Path]:
  """results<suffix>.json, results<suffix>.md and curves<suffix>.png in `root`."""
  paths = [root / f"results{suffix}.json", root / f"results{suffix}.md", root / f"curves{suffix}.png"]
  paths[0].write_text(json.dumps(results, indent=2))
  paths[1].write_text(results_table(results))
  plot_curves(results, str(paths[2]), int(config.smoothing))
  return paths


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m dprl.sweep --config FILE.py:VARIANT --workdir DIR [--config.a.b=...]`.

  The flags live in their own FlagValues: the sweep imports dprl.demo, which defines
  --config and --workdir of its own on absl's global flags when imported.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from dprl import cli  # pylint: disable=g-import-not-at-top
  argv = list(sys.argv if argv is None else argv)
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      "config", None, "a sweep config, e.g. configs/experiments/difficulty_prior.py:cpu_demo",
      flag_values=flag_values, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "the sweep's folder: base/, <arm>/seed<k>/, results",
                      flag_values=flag_values)
  rest = cli.parse_flags(argv, flag_values)
  if len(rest) > 1 or flag_values.config is None or not flag_values.workdir:
    unexpected = f"; unexpected arguments: {rest[1:]}" if len(rest) > 1 else ""
    sys.stderr.write("usage: python -m dprl.sweep --config FILE.py:VARIANT --workdir DIR "
                     f"[--config.a.b=value ...]{unexpected}\n")
    sys.exit(2)
  flags.FLAGS.mark_as_parsed()  # absl logging (Orbax) reads the global flags
  cli.setup_logging()
  try:
    run_sweep(flag_values.config, flag_values.workdir)
  except SweepError as e:
    sys.stderr.write(f"dprl.sweep: {e}\n")
    sys.exit(1)


if __name__ == "__main__":
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  main()
