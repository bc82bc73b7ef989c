"""Issue 6's evidence: what each part of the difficulty prior (arXiv 2505.13261) adds.

    python -m dprl.sweep --config configs/experiments/difficulty_prior.py:cpu_demo \\
        --workdir runs/exp_difficulty_prior [--config.dry_run=True]

Base (WORKDIR/base/, once): the demo's warm start (configs/grpo.py:cpu_demo's `sft`), a
pool of `base.pool_items` training items, and its offline difficulty curation with the
warm model (`base.curate_samples` samples per prompt; always- and never-right prompts
dropped; kept.jsonl = stage1.jsonl + stage2.jsonl). Arms, each `total_steps` GRPO steps
from the base on configs/grpo.py:VARIANT otherwise:
  all_data            (a) plain GRPO (std-scaled advantages, no weighting) on the whole pool
  curated             (b) plain GRPO on the curated prompts
  curated_dr_grpo     control: mean-only advantages (dr_grpo), no weighting, curated
                      prompts; separates the weighting from dropping the std division
  curated_<w>         (c) dr_grpo with difficulty weighting w (linear, exp, steep_exp;
                      dprl/rl/advantages.py, default parameters), curated prompts
  two_stage_hints     (d) configs/difficulty_prior.py's recipe with `best_weighting`:
                      stage 1 on the moderate set, then stage 2 (the last third of the
                      steps) on the moderate-to-hard set with difficulty hints
Choose `best_weighting` from the (c) rows, then rerun with
`--config.best_weighting=<w>` (finished runs are skipped; (d) is run again only if it
changed: delete WORKDIR/two_stage_hints first).

Variants: `cpu_demo` (~4 min a run alone on 2 cores; 7 arms x 3 seeds), `tiny` (the tiny
preset, 3 steps a run; tests).
"""

from __future__ import annotations

import os

import ml_collections

from dprl import sweep
from dprl.cli import load_config

CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTINGS = ("linear", "exp", "steep_exp")
ARMS = ("all_data", "curated", "curated_dr_grpo", *(f"curated_{w}" for w in WEIGHTINGS),
        "two_stage_hints")



def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c, warm_start, variant = sweep.experiment_base(CONFIGS, "difficulty_prior", arg,
                                                    "Difficulty prior (issue 6)")
  # tiny: 3, so that stage 2 of two_stage_hints (a third) has a step.
  c.total_steps = ml_collections.FieldReference(3 if variant == "tiny" else 120)
  c.best_weighting = ml_collections.FieldReference("exp")
  c.seeds = "0,1" if variant == "tiny" else "0,1,2"
  # tiny: its warm model is right on ~5% of samples, so curation keeps about a third of
  # the prompts, enough to fill stage 2's rollout batch.
  c.base.pool_items = 128 if variant == "tiny" else 1200  # the demo's --curate_items
  c.base.curate = True
  c.base.curate_samples = 8
  eval_items = 8 if variant == "tiny" else 500
  kept = "{workdir}/base/curate/kept.jsonl"

  def arm(path: str, estimator: str, weighting: str) -> ml_collections.ConfigDict:
    train = sweep.grpo_config(CONFIGS, variant)
    sweep.jsonl_data(train, path)
    train.sft.steps = 0  # the base is warm already
    train.total_steps = c.get_ref("total_steps")
    train.rl.estimator = estimator
    train.rl.difficulty_weighting = weighting
    return sweep.one_phase_arm(train, eval_items)

  c.arms.all_data = arm("{workdir}/base/pool.jsonl", "grpo", "none")
  c.arms.curated = arm(kept, "grpo", "none")
  c.arms.curated_dr_grpo = arm(kept, "dr_grpo", "none")
  for weighting in WEIGHTINGS:
    c.arms[f"curated_{weighting}"] = arm(kept, "dr_grpo", weighting)

  two_stage = load_config(f"{CONFIGS}/difficulty_prior.py:{variant}")
  two_stage.curated_dir = "{workdir}/base/curate"
  stage2_steps = c.get_ref("total_steps") // 3
  stage1_steps = c.get_ref("total_steps") - stage2_steps
  for name, steps in (("stage1", stage1_steps), ("stage2", stage2_steps)):
    train = two_stage.phases[name].train
    if variant == "tiny":
      sweep.tiny_sizes(train)
    train.eval.every = warm_start.eval.every
    train.total_steps = steps
    train.rl.difficulty_weighting = c.get_ref("best_weighting")
  two_stage.eval = sweep.curriculum_eval(two_stage.phases.stage1.train, eval_items)
  c.arms.two_stage_hints = two_stage

  c.arm_order = ",".join(ARMS)
  c.baseline_arm = "all_data"
  return c
