"""Evaluation: sample K responses per test item, score them, report accuracy and pass@k.

    python -m dprl.eval --config configs/eval.py:tiny --workdir runs/eval
    python -m dprl.eval --config configs/eval.py:mathvista --checkpoint /ckpt/Qwen2.5-VL-7B \
        --config.data.path /data/mathvista/testmini.jsonl --workdir runs/mathvista

Variants:
  tiny       the `tiny` model (random init unless --checkpoint names a tiny checkpoint)
             with the small character-level tokenizer on 16 synthetic test items; a
             laptop-CPU run, what the tests use.
  mathvista  a real checkpoint on MathVista (`data.layout=mathvista`): greedy, one sample,
             2048 new tokens, bf16, the papers' image pixel bounds.
  mathverse  the same on MathVerse.
"""

from __future__ import annotations

import ml_collections

from dprl.data import templates


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # An HF folder (config.json + safetensors), an Orbax run / checkpoints / step folder, or
  # "" for a randomly initialised `model.preset` (smoke tests only).
  config.checkpoint = ""
  # "" -> the checkpoint folder's tokenizer if it has one, else Qwen2.5-VL's (built
  # offline); "small" -> dprl's small character-level tokenizer; or a tokenizer folder.
  config.tokenizer = ""
  config.output = ""  # the JSON report; "" -> WORKDIR/eval.json
  config.results = ""  # per-item results (JSONL); "" -> the output's name + .items.jsonl
  config.resume = False  # keep the items already in `results` and score only the rest
  config.progress = True

  config.model = ml_collections.ConfigDict()
  config.model.preset = "tiny"  # used only without a checkpoint (random init)
  config.model.seed = 0
  config.model.dtype = "float32"  # compute dtype: float32 or bfloat16

  # Where the test items come from: "synthetic" (dprl.data.synthetic.generate_split)
  # or "file" (dprl.data.readers.read_records(path, layout)).
  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"
  config.data.task = "count_color"  # synthetic: a task name, or "a+b" for several
  config.data.split = "test"
  config.data.num_items = 16
  config.data.seed = 0
  config.data.image_size = 56
  config.data.language_prior_fraction = 0.15
  config.data.path = ""  # file: the JSONL/JSON file
  config.data.layout = "mathvista"  # file: a dprl.data.readers.LAYOUTS name
  config.data.image_root = ""  # file: "" -> the file's folder
  config.data.max_items = 0  # keep the first N items (0: all)

  config.template = ml_collections.ConfigDict()
  config.template.names = "format"  # dprl.data.templates names, "+"-joined
  config.template.text_only = False  # show the items' text rendition, no image
  # "off"; "hard": the hint for items whose pass_rate is below hint_below_pass_rate
  # (records from curation); "all": the hint for every item.
  config.template.difficulty_hint = "off"
  config.template.hint = templates.DIFFICULTY_HINT
  config.template.hint_below_pass_rate = 0.3
  config.template.system_prompt = ""  # "" -> the chat template's default

  config.rollout = ml_collections.ConfigDict()
  config.rollout.num_samples = 4  # K responses per item
  config.rollout.max_new_tokens = 24
  config.rollout.temperature = 1.0  # 0 -> greedy
  config.rollout.top_p = 1.0
  config.rollout.top_k = 0
  config.rollout.batch_size = 8  # items per generate call
  config.rollout.seed = 0
  config.rollout.reward_fn = "math"  # a dprl.rl.rewards.REWARD_FNS name
  config.rollout.min_pixels = 3136  # Qwen2.5-VL's processor defaults
  config.rollout.max_pixels = 12845056
  config.rollout.max_prompt_length = 2048

  config.metrics = ml_collections.ConfigDict()
  config.metrics.pass_at_k = (1, 4)  # k above num_samples are dropped

  # Device mesh; all 1 -> no mesh. One size may be -1 (the remaining devices).
  # rollout.batch_size must be a multiple of mesh.data.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  return config


def _tiny(config: ml_collections.ConfigDict) -> None:
  config.tokenizer = "small"


def _benchmark(layout: str):
  def apply(config: ml_collections.ConfigDict) -> None:
    config.model.dtype = "bfloat16"
    config.data.source = "file"
    config.data.layout = layout
    config.rollout.num_samples = 1
    config.rollout.temperature = 0.0
    config.rollout.max_new_tokens = 2048
    config.rollout.batch_size = 32
    # The EasyR1 recipes' image bounds (methods.md), as in training.
    config.rollout.min_pixels = 262144
    config.rollout.max_pixels = 4194304
    config.rollout.max_prompt_length = 4096
    config.metrics.pass_at_k = (1,)
    config.mesh.data = -1
  return apply


VARIANTS = {"tiny": _tiny, "mathvista": _benchmark("mathvista"),
            "mathverse": _benchmark("mathverse")}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"configs/eval.py: unknown variant {variant!r}; known: {sorted(VARIANTS)}")
  config = base_config()
  VARIANTS[variant](config)
  return config
