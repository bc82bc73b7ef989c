"""Qwen2.5-VL architecture configuration, presets, and conversion to/from HF config.json.

The dataclasses hold only what the forward pass needs; `from_hf_dict`/`to_hf_dict` map
to transformers' `Qwen2_5_VLConfig` layout (transformers 5.x: `text_config`,
`vision_config`, `rope_parameters`), reading the 4.x flat layout too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp


INIT_SCHEMES = ("hf", "fan_in")
HF_INITIALIZER_RANGE = 0.02


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 3584
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  hidden_act: str = "silu"
  rope_theta: float = 10000.0
  tokens_per_second: int = 2
  rms_norm_eps: float = 1e-6  # fixed in transformers, not read from config.json

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TextConfig:
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  hidden_act: str = "silu"
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1000000.0
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128000
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = None

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Qwen2.5-VL shapes plus dprl's run-time choices (dtypes, scan, remat)."""

  vision: VisionConfig = VisionConfig()
  text: TextConfig = TextConfig()
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  tie_word_embeddings: bool = False
  # Run-time choices, not part of the checkpoint.
  param_dtype: Any = jnp.float32
  dtype: Any = jnp.float32  # compute dtype; logits are always float32
  remat_policy: str = "none"  # see dprl.models.text.REMAT_POLICIES
  # Random init only (checkpoints overwrite it): "hf" draws every weight from N(0, 0.02),
  # transformers' initializer_range, sized for widths in the thousands; "fan_in" draws
  # kernels from N(0, 1/fan_in) so that activations keep their scale through narrow
  # layers (at width 64 N(0, 0.02) shrinks each matmul's output ~6x and a model trained
  # from scratch learns to ignore the vision tower; see configs/grpo.py:cpu_demo).
  init_scheme: str = "hf"

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def validate(self) -> None:
    t, v = self.text, self.vision
    problems = []
    if t.hidden_size % t.num_attention_heads:
      problems.append("text hidden_size must be divisible by num_attention_heads")
    if t.num_attention_heads % t.num_key_value_heads:
      problems.append("num_attention_heads must be divisible by num_key_value_heads")
    if sum(t.mrope_section) * 2 != t.head_dim:
      problems.append(f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}")
    if v.hidden_size % v.num_heads:
      problems.append("vision hidden_size must be divisible by num_heads")
    if v.out_hidden_size != t.hidden_size:
      problems.append(f"vision out_hidden_size {v.out_hidden_size} != text hidden_size {t.hidden_size}")
    if self.init_scheme not in INIT_SCHEMES:
      problems.append(f"init_scheme {self.init_scheme!r} is not one of {INIT_SCHEMES}")
    if any(i >= v.depth for i in v.fullatt_block_indexes):
      problems.append(f"fullatt_block_indexes {v.fullatt_block_indexes} out of range for depth {v.depth}")
    if problems:
      raise ValueError("invalid Qwen2.5-VL config: " + "; ".join(problems))


class ConfigError(ValueError):
  """config.json is not a Qwen2.5-VL config, or lacks a field; the message names the file."""


