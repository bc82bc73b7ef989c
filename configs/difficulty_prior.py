"""The difficulty prior's two-stage recipe (arXiv 2505.13261) through the phase runner.

    python -m dprl.curate --config configs/curate.py:... --workdir runs/curate ...
    python -m dprl.curriculum --config configs/difficulty_prior.py:cpu_demo --workdir runs/dp \\
        --config.curated_dir=runs/curate --config.base_checkpoint=runs/warm/checkpoints

  stage1  GRPO with difficulty-weighted advantages on the curated moderate prompts
          (curated_dir/stage1.jsonl);
  stage2  from stage 1's final checkpoint, the moderate-to-hard prompts
          (curated_dir/stage2.jsonl) with the difficulty hint appended to prompts whose
          curated pass rate is below the template's threshold.
"""

from __future__ import annotations

import os

import ml_collections

from dprl.cli import load_config


def _grpo(variant: str) -> ml_collections.ConfigDict:
  return load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"grpo.py:{variant}"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "cpu_demo"
  if variant not in ("tiny", "cpu_demo", "qwen2_5_vl_7b"):
    raise ValueError(f"unknown variant {variant!r} of configs/difficulty_prior.py; known: "
                     "tiny, cpu_demo, qwen2_5_vl_7b")
  c = ml_collections.ConfigDict()
  c.curated_dir = ml_collections.FieldReference("runs/curate")  # dprl.curate's --workdir
  c.base_checkpoint = ""
  c.phase_order = ("stage1", "stage2")
  c.phases = ml_collections.ConfigDict()
  fmt = "+format" if variant == "qwen2_5_vl_7b" else ""
  for i, (name, template) in enumerate((("stage1", "plain" + fmt),
                                        ("stage2", "plain" + fmt + "+difficulty_hint"))):
    train = _grpo(variant)
    train.data.source = "jsonl"
    train.data.layout = "dprl"
    train.data.path = c.get_ref("curated_dir") + f"/{name}.jsonl"
    train.data.template = template
    train.sft.steps = 0
    train.rl.estimator = "dr_grpo"
    train.rl.difficulty_weighting = "exp"
    train.eval.every = 0
    if variant != "qwen2_5_vl_7b":  # held-out items (eval.every > 0): the synthetic test split
      train.eval.synthetic_tasks = train.data.tasks
    if variant == "cpu_demo" and name == "stage2":
      # The hint makes a 38-token prompt 60 tokens long (cpu_demo's 40 would skip them all).
      train.data.max_prompt_length = 64
      train.data.length_buckets = "40,64"
    c.phases[name] = ml_collections.ConfigDict({"start_from": "base" if i == 0 else "previous",
                                                "train": train})
  c.eval = ml_collections.ConfigDict()
  c.eval.num_items = 0 if variant == "qwen2_5_vl_7b" else 500
  c.eval.tasks = train.data.tasks  # the grpo config's tasks, held out
  c.eval.template = "plain"
  c.eval.batch_size = 100
  c.eval.max_prompt_length = 256
  return c
