"""Issue 8's evidence: Infi-MMR's three phases (arXiv 2505.23091) against phase 3 alone,
with the same total number of steps.

    python -m dprl.sweep --config configs/experiments/infi_mmr.py:cpu_demo \\
        --workdir runs/exp_infi_mmr [--config.dry_run=True]

Base (WORKDIR/base/, once): the demo's warm start (configs/grpo.py:cpu_demo's `sft`) on a
mixture of the three renditions (`data.template = "plain|caption|text_only"`, one per
record), for `base.warm_start.sft.steps` (cpu_demo: 200, the demo's 130 x ~1.5, since each
rendition gets a third). Why: Infi-MMR starts from an instruct model that already answers
text and image questions; a base warm-started on images only scores 0 on the text
renditions (measured: reward 0 through the whole text_only phase), so phase 1 would
have no signal to learn from.
Arms, from the base, GRPO as configs/grpo.py:VARIANT (its synthetic training data):
  three_phase      configs/infi_mmr.py: text_only -> caption -> multimodal, a third of
                   `total_steps` each (the last takes the remainder), each phase from the
                   previous one's final checkpoint
  multimodal_only  phase 3 (caption-free multimodal) alone for `total_steps`
Held-out accuracy with and without images at the end comes from the runner's end-of-phase
evaluation. The eval curve of the text_only and caption phases is measured with those
phases' prompts (text rendition, caption), so it is not the multimodal accuracy; the final
accuracy (the last evaluations) and the gains are all phase 3's.

Variants: `cpu_demo` (~4 min a run alone on 2 cores; 2 arms x 3 seeds), `tiny` (the tiny
preset, 1 step a phase; tests).
"""

from __future__ import annotations

import os

import ml_collections

from dprl import sweep
from dprl.cli import load_config

CONFIGS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



def _phases(variant: str, eval_every: int) -> ml_collections.ConfigDict:
  curriculum = load_config(f"{CONFIGS}/infi_mmr.py:{variant}")
  for name in curriculum.phase_order:
    train = curriculum.phases[name].train
    if variant == "tiny":
      sweep.tiny_sizes(train)
    train.sft.steps = 0  # the base is warm already
    train.eval.every = eval_every
  return curriculum


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c, warm_start, variant = sweep.experiment_base(CONFIGS, "infi_mmr", arg,
                                                    "Infi-MMR phased curriculum (issue 8)")
  c.total_steps = ml_collections.FieldReference(3 if variant == "tiny" else 120)
  base = c.base.warm_start
  base.data.template = "plain|caption|text_only"
  if variant == "cpu_demo":
    base.sft.steps = 200
    base.data.max_prompt_length = 80  # captions run to 71 tokens (configs/infi_mmr.py)
    base.data.length_buckets = "40,64,80"
  c.seeds = "0,1" if variant == "tiny" else "0,1,2"
  eval_every = warm_start.eval.every
  third = c.get_ref("total_steps") // 3

  three_phase = _phases(variant, eval_every)
  steps = {"text_only": third, "caption": third,
           "multimodal": c.get_ref("total_steps") - third * 2}
  for name in three_phase.phase_order:
    three_phase.phases[name].train.total_steps = steps[name]
  if variant == "tiny":
    three_phase.eval.num_items = 8
    three_phase.eval.batch_size = 8
  c.arms.three_phase = three_phase

  alone = _phases(variant, eval_every).phases.multimodal.train
  alone.total_steps = c.get_ref("total_steps")
  c.arms.multimodal_only = sweep.one_phase_arm(alone, three_phase.eval.num_items,
                                               phase="multimodal")
  c.arms.multimodal_only.eval = three_phase.eval.copy_and_resolve_references()
  c.arm_order = "three_phase,multimodal_only"
  c.baseline_arm = "multimodal_only"
  return c