def from_hf_dict(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
  """Builds a ModelConfig from a transformers config.json dict (4.x or 5.x layout)."""
  model_type = d.get("model_type")
  if model_type != "qwen2_5_vl":
    raise ConfigError(f"{source}: model_type is {model_type!r}, expected 'qwen2_5_vl' (Qwen2.5-VL)")
  # transformers 4.x kept the text fields at the top level; 5.x nests them in text_config.
  td = dict(d)
  td.update(d.get("text_config") or {})
  vd = dict(d.get("vision_config") or {})
  if not vd:
    raise ConfigError(f"{source}: no vision_config")
  rope = td.get("rope_parameters") or td.get("rope_scaling") or {}

  def need(dd, key, where):
    if key not in dd:
      raise ConfigError(f"{source}: missing field {where}{key}")
    return dd[key]

  eos = td.get("eos_token_id", 151645)
  text = TextConfig(
      vocab_size=need(td, "vocab_size", "text_config."),
      hidden_size=need(td, "hidden_size", "text_config."),
      intermediate_size=need(td, "intermediate_size", "text_config."),
      num_hidden_layers=need(td, "num_hidden_layers", "text_config."),
      num_attention_heads=need(td, "num_attention_heads", "text_config."),
      num_key_value_heads=td.get("num_key_value_heads") or td["num_attention_heads"],
      hidden_act=td.get("hidden_act", "silu"),
      rms_norm_eps=td.get("rms_norm_eps", 1e-6),
      rope_theta=rope.get("rope_theta", td.get("rope_theta", 1000000.0)),
      mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
      max_position_embeddings=td.get("max_position_embeddings", 128000),
      bos_token_id=td.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=td.get("pad_token_id"),
  )
  vrope = vd.get("rope_parameters") or {}
  vision = VisionConfig(
      depth=need(vd, "depth", "vision_config."),
      hidden_size=need(vd, "hidden_size", "vision_config."),
      intermediate_size=need(vd, "intermediate_size", "vision_config."),
      num_heads=need(vd, "num_heads", "vision_config."),
      in_channels=vd.get("in_channels", vd.get("in_chans", 3)),
      patch_size=vd.get("patch_size", 14),
      temporal_patch_size=vd.get("temporal_patch_size", 2),
      spatial_merge_size=vd.get("spatial_merge_size", 2),
      window_size=vd.get("window_size", 112),
      out_hidden_size=vd.get("out_hidden_size", text.hidden_size),
      fullatt_block_indexes=tuple(vd.get("fullatt_block_indexes", ())),
      hidden_act=vd.get("hidden_act", "silu"),
      rope_theta=vrope.get("rope_theta", 10000.0),
      tokens_per_second=vd.get("tokens_per_second", 2),
  )
  cfg = ModelConfig(
      vision=vision,
      text=text,
      image_token_id=d.get("image_token_id", 151655),
      video_token_id=d.get("video_token_id", 151656),
      vision_start_token_id=d.get("vision_start_token_id", 151652),
      vision_end_token_id=d.get("vision_end_token_id", 151653),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False) or td.get("tie_word_embeddings", False)),
  )
  try:
    cfg.validate()
  except ValueError as e:
    raise ConfigError(f"{source}: {e}") from None
  return cfg


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
  """The transformers 5.x config.json for `cfg` (what `Qwen2_5_VLConfig.to_dict` writes)."""
  t, v = cfg.text, cfg.vision
  dtype_name = jnp.dtype(cfg.param_dtype).name
  return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "dtype": dtype_name,
      "image_token_id": cfg.image_token_id,
      "video_token_id": cfg.video_token_id,
      "vision_start_token_id": cfg.vision_start_token_id,
      "vision_end_token_id": cfg.vision_end_token_id,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "text_config": {
          "model_type": "qwen2_5_vl_text",
          "vocab_size": t.vocab_size,
          "hidden_size": t.hidden_size,
          "intermediate_size": t.intermediate_size,
          "num_hidden_layers": t.num_hidden_layers,
          "num_attention_heads": t.num_attention_heads,
          "num_key_value_heads": t.num_key_value_heads,
          "hidden_act": t.hidden_act,
          "rms_norm_eps": t.rms_norm_eps,
          "max_position_embeddings": t.max_position_embeddings,
          "rope_parameters": {
              "rope_type": "default",
              "rope_theta": t.rope_theta,
              "mrope_section": list(t.mrope_section),
          },
          "bos_token_id": t.bos_token_id,
          "eos_token_id": list(t.eos_token_id) if isinstance(t.eos_token_id, tuple) else t.eos_token_id,
          "pad_token_id": t.pad_token_id,
          "tie_word_embeddings": cfg.tie_word_embeddings,
          "dtype": dtype_name,
      },
      "vision_config": {
          "model_type": "qwen2_5_vl_vision",
          "depth": v.depth,
          "hidden_size": v.hidden_size,
          "intermediate_size": v.intermediate_size,
          "num_heads": v.num_heads,
          "in_channels": v.in_channels,
          "patch_size": v.patch_size,
          "temporal_patch_size": v.temporal_patch_size,
          "spatial_merge_size": v.spatial_merge_size,
          "window_size": v.window_size,
          "out_hidden_size": v.out_hidden_size,
          "fullatt_block_indexes": list(v.fullatt_block_indexes),
          "hidden_act": v.hidden_act,
          "tokens_per_second": v.tokens_per_second,
          "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
      },
  }


