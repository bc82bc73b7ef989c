"""Infi-MMR's phased curriculum (arXiv 2505.23091) as chained training configs.

  text_only   foundational reasoning: the problems' text renditions, no image;
  caption     cross-modal adaptation: "Caption: ..." before the image and question;
  multimodal  caption-free multimodal problems.
Each phase is a whole configs/grpo.py config plus `start_from`: "base" (`base_checkpoint`,
or the phase config's own model.init_checkpoint when empty), "previous" (the previous
phase's final checkpoint) or a checkpoint path. Override with
`--config.phases.<phase>.train.<key>=value`, e.g. `--config.phases.caption.train.total_steps=50`.

Variants: `tiny` (a few steps per phase on the tiny preset; tests), `cpu_demo` (the demo
model; phases of 100 steps), `qwen2_5_vl_3b` (the paper's base model size; set
base_checkpoint and each phase's data.path).
"""

from __future__ import annotations

import os

import ml_collections

from dprl.cli import load_config

PHASES = (("text_only", "text_only"), ("caption", "caption"), ("multimodal", "plain"))


def _grpo(variant: str) -> ml_collections.ConfigDict:
  return load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"grpo.py:{variant}"))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in ("tiny", "cpu_demo", "qwen2_5_vl_3b"):
    raise ValueError(f"unknown variant {variant!r} of configs/infi_mmr.py; known: tiny, "
                     "cpu_demo, qwen2_5_vl_3b")
  c = ml_collections.ConfigDict()
  c.base_checkpoint = ""
  c.phase_order = tuple(name for name, _ in PHASES)
  c.phases = ml_collections.ConfigDict()
  for i, (name, template) in enumerate(PHASES):
    train = _grpo(variant)
    if variant == "qwen2_5_vl_3b":
      template += "+format"
    train.data.template = template
    if variant == "tiny":
      train.total_steps = 2
      train.sft.steps = 0
      train.checkpoint.every = 1
      train.logging.progress = False
    elif variant == "cpu_demo":
      train.total_steps = 100
      train.eval.every = 0
      if template != "plain":
        # Text renditions run to 49 tokens and captioned prompts to 71 (plain: 38).
        train.data.max_prompt_length = 80
        train.data.length_buckets = "40,64,80"
      if i > 0:
        train.sft.steps = 0  # only the first phase warm-starts
    c.phases[name] = ml_collections.ConfigDict({"start_from": "base" if i == 0 else "previous",
                                                "train": train})
  # Held-out evaluation after each phase, with images and as text only; 0 items = off.
  c.eval = ml_collections.ConfigDict()
  c.eval.num_items = 16 if variant == "tiny" else 500
  c.eval.tasks = train.data.tasks  # the grpo config's tasks, held out
  c.eval.template = "plain" if variant != "qwen2_5_vl_3b" else "format"
  c.eval.batch_size = 16 if variant == "tiny" else 100
  c.eval.max_prompt_length = 256 if variant != "qwen2_5_vl_3b" else 4096
  return c
