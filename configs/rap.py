"""RAP data selection (arXiv 2506.04755): causal discrepancy, attention confidence,
difficulty-aware replacement, with the untrained base model before RL.

    python -m dprl.select --config configs/rap.py:tiny --workdir runs/rap
    python -m dprl.select --config configs/rap.py:qwen2_5_vl_7b --workdir runs/rap \
        --config.init_checkpoint=/ckpt/Qwen2.5-VL-7B-Instruct \
        --config.data.path=/data/mm_eureka/train.jsonl

Variants (`VARIANTS`):
  tiny           the `tiny` preset, randomly initialised unless `init_checkpoint` is set,
                 with the small character tokenizer, on 12 synthetic training items (a
                 quarter answerable without the image); a laptop-CPU run, what the tests use.
  qwen2_5_vl_7b  the paper's setting: a real checkpoint on an MM-Eureka JSONL file, M = 5
                 rollouts at temperature 1, 2048 new tokens, bf16, the EasyR1 image bounds,
                 the prompts over all devices.

The config is locked: overriding a key that does not exist is an error naming it. Keys
that decide the scores (model, tokenizer, data, template, rollout, ace) must not change
between a run and its resumption (checked); `select` and `output` may, and a rerun with
new thresholds selects again from the stored scores without sampling.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dprl.curation import attention_confidence


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
  c.data.layout = "mm_eureka"  # file: a dprl.data.readers layout name
  c.data.image_root = ""  # file: "" -> the file's folder
  c.data.max_items = 0  # keep the first N items (0: all)

  # The prompt of both rollout kinds. The question-only rollouts show the same prompt
  # with the images (and so their image tokens) removed: `record.question`, not the
  # caption rendition `text_question` (that would leak the image content into text).
  c.template = ml_collections.ConfigDict()
  c.template.names = "format"  # dprl.data.templates names, "+"-joined
  c.template.system_prompt = ""  # "" -> the chat template's default

  # CDE's rollouts: M with image + question, M with the question alone.
  c.rollout = ml_collections.ConfigDict()
  c.rollout.num_samples = 5  # M (the paper's)
  c.rollout.max_new_tokens = 2048
  c.rollout.temperature = 1.0
  c.rollout.top_p = 1.0
  c.rollout.top_k = 0
  c.rollout.batch_size = 16  # prompts per generate call (rows: batch_size * M)
  c.rollout.seed = 0  # the image rollouts use it, the question-only ones seed + 1
  c.rollout.reward_fn = "math"  # a dprl.rl.rewards.REWARD_FNS name; its `correct` counts
  c.rollout.answer_pattern = ""  # "" -> the last \boxed{}; else a regex with one group
  c.rollout.min_pixels = 3136  # Qwen2.5-VL's processor defaults
  c.rollout.max_pixels = 12845056
  c.rollout.max_prompt_length = 2048

  # ACE: teacher-force one sampled image-prompt response, read one layer's attention.
  c.ace = ml_collections.ConfigDict()
  c.ace.layer = -1  # decoder layer (-1: the final one, as the paper)
  c.ace.sigma = attention_confidence.DEFAULT_SIGMA
  c.ace.response = "first"  # attention_confidence.RESPONSE_PICKERS name
  # Uninformative tokens, matched on the decoded token stripped and lower-cased; ""
  # means whitespace-only tokens.
  c.ace.uninformative = attention_confidence.DEFAULT_UNINFORMATIVE
  c.ace.batch_size = 1  # rows per forward pass
  # Queries attended at a time (every layer up to the one read, and its recomputed
  # probabilities): no [B, heads, T, T] array, at most 4 * B * heads * query_chunk * T
  # bytes of scores. The result does not depend on it (up to float32 summation order).
  c.ace.query_chunk = 128
  c.ace.score_every = 32  # records per appended block of scores.jsonl

  # The decisions (rap.SelectionConfig); may change between reruns.
  c.select = ml_collections.ConfigDict()
  c.select.use_cde = True
  c.select.cde_threshold = 0.2  # keep D > this (released code; a review quotes 0.5)
  c.select.use_ace = True
  c.select.ace_lambda = attention_confidence.DEFAULT_LAMBDA
  c.select.use_drm = True
  c.select.target_size = config_dict.placeholder(int)  # None: the CDE+ACE survivors
  c.select.refill_with_trivial = True

  c.output = ml_collections.ConfigDict()
  c.output.dataset_name = "rap"  # TFDS: WORKDIR/tfds/dprl_records/<name>/1.0.0, split train
  c.output.tfds = True
  c.output.plots = True

  # Device mesh; all 1 -> no mesh. One size may be -1 (the remaining devices).
  # rollout.batch_size must be a multiple of mesh.data.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  return c


def _tiny(c: ml_collections.ConfigDict) -> None:
  c.tokenizer = "small"
  c.data.num_items = 12
  c.data.language_prior_fraction = 0.25
  c.rollout.num_samples = 4
  c.rollout.max_new_tokens = 8
  c.rollout.batch_size = 4
  c.rollout.min_pixels = 784
  c.rollout.max_pixels = 3136
  c.rollout.max_prompt_length = 512
  c.ace.batch_size = 4
  c.ace.score_every = 4


def _qwen2_5_vl_7b(c: ml_collections.ConfigDict) -> None:
  c.model.preset = "qwen2_5_vl_7b"
  c.model.dtype = "bfloat16"
  c.data.source = "file"
  c.rollout.min_pixels = 262144
  c.rollout.max_pixels = 4194304
  c.rollout.max_prompt_length = 4096
  c.rollout.batch_size = 64
  c.mesh.data = -1


VARIANTS = {"tiny": _tiny, "qwen2_5_vl_7b": _qwen2_5_vl_7b}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"configs/rap.py: unknown variant {variant!r}; known: "
                     f"{sorted(VARIANTS)}")
  c = base()
  VARIANTS[variant](c)
  return c