def load_hf_config(path: str) -> ModelConfig:
  file = path if path.endswith(".json") else os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise ConfigError(f"{file}: not found (expected a Hugging Face checkpoint folder with config.json)")
  try:
    with open(file) as f:
      d = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{file}: not valid JSON ({e})") from None
  return from_hf_dict(d, source=file)


# Presets named after the checkpoints whose shapes they match. The vision tower is the
# same in every size; only out_hidden_size follows the decoder.
def _vision(out: int) -> VisionConfig:
  return VisionConfig(out_hidden_size=out)


PRESETS: dict[str, ModelConfig] = {
    "qwen2_5_vl_3b": ModelConfig(
        vision=_vision(2048),
        text=TextConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                        num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
        tie_word_embeddings=True),
    "qwen2_5_vl_7b": ModelConfig(
        vision=_vision(3584),
        text=TextConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4)),
    "qwen2_5_vl_32b": ModelConfig(
        vision=_vision(5120),
        text=TextConfig(vocab_size=152064, hidden_size=5120, intermediate_size=27648,
                        num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8)),
    "qwen2_5_vl_72b": ModelConfig(
        vision=_vision(8192),
        text=TextConfig(vocab_size=152064, hidden_size=8192, intermediate_size=29568,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)),
    # A laptop-sized model with the real architecture (windowed + full vision blocks, GQA,
    # 3-section mrope) for tests and the CPU demo.
    "tiny": ModelConfig(
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                            out_hidden_size=64, fullatt_block_indexes=(1,)),
        text=TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        rope_theta=10000.0, mrope_section=(2, 3, 3), max_position_embeddings=4096,
                        bos_token_id=None, eos_token_id=None),
        image_token_id=290, video_token_id=291, vision_start_token_id=288, vision_end_token_id=289),
    # ~1M parameters: the size that learned visual counting by RL on 2 CPU cores in
    # shared/docs/tiny-rl-facts.md (2-layer ViT of width 64, 3-layer decoder of width 128).
    # The demo's default; token ids are replaced by the tokenizer's. Two departures from
    # the released checkpoints, both measured (100 warm-start steps, greedy accuracy on
    # 500 held-out items of count_red): 2x2 merging left 4 image tokens for a 56 px image
    # and N(0, 0.02) weights shrink activations at width 64; with one of them or both the
    # warm start learns to ignore the image (30.4%, the "always 1" rate); with merge 1 (16
    # image tokens, one per patch, as in the prototype) and fan-in init it reads it (44.6%).
    "cpu_demo": ModelConfig(
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=256, num_heads=4,
                            out_hidden_size=128, fullatt_block_indexes=(1,),
                            spatial_merge_size=1),
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=512,
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        rope_theta=10000.0, mrope_section=(4, 6, 6), max_position_embeddings=4096,
                        bos_token_id=None, eos_token_id=None),
        image_token_id=290, video_token_id=291, vision_start_token_id=288, vision_end_token_id=289,
        init_scheme="fan_in"),
}


def get_preset(name: str, **overrides: Any) -> ModelConfig:
  if name not in PRESETS:
    raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name].replace(**overrides)
