"""Offline difficulty curation (difficulty prior, arXiv 2505.13261): score, filter, split.

    python -m dprl.curate --config configs/curate.py:tiny --workdir runs/curate
    python -m dprl.curate --config configs/curate.py:qwen2_5_vl_7b --workdir runs/curate \
        --config.init_checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct \
        --config.data.path=/data/geometry3k/train.jsonl

Variants (`VARIANTS`):
  tiny           the `tiny` preset, randomly initialised unless `init_checkpoint` is set,
                 with the small character tokenizer, on 16 synthetic training items; a
                 laptop-CPU run, what the tests use.
  qwen2_5_vl_7b  a real checkpoint on a JSONL file (`data.layout`, default geometry3k):
                 K = 8 samples at temperature 1, 2048 new tokens, bf16, the EasyR1 image
                 bounds (methods.md), the prompts over all devices.

The config is locked: overriding a key that does not exist is an error naming it. Keys
that decide the scores (model, tokenizer, data, template, sampling) must not change
between a run and its resumption (checked); filter, split, hint and output may, and a
rerun with new ones re-curates from the stored scores without sampling again.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dprl.curation import difficulty
from dprl.data import templates


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # The base model: a Hugging Face folder (config.json + safetensors), an Orbax run /
  # checkpoints / step folder of a dprl run, or "" for a random `model.preset`.
  c.init_checkpoint = ""
  # "" -> the checkpoint folder's tokenizer if it has one, else Qwen2.5-VL's (built
  # offline); "small" -> dprl's small character-level tokenizer; or a tokenizer folder.
  c.tokenizer = ""
  c.progress = True

  c.model = ml_collections.ConfigDict()
  c.model.preset = "tiny"  # random init only (no init_checkpoint)
  c.model.seed = 0
  c.model.dtype = "float32"  # compute dtype: float32 or bfloat16

  # "synthetic" (dprl.data.synthetic.generate_split) or "file"
  # (dprl.data.readers.read_records(path, layout)); see dprl.eval.DATA_SOURCES.
  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.task = "count_color"  # synthetic: a task name, or "a+b" for several
  c.data.split = "train"
  c.data.num_items = 2000
  c.data.seed = 0
  c.data.image_size = 56
  c.data.language_prior_fraction = 0.15
  c.data.path = ""  # file: the JSONL/JSON file
  c.data.layout = "geometry3k"  # file: a dprl.data.readers.LAYOUTS name
  c.data.image_root = ""  # file: "" -> the file's folder
  c.data.max_items = 0  # keep the first N items (0: all)

  # How a prompt is shown to the base model while it is scored (no hint: pass rates are
  # not known yet). Stage 1 trains with this; stage 2 with it plus the hint.
  c.template = ml_collections.ConfigDict()
  c.template.names = "format"  # dprl.data.templates names, "+"-joined
  c.template.system_prompt = ""  # "" -> the chat template's default

  c.sampling = ml_collections.ConfigDict()
  c.sampling.num_samples = 8  # K responses per prompt; pass rate = correct / K
  c.sampling.max_new_tokens = 2048
  c.sampling.temperature = 1.0
  c.sampling.top_p = 1.0
  c.sampling.top_k = 0
  c.sampling.batch_size = 16  # prompts per generate call (rows: batch_size * K)
  c.sampling.seed = 0
  c.sampling.reward_fn = "math"  # a dprl.rl.rewards.REWARD_FNS name; its `correct` counts
  c.sampling.answer_pattern = ""  # "" -> the last \boxed{}; else a regex with one group
  c.sampling.min_pixels = 3136  # Qwen2.5-VL's processor defaults
  c.sampling.max_pixels = 12845056
  c.sampling.max_prompt_length = 2048

  # Kept: pass rates in [low, high], as counts of correct answers (difficulty.py):
  # min_correct = max(1, ceil(low K)), max_correct = min(K - 1, floor(high K)); either
  # count may be set directly instead. Never-right and always-right are always dropped.
  c.filter = ml_collections.ConfigDict()
  c.filter.low = difficulty.DEFAULT_LOW
  c.filter.high = difficulty.DEFAULT_HIGH
  c.filter.min_correct = config_dict.placeholder(int)
  c.filter.max_correct = config_dict.placeholder(int)

  # Kept prompts ranked hardest first; stage 2 takes a prefix (difficulty.SPLIT_RULES).
  c.split = ml_collections.ConfigDict()
  c.split.rule = "fraction"  # fraction | size | pass_rate
  c.split.stage2_fraction = 0.23  # ~ the paper's 0.6K of 2.6K
  c.split.stage2_size = 600
  c.split.stage2_max_pass_rate = 0.5
  c.split.seed = 0  # tie-break among equal pass rates

  c.hint = ml_collections.ConfigDict()
  c.hint.text = templates.DIFFICULTY_HINT
  # Stage-2 prompts with pass rate < this get metadata["hint"] = True; the value is the
  # difficulty_hint template's hint_below_pass_rate (written to WORKDIR/templates.json).
  c.hint.below_pass_rate = templates.TemplateConfig.hint_below_pass_rate
  c.hint.attach_to_question = False  # also append the sentence to the question text

  c.output = ml_collections.ConfigDict()
  c.output.dataset_name = "curated"  # TFDS: WORKDIR/tfds/dprl_records/<name>/1.0.0
  c.output.tfds = True

  # Device mesh; all 1 -> no mesh. One size may be -1 (the remaining devices).
  # sampling.batch_size must be a multiple of mesh.data.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  c.tokenizer = "small"
  c.data.num_items = 16
  c.sampling.max_new_tokens = 16
  c.sampling.batch_size = 8


def _qwen2_5_vl_7b(c: ml_collections.ConfigDict) -> None:
  c.model.preset = "qwen2_5_vl_7b"
  c.model.dtype = "bfloat16"
  c.data.source = "file"
  c.sampling.min_pixels = 262144
  c.sampling.max_pixels = 4194304
  c.sampling.max_prompt_length = 4096
  c.sampling.batch_size = 64
  c.mesh.data = -1


VARIANTS = {"tiny": _tiny, "qwen2_5_vl_7b": _qwen2_5_vl_7b}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"configs/curate.py: unknown variant {variant!r}; known: "
                     f"{sorted(VARIANTS)}")
  c = base()
  VARIANTS[variant](c)
  return c
