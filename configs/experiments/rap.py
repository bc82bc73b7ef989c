"""Issue 7's evidence: GRPO on the RAP subset (arXiv 2506.04755) against a random subset
of the same size and against all the data.

    python -m dprl.sweep --config configs/experiments/rap.py:cpu_demo \\
        --workdir runs/exp_rap [--config.dry_run=True]

Base (WORKDIR/base/, once): the demo's warm start (configs/grpo.py:cpu_demo's `sft`:
counting items only, each with its image; or `base.checkpoint`, e.g. the difficulty-prior
experiment's identical one). So the warm model answers nothing without the image
(acc_text = 0), and CDE (D = acc_mm - acc_text > 0.2) keeps the counting items it
answers at all and drops the language-prior ones, which it never learnt. Tried on the
way, to give the model the answer prior a pretrained VLM falls back on: warm starts with
a third or a fifth of the records shown without their image, or with the pool's
language-prior items, learnt only the answer prior (counting items acc_mm 0.18 = acc_text,
or greedy = the most common answer on 3 seeds). Then a pool of `base.pool_items` training items with language-prior questions (answerable
without the image, which CDE should remove: `base.pool_language_prior_fraction`); RAP
selection of the pool with the warm model (`dprl.select.run_selection` into
WORKDIR/base/rap/, the settings in `base.select.config`, configs/rap.py's keys), and a
uniform random subset of the same size (`base.select.random_seed`). Arms, each
`total_steps` plain GRPO steps (std-scaled advantages, no difficulty weighting) from the
base:
  rap       the RAP subset (selected.jsonl)
  random    the random subset (random.jsonl)
  all_data  the whole pool
Wall time per run is in the results; the selection's own is in results.json
(base.prepared.wall_s.select).

Variants: `cpu_demo` (~4 min a run alone on 2 cores; 3 arms x 3 seeds), `tiny` (the tiny
preset, 2 steps a run; tests).
"""

from __future__ import annotations

import os

import ml_collections

from dprl import sweep

CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = {"rap": "{workdir}/base/rap/selected.jsonl", "random": "{workdir}/base/rap/random.jsonl",
        "all_data": "{workdir}/base/pool.jsonl"}



def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c, warm_start, variant = sweep.experiment_base(CONFIGS, "rap", arg,
                                                    "RAP data selection (issue 7)")
  c.total_steps = ml_collections.FieldReference(2 if variant == "tiny" else 120)
  c.seeds = "0,1" if variant == "tiny" else "0,1,2"
  c.base.pool_items = 64 if variant == "tiny" else 1200
  c.base.pool_language_prior_fraction = 0.15  # the synthetic benchmark's default
  c.base.select.enabled = True
  rap = c.base.select.config
  # The language-prior questions are 40-41 tokens with their image (the rest 38).
  prompt_length, buckets = (48, "40,48") if variant == "cpu_demo" else (None, "")
  if prompt_length:
    c.base.warm_start.data.max_prompt_length = prompt_length
    c.base.warm_start.data.length_buckets = buckets
    rap.rollout.max_prompt_length = prompt_length
  if variant == "tiny":
    rap.rollout.num_samples = 4
    rap.rollout.batch_size = 16
    rap.ace.batch_size = 8
    # A tiny model passes CDE on few items; DRM fills the subset to a batch.
    rap.select.target_size = warm_start.data.rollout_batch_size
  eval_items = 8 if variant == "tiny" else 500
  for name, path in DATA.items():
    train = sweep.grpo_config(CONFIGS, variant)
    sweep.jsonl_data(train, path)
    train.sft.steps = 0  # the base is warm already
    train.total_steps = c.get_ref("total_steps")
    train.rl.estimator = "grpo"
    train.rl.difficulty_weighting = "none"
    if prompt_length:
      train.data.max_prompt_length = prompt_length
      train.data.length_buckets = buckets
    c.arms[name] = sweep.one_phase_arm(train, eval_items)
  c.arm_order = ",".join(DATA)
  c.baseline_arm = "all_data"
  return c
